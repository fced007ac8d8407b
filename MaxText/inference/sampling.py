"""Next-token sampling from logits: greedy, weighted (temperature), top-k, nucleus (top-p) and composite.

Pure functions of (logits, key), jit-friendly; a `Sampler` is a frozen (hashable) setting that jit treats as static.
Each row draws with its own key, folded from the step key and the row index, so a row's draws do not depend on how
many rows are decoded beside it. Filters run on the raw logits and the temperature divides what survives:
composite = top-k -> top-p -> temperature. A temperature of 0 means greedy for every strategy.
"""

import dataclasses

import jax
import jax.numpy as jnp

STRATEGIES = ("greedy", "weighted", "topk", "nucleus", "composite")


@dataclasses.dataclass(frozen=True)
class Sampler:
  """A sampling setting. top_k 0 and top_p 1.0 disable those filters."""

  strategy: str = "greedy"
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0

  def __post_init__(self):
    if self.strategy not in STRATEGIES:
      raise ValueError(f"sampling strategy {self.strategy!r} is not one of {STRATEGIES}")
    if self.temperature < 0:
      raise ValueError(f"sampling temperature {self.temperature} must be >= 0")
    if self.top_k < 0:
      raise ValueError(f"top_k {self.top_k} must be >= 0")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p {self.top_p} must be in (0, 1]")
    if self.strategy == "topk" and self.top_k == 0:
      raise ValueError("strategy 'topk' needs top_k > 0")

  @classmethod
  def from_config(cls, config) -> "Sampler":
    return cls(
        strategy=config.decode_sampling_strategy,
        temperature=config.decode_sampling_temperature,
        top_k=config.decode_sampling_top_k,
        top_p=config.decode_sampling_nucleus_p,
    )

  def __call__(self, logits: jax.Array, key: jax.Array) -> jax.Array:
    return sample(logits, key, self)


def top_k_mask(logits: jax.Array, k: int) -> jax.Array:
  """True for each row's k largest logits (ties at the k-th value are all kept)."""
  if k <= 0 or k >= logits.shape[-1]:
    return jnp.ones(logits.shape, bool)
  kth = jax.lax.top_k(logits, k)[0][..., -1:]
  return logits >= kth


def top_p_mask(logits: jax.Array, p: float) -> jax.Array:
  """True for the smallest set of most likely tokens whose probability reaches p (always at least the top one)."""
  if p >= 1.0:
    return jnp.ones(logits.shape, bool)
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  sorted_probs = jnp.sort(probs, axis=-1)[..., ::-1]
  # A token is kept while the mass strictly before it is still short of p.
  mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
  kept = mass_before < p
  threshold = jnp.min(jnp.where(kept, sorted_probs, jnp.inf), axis=-1, keepdims=True)
  return probs >= threshold


def filtered_logits(logits: jax.Array, sampler: Sampler) -> jax.Array:
  """Float32 logits with the tokens the strategy excludes at -inf, divided by the temperature."""
  logits = logits.astype(jnp.float32)
  keep = jnp.ones(logits.shape, bool)
  if sampler.strategy in ("topk", "composite"):
    keep &= top_k_mask(logits, sampler.top_k)
  if sampler.strategy in ("nucleus", "composite"):
    keep &= top_p_mask(jnp.where(keep, logits, -jnp.inf), sampler.top_p)
  return jnp.where(keep, logits, -jnp.inf) / sampler.temperature


def sample(logits: jax.Array, key: jax.Array, sampler: Sampler) -> jax.Array:
  """One token id per row of logits [batch, vocab] -> int32 [batch]."""
  if sampler.strategy == "greedy" or sampler.temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32)
  keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(logits.shape[0]))
  draw = jax.vmap(jax.random.categorical)
  if sampler.strategy in ("topk", "composite") and 0 < sampler.top_k < logits.shape[-1]:
    # Only the k candidates matter: filter and draw among them (sorting the whole vocab every step is slow).
    values, indices = jax.lax.top_k(logits, sampler.top_k)
    if sampler.strategy == "composite":
      values = jnp.where(top_p_mask(values, sampler.top_p), values, -jnp.inf)
    choice = draw(keys, values / sampler.temperature)
    return jnp.take_along_axis(indices, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
  return draw(keys, filtered_logits(logits, sampler)).astype(jnp.int32)
