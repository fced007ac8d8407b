"""Offline batch decoding: a list of prompts through an Engine's slots, with continuous batching.

A prompt is prefilled (padded to a bucket length) and inserted into a free slot; every generate step advances all
slots at once; a slot whose prompt reached its stop token or token budget is handed to the next waiting prompt.
Used by the decode CLI and the Python API, so both produce the same tokens.
"""

import collections
import dataclasses
import time
from typing import Optional, Sequence

import jax
import numpy as np

from MaxText.inference import engine as engine_lib
from MaxText.inference import page_manager, sampling


@dataclasses.dataclass
class DecodeStats:
  """Token counts and wall time of prefill (with insert) and of generate steps, compile time excluded."""

  prefill_tokens: int = 0
  prefill_seconds: float = 0.0
  prefill_calls: int = 0
  generate_tokens: int = 0
  generate_steps: int = 0
  generate_seconds: float = 0.0

  def summary(self) -> str:
    def rate(tokens, seconds):
      return tokens / seconds if seconds > 0 else 0.0

    return (
        f"prefill: {self.prefill_tokens} tokens in {self.prefill_calls} calls, {self.prefill_seconds:.3f} s"
        f" ({rate(self.prefill_tokens, self.prefill_seconds):.1f} tokens/s); generate: {self.generate_tokens} tokens in"
        f" {self.generate_steps} steps, {self.generate_seconds:.3f} s"
        f" ({rate(self.generate_tokens, self.generate_seconds):.1f} tokens/s)"
    )


def bucket_length(length: int, max_prefill_length: int) -> int:
  """The padded prefill length for a prompt of `length` tokens."""
  for bucket in engine_lib.prefill_buckets(max_prefill_length):
    if length <= bucket:
      return bucket
  raise ValueError(f"prompt of {length} tokens exceeds max_prefill_length {max_prefill_length}")


def _padded(ids: Sequence[int], length: int) -> np.ndarray:
  row = np.zeros((length,), np.int32)
  row[: len(ids)] = ids
  return row


def warmup(engine: engine_lib.Engine, params, prompt_lengths: Sequence[int], sampler: sampling.Sampler):
  """Compiles prefill and insert for the buckets these prompts need, and one generate step."""
  state = engine.init_decode_state()
  key = jax.random.fold_in(jax.random.key(0), 0)  # the same eager ops decode_prompts runs
  for bucket in sorted({bucket_length(n, engine.dims.max_prefill_length) for n in prompt_lengths}):
    prefix = engine.prefill(params, np.zeros((bucket,), np.int32), 1, key=key, sampler=sampler)
    np.asarray(prefix["tokens"])
    state = engine.insert(prefix, state, 0)
  state, tokens = engine.generate(params, state, sampler=sampler)
  np.asarray(tokens)


def decode_prompts(
    engine: engine_lib.Engine,
    params,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: Optional[int] = None,
    stop_id: Optional[int] = None,
    seed: int = 0,
    sampler: Optional[sampling.Sampler] = None,
    stats: Optional[DecodeStats] = None,
) -> list[list[int]]:
  """New token ids per prompt: up to `max_new_tokens` (default: until the cache is full), ending at `stop_id`.

  A prompt of n tokens may grow to the engine's cache length (max_target_length): at most cache length - n new
  tokens. The stop token, when produced, is the last id of that prompt's list.
  """
  sampler = sampler or engine.sampler
  stats = stats if stats is not None else DecodeStats()
  cache_length = engine.dims.max_cache_length
  for i, ids in enumerate(prompts):
    if not ids:
      raise ValueError(f"prompt {i} is empty")
    bucket_length(len(ids), engine.dims.max_prefill_length)  # raises for a prompt that is too long
  budgets = [cache_length - len(ids) for ids in prompts]
  if max_new_tokens is not None:
    budgets = [min(b, max_new_tokens) for b in budgets]
  outputs: list[list[int]] = [[] for _ in prompts]
  waiting = collections.deque(i for i, b in enumerate(budgets) if b > 0)
  slots: list[Optional[int]] = [None] * engine.dims.num_slots  # prompt index per slot
  base_key = jax.random.key(seed)
  state = engine.init_decode_state(seed)
  pages = None  # attention=paged: pages are taken as sequences grow and returned when they finish
  if engine.page_spec is not None:
    spec = engine.page_spec
    pages = page_manager.PageManager(spec.num_pages, spec.tokens_per_page, spec.max_pages_per_slot, len(slots))

  def finished(i: int) -> bool:
    out = outputs[i]
    return len(out) >= budgets[i] or (stop_id is not None and out[-1] == stop_id)

  while waiting or any(s is not None for s in slots):
    for slot, occupant in enumerate(slots):
      if occupant is not None or not waiting:
        continue
      i = waiting.popleft()
      ids = prompts[i]
      start = time.perf_counter()
      tokens = _padded(ids, bucket_length(len(ids), engine.dims.max_prefill_length))
      prefix = engine.prefill(params, tokens, len(ids), key=jax.random.fold_in(base_key, i), sampler=sampler)
      first = int(np.asarray(prefix["tokens"])[0])
      outputs[i].append(first)
      if not finished(i):
        if pages is not None:
          pages.ensure(slot, len(ids))
          state = engine.set_page_table(state, pages.table)
        state = engine.insert(prefix, state, slot)
        slots[slot] = i
        jax.block_until_ready(state["positions"])
      stats.prefill_seconds += time.perf_counter() - start
      stats.prefill_tokens += len(ids)
      stats.prefill_calls += 1
    if all(s is None for s in slots):
      continue
    start = time.perf_counter()
    if pages is not None:  # room for the token each slot writes this step
      version = pages.version
      for slot, i in enumerate(slots):
        if i is not None:
          pages.ensure(slot, len(prompts[i]) + len(outputs[i]))
      if pages.version != version:
        state = engine.set_page_table(state, pages.table)
    state, tokens = engine.generate(params, state, sampler=sampler)
    tokens = np.asarray(tokens)
    stats.generate_seconds += time.perf_counter() - start
    stats.generate_steps += 1
    for slot, i in enumerate(slots):
      if i is None:
        continue
      outputs[i].append(int(tokens[slot]))
      stats.generate_tokens += 1
      if finished(i):
        slots[slot] = None
        if pages is not None:
          pages.release(slot)
  return outputs
