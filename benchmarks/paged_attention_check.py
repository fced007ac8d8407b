"""Paged decode attention check: the Pallas GPU kernel against the portable jax path, and step times.

    python3 benchmarks/paged_attention_check.py [--slots 32] [--steps 20]

1. tiny-llama, teacher-forced: max |logit difference| of paged_attention_kernel=pallas vs jax (GPU only; the tests
   cover the jax path against the contiguous cache on CPU).
2. llama-small, f32, `--slots` slots with 48-token sequences: median ms per generate step of the contiguous cache,
   the paged jax path and (GPU) the paged Pallas kernel, in one process.
Prints a markdown table (lines starting with "| "), as benchmarks/gpu_check.sh collects.
"""

import argparse
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from MaxText import pyconfig, startup
from MaxText.inference import engine as engine_lib
from MaxText.inference import page_manager
from MaxText.layers import model_creation


def _config(model: str, slots: int, **kw):
  return pyconfig.initialize(
      ["", str(pyconfig.CONFIGS_DIR / "base.yml")],
      model_name=model,
      run_name="paged_check",
      per_device_batch_size=slots / jax.device_count(),
      decode_sampling_strategy="greedy",
      log_config=False,
      **kw,
  )


def _random_params(config):
  abstract = nnx.state(model_creation.abstract_model(config), nnx.Param).to_pure_dict()
  return jax.tree.map(lambda a: (np.random.default_rng(0).standard_normal(a.shape) * 0.05).astype(a.dtype), abstract)


def _filled_state(engine, params, lengths, toks):
  """Decode state with row i prefilled with lengths[i] tokens (pages allocated when paged)."""
  state = engine.init_decode_state()
  pages = None
  if engine.page_spec is not None:
    spec = engine.page_spec
    pages = page_manager.PageManager(spec.num_pages, spec.tokens_per_page, spec.max_pages_per_slot, len(lengths))
  for slot, n in enumerate(lengths):
    if pages is not None:
      pages.ensure(slot, engine.dims.max_cache_length)
      state = engine.set_page_table(state, pages.table)
    padded = np.zeros((engine.dims.max_prefill_length,), np.int32)
    padded[:n] = toks[slot, :n]
    state = engine.insert(engine.prefill(params, padded, n), state, slot)
  return state


def kernel_difference() -> float:
  kw = {"attention": "paged", "pagedattn_tokens_per_page": 16, "pagedattn_num_pages": 16}
  configs = {k: _config("tests/tiny-llama", 2, paged_attention_kernel=k, **kw) for k in ("jax", "pallas")}
  params = _random_params(configs["jax"])
  toks = np.random.default_rng(0).integers(0, 256, (2, 32)).astype(np.int32)
  logits = {}
  for name, config in configs.items():
    engine = engine_lib.Engine(config, num_slots=2)
    placed = engine.place_params(params)
    state = _filled_state(engine, placed, (5, 11), toks)
    steps = []
    for t in range(8):
      state["tokens"] = jnp.asarray([toks[0, 5 + t], toks[1, 11 + t]])
      state, _, step_logits = engine.generate_with_logits(placed, state)
      steps.append(np.asarray(step_logits))
    logits[name] = np.stack(steps)
  return float(np.max(np.abs(logits["pallas"] - logits["jax"])))


def step_ms(config, slots: int, steps: int) -> float:
  engine = engine_lib.Engine(config)
  params = engine.place_params(_random_params(config))
  toks = np.random.default_rng(1).integers(0, config.vocab_size, (slots, 16)).astype(np.int32)
  state = _filled_state(engine, params, [16] * slots, toks)
  times = []
  for _ in range(steps + 2):
    start = time.perf_counter()
    state, tokens = engine.generate(params, state)
    np.asarray(tokens)
    times.append(time.perf_counter() - start)
  return 1000 * statistics.median(times[2:])


def main(argv):
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("--slots", type=int, default=32)
  parser.add_argument("--steps", type=int, default=20)
  args = parser.parse_args(argv)
  # The process set up as the entry points' is (reuse_host_memory on CPU) before anything starts JAX.
  startup.start(["", str(pyconfig.CONFIGS_DIR / "base.yml"), "log_config=False"])
  gpu = jax.default_backend() == "gpu"
  dims = {"max_target_length": 48, "max_prefill_predict_length": 16, "dtype": "float32"}
  paged = {"attention": "paged", "pagedattn_num_pages": 3 * args.slots + 1}
  print(f"| paged attention ({jax.default_backend()}) | value |")
  print("| --- | --- |")
  if gpu:
    print(f"| tiny-llama max abs logit diff, pallas vs jax | {kernel_difference():.2e} |")
  variants = {"contiguous": {}, "paged jax": {**paged, "paged_attention_kernel": "jax"}}
  if gpu:
    variants["paged pallas"] = {**paged, "paged_attention_kernel": "pallas"}
  for name, kw in variants.items():
    ms = step_ms(_config("llama-small", args.slots, **dims, **kw), args.slots, args.steps)
    print(f"| llama-small {args.slots} slots, {name}: ms per generate step | {ms:.2f} |")


if __name__ == "__main__":
  main(sys.argv[1:])
