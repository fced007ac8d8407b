"""The one next-token sampler of decode, api and serve: per-row settings as arrays, so one compiled function serves
every mix of requests in a batch.

Semantics: presence/frequency penalties (OpenAI's) first lower the logits of tokens the request has already
generated; filters then run on those logits (top-k, then top-p over what top-k kept, renormalized), then the
temperature divides what survives; temperature 0 is greedy; top_k 0 and top_p 1 disable those filters. Ties at a
filter's threshold are all kept. Row b draws with the key fold_in(key(seed[b]), step[b]), where step is the
request's own count of tokens sampled so far, and the draw is a Gumbel argmax over the whole vocabulary in token
order, so a request's tokens depend on its seed and its own token count only: never on its batch neighbours.

Sorting the vocabulary each step is the slow part, so the masks are computed by the cheapest branch the batch
allows (one compiled function picks at run time): all greedy -> argmax; no row filters -> no sort; every filtering
row has 0 < top_k <= TOP_K_CANDIDATES -> top-k candidates only; otherwise a full sort. Each gives the same mask.

Config keys decode_sampling_* (strategy, temperature, top_k, nucleus_p, seed) are the default row settings.

Logprobs (`sample(..., logprobs=True)`) are those of the distribution the token was drawn from: log-softmax of the
penalized, filtered, temperature-scaled logits (filtered-out tokens are -inf); a greedy row's are the log-softmax of
its (penalized) logits.
"""

import dataclasses
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from MaxText.config import choices

STRATEGIES = choices("decode_sampling_strategy")
TOP_K_CANDIDATES = 128  # top_k up to this skips the full sort
SETTINGS_KEYS = ("temperature", "top_k", "top_p", "seed", "presence_penalty", "frequency_penalty")
MAX_TOP_LOGPROBS = 20  # alternatives per token that logprobs report (OpenAI's limit)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """One request's sampling (OpenAI-style: temperature 0 = greedy; top_k 0 and top_p 1 disable filters)."""

  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  seed: int = 0
  presence_penalty: float = 0.0
  frequency_penalty: float = 0.0

  def __post_init__(self):
    if self.temperature < 0:
      raise ValueError(f"sampling temperature {self.temperature} must be >= 0")
    if self.top_k < 0:
      raise ValueError(f"top_k {self.top_k} must be >= 0")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p {self.top_p} must be in (0, 1]")
    for name in ("presence_penalty", "frequency_penalty"):
      if not -2.0 <= getattr(self, name) <= 2.0:
        raise ValueError(f"{name} {getattr(self, name)} must be in [-2, 2]")

  @classmethod
  def from_strategy(
      cls, strategy: str, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0
  ) -> "SamplingParams":
    """A named strategy (decode_sampling_strategy) in terms of the one semantics: greedy ignores the other
    settings, weighted uses the temperature alone, topk / nucleus add their filter, composite both."""
    if strategy not in STRATEGIES:
      raise ValueError(f"sampling strategy {strategy!r} is not one of {STRATEGIES}")
    if strategy == "topk" and top_k == 0:
      raise ValueError("strategy 'topk' needs top_k > 0")
    if strategy == "greedy":
      return cls(seed=seed)
    top_k = top_k if strategy in ("topk", "composite") else 0
    top_p = top_p if strategy in ("nucleus", "composite") else 1.0
    return cls(temperature, top_k, top_p, seed)

  @classmethod
  def from_config(cls, config) -> "SamplingParams":
    return cls.from_strategy(
        config.decode_sampling_strategy,
        temperature=config.decode_sampling_temperature,
        top_k=config.decode_sampling_top_k,
        top_p=config.decode_sampling_nucleus_p,
        seed=config.decode_sampling_seed,
    )

  @property
  def greedy(self) -> bool:
    return self.temperature == 0

  def per_prompt(self, n: int) -> list["SamplingParams"]:
    """These settings for n prompts decoded together: prompt i draws with seed + i, so equal prompts differ."""
    return [dataclasses.replace(self, seed=self.seed + i) for i in range(n)]


def settings_arrays(rows: Sequence[Optional[SamplingParams]]) -> dict[str, np.ndarray]:
  """Host arrays (SETTINGS_KEYS) of per-row settings; None rows (empty slots) are greedy."""
  rows = [r or SamplingParams() for r in rows]
  return {
      "temperature": np.array([r.temperature for r in rows], np.float32),
      "top_k": np.array([r.top_k for r in rows], np.int32),
      "top_p": np.array([r.top_p for r in rows], np.float32),
      "seed": np.array([r.seed & 0x7FFFFFFF for r in rows], np.int32),
      "presence_penalty": np.array([r.presence_penalty for r in rows], np.float32),
      "frequency_penalty": np.array([r.frequency_penalty for r in rows], np.float32),
  }


