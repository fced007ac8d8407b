"""Next-token sampling with settings per row: each request in a continuously batched step keeps its own temperature,
top-k, top-p and seed, passed as arrays so one compiled function serves every mix of requests.

Same semantics as MaxText.inference.sampling: filters run on the raw logits (top-k, then top-p over what top-k
kept) and the temperature divides what survives; temperature 0 is greedy. Row b draws with the key
fold_in(key(seed[b]), step[b]), so a request's draws depend on its seed and its own token count only, never on the
rows decoded beside it.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class RowSettings:
  """Per-request sampling settings (OpenAI-style: temperature 0 = greedy; top_k 0 and top_p 1 disable filters)."""

  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  seed: int = 0

  def __post_init__(self):
    if self.temperature < 0:
      raise ValueError(f"temperature {self.temperature} must be >= 0")
    if self.top_k < 0:
      raise ValueError(f"top_k {self.top_k} must be >= 0")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p {self.top_p} must be in (0, 1]")


def settings_arrays(rows: list[RowSettings | None], steps: list[int]) -> dict[str, np.ndarray]:
  """Host arrays for sample_rows; None rows (empty slots) decode greedily."""
  rows = [r or RowSettings() for r in rows]
  return {
      "temperature": np.array([r.temperature for r in rows], np.float32),
      "top_k": np.array([r.top_k for r in rows], np.int32),
      "top_p": np.array([r.top_p for r in rows], np.float32),
      "seed": np.array([r.seed & 0x7FFFFFFF for r in rows], np.int32),
      "step": np.array(steps, np.int32),
  }


def _draw(logits: jax.Array, temperature, top_k, top_p, seed, step) -> jax.Array:
  vocab = logits.shape[-1]
  order = jnp.argsort(-logits, axis=-1)
  ranked = jnp.take_along_axis(logits, order, axis=-1)
  rank = jnp.arange(vocab, dtype=jnp.int32)
  keep = (top_k[:, None] <= 0) | (rank[None, :] < top_k[:, None])
  probs = jax.nn.softmax(jnp.where(keep, ranked, -jnp.inf), axis=-1)
  mass_before = jnp.cumsum(probs, axis=-1) - probs  # a token is kept while the mass before it is short of p
  keep &= (mass_before < top_p[:, None]) | (rank[None, :] == 0)
  scaled = jnp.where(keep, ranked / jnp.maximum(temperature, 1e-6)[:, None], -jnp.inf)
  keys = jax.vmap(lambda s, t: jax.random.fold_in(jax.random.key(s), t))(seed, step)
  choice = jax.vmap(jax.random.categorical)(keys, scaled)
  return jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0]


def sample_rows(logits: jax.Array, settings: dict[str, jax.Array]) -> jax.Array:
  """int32 [batch] tokens from float logits [batch, vocab] with the settings_arrays of each row."""
  logits = logits.astype(jnp.float32)
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  temperature = settings["temperature"]
  # Sorting the vocabulary is the costly part: skip it when every row is greedy.
  return jax.lax.cond(
      jnp.any(temperature > 0),
      lambda: jnp.where(
          temperature > 0,
          _draw(logits, temperature, settings["top_k"], settings["top_p"], settings["seed"], settings["step"]),
          greedy,
      ).astype(jnp.int32),
      lambda: greedy,
  )