def _keep_mask(logits: jax.Array, top_k: jax.Array, top_p: jax.Array, candidates: int) -> jax.Array:
  """True for the tokens top-k then top-p keep, from each row's `candidates` largest logits (enough when every
  filtering row has top_k <= candidates); top_k 0 = no limit."""
  vocab = logits.shape[-1]
  if candidates < vocab:
    ranked = jax.lax.top_k(logits, candidates)[0]
  else:
    ranked = -jnp.sort(-logits, axis=-1)
  rank = jnp.arange(ranked.shape[-1], dtype=jnp.int32)
  k = jnp.where(top_k > 0, jnp.minimum(top_k, ranked.shape[-1]), ranked.shape[-1])
  kept = rank[None, :] < k[:, None]
  probs = jax.nn.softmax(jnp.where(kept, ranked, -jnp.inf), axis=-1)
  mass_before = jnp.cumsum(probs, axis=-1) - probs  # a token is kept while the mass before it is short of p
  kept &= (mass_before < top_p[:, None]) | (rank[None, :] == 0)
  threshold = jnp.min(jnp.where(kept, ranked, jnp.inf), axis=-1, keepdims=True)
  return logits >= threshold


def top_k_mask(logits: jax.Array, k: int) -> jax.Array:
  """True for each row's k largest logits (ties at the k-th value are all kept); k 0 keeps all."""
  ones = jnp.ones(logits.shape[:1])
  return _keep_mask(logits.astype(jnp.float32), (ones * k).astype(jnp.int32), ones, logits.shape[-1])


def top_p_mask(logits: jax.Array, p: float) -> jax.Array:
  """True for the smallest set of most likely tokens whose probability reaches p (always at least the top one)."""
  ones = jnp.ones(logits.shape[:1])
  return _keep_mask(logits.astype(jnp.float32), jnp.zeros(logits.shape[:1], jnp.int32), ones * p, logits.shape[-1])


def penalize(logits: jax.Array, history: jax.Array, settings: dict[str, jax.Array]) -> jax.Array:
  """logits [batch, vocab] less each row's penalties for the tokens it generated: history [batch, length] holds
  them in order, the first settings["step"] of each row valid. frequency_penalty x count + presence_penalty x
  (count > 0), as OpenAI defines them; skipped (no scatter) when no row has a penalty."""
  presence, frequency = settings["presence_penalty"], settings["frequency_penalty"]

  def apply():
    valid = jnp.arange(history.shape[1])[None, :] < settings["step"][:, None]
    rows = jnp.broadcast_to(jnp.arange(history.shape[0])[:, None], history.shape)
    counts = jnp.zeros(logits.shape, jnp.float32).at[rows, history].add(valid.astype(jnp.float32))
    return logits - frequency[:, None] * counts - presence[:, None] * (counts > 0)

  return jax.lax.cond(jnp.any((presence != 0) | (frequency != 0)), apply, lambda: logits)


def token_logprobs(processed: jax.Array, tokens: jax.Array) -> dict[str, jax.Array]:
  """The chosen tokens' logprobs [batch] and the MAX_TOP_LOGPROBS most likely tokens' (ids, logprobs) [batch, k]
  under log-softmax(processed)."""
  logprobs = jax.nn.log_softmax(processed.astype(jnp.float32), axis=-1)
  top_values, top_ids = jax.lax.top_k(logprobs, min(MAX_TOP_LOGPROBS, logprobs.shape[-1]))
  chosen = jnp.take_along_axis(logprobs, tokens[:, None].astype(jnp.int32), axis=-1)[:, 0]
  return {"logprob": chosen, "top_ids": top_ids.astype(jnp.int32), "top_logprobs": top_values}


def sample(logits: jax.Array, settings: dict[str, jax.Array], *, logprobs: bool = False):
  """int32 [batch] tokens from logits [batch, vocab]; `settings`: settings_arrays of each row plus "step" [batch]
  (the row's count of tokens sampled so far). Penalties are the caller's (`penalize`).

  logprobs=True: (tokens, token_logprobs of the distribution each row drew from).
  """
  logits = logits.astype(jnp.float32)
  vocab = logits.shape[-1]
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  temperature, top_p = settings["temperature"], settings["top_p"]
  top_k = jnp.where(settings["top_k"] < vocab, settings["top_k"], 0)
  sampled = temperature > 0
  filtering = sampled & ((top_k > 0) | (top_p < 1.0))
  candidates = min(TOP_K_CANDIDATES, vocab)

  # Without logprobs the branches return tokens only, so no [batch, vocab] array leaves the switch.
  out = (lambda tokens, processed: (tokens, processed)) if logprobs else (lambda tokens, _: tokens)

  def draw(keep):
    scaled = jnp.where(keep, logits / jnp.where(sampled, temperature, 1.0)[:, None], -jnp.inf)
    keys = jax.vmap(lambda s, t: jax.random.fold_in(jax.random.key(s), t))(settings["seed"], settings["step"])
    return out(jnp.where(sampled, jax.vmap(jax.random.categorical)(keys, scaled), greedy).astype(jnp.int32), scaled)

  branches = [
      lambda: out(greedy, logits),
      lambda: draw(jnp.ones(logits.shape, bool)),
      lambda: draw(_keep_mask(logits, top_k, top_p, candidates) | ~filtering[:, None]),
      lambda: draw(_keep_mask(logits, top_k, top_p, vocab) | ~filtering[:, None]),
  ]
  few = jnp.all(~filtering | ((top_k > 0) & (top_k <= candidates)))
  branch = jnp.where(~jnp.any(sampled), 0, jnp.where(~jnp.any(filtering), 1, jnp.where(few, 2, 3)))
  if not logprobs:
    return jax.lax.switch(branch, branches)
  tokens, processed = jax.lax.switch(branch, branches)
  return tokens, token_logprobs(processed, tokens)
