"""Param memory and decode tokens/s of int8 (weight-only and weights+activations) against bf16, in one process.

  python3 benchmarks/quantization_benchmark.py [--preset cpu|gpu] [--batch 4] [--prompt-length 32] [--new-tokens 32]
      [--repeats 5] [--variants bf16,int8w,int8] [CONFIG] [key=value ...]

Each variant decodes the same random-weight model (llama-small by default) through the engine, with params as decode
holds them: bf16 kernels for the baseline; int8 kernels + per-channel scales (checkpoint_is_quantized) for `int8w`
(activations stay bf16) and `int8` (activations quantized per token, int8 x int8 matmuls); the `f32` rows repeat these
with dtype=weight_dtype=float32. Embedding and output head stay in weight_dtype in every variant. Reported per
variant: param bytes, and the median over `--repeats` interleaved rounds of generate tokens/s (one token per slot per
step, every slot active), with the ratios to bf16.
`--preset gpu` is the variant `benchmarks/gpu_check.sh` calls (a larger batch, where weight reads dominate less).
The machine may be shared: compare numbers from the same run only.
"""

import argparse
import statistics
import sys
import time

import jax
import numpy as np
from flax import nnx

from MaxText import pyconfig, sharding, startup
from MaxText.inference import engine as engine_lib
from MaxText.layers import model_creation, quantization

BASE = [
    "model_name=llama-small",
    "dtype=bfloat16",
    "weight_dtype=bfloat16",
    "log_config=false",
    "enable_checkpointing=false",
    "decode_sampling_strategy=greedy",
]
# The f32 rows are for CPUs without native bf16 matmuls, where bf16 runs slower than f32: int8 against f32 there.
VARIANTS = {
    "bf16": [],
    "int8w": ["quantization=int8w"],
    "int8": ["quantization=int8"],
    "f32": ["dtype=float32", "weight_dtype=float32"],
    "f32+int8w": ["dtype=float32", "weight_dtype=float32", "quantization=int8w"],
    "f32+int8": ["dtype=float32", "weight_dtype=float32", "quantization=int8"],
}
PRESETS = {
    "cpu": dict(batch=4, prompt_length=32, new_tokens=32, repeats=5, variants=tuple(VARIANTS)),
    # gpu_check.sh gives each command 60 s: three variants, short rounds.
    "gpu": dict(batch=32, prompt_length=64, new_tokens=64, repeats=3, variants=("bf16", "int8w", "int8")),
}


class Runner:
  """One variant: its engine (batch slots) and its params as decode holds them; measure() times the generate steps."""

  def __init__(self, config, float_params, batch: int, prompt_length: int, new_tokens: int):
    self.engine = engine_lib.Engine(
        config, num_slots=batch, max_prefill_length=prompt_length, max_cache_length=prompt_length + new_tokens
    )
    params = engine_lib.unrolled_params(float_params, config.param_scan_axis)
    if config.quantization:
      params = quantization.quantize_params(params, self.engine.abstract_params)
    params = jax.tree.map(lambda a, s: a.astype(s.dtype), params, self.engine.abstract_params)  # weight_dtype
    self.params = self.engine.place_params(params)
    self.bytes = quantization.param_bytes(self.params)
    rng = np.random.default_rng(0)
    self.prompts = rng.integers(1, config.vocab_size, (batch, prompt_length)).astype(np.int32)
    self.batch, self.prompt_length, self.new_tokens = batch, prompt_length, new_tokens
    self.state = self.engine.init_decode_state()
    for _ in range(2):  # compile, then one warm run
      self.measure()

  def measure(self) -> float:
    prefix = self.engine.prefill(self.params, self.prompts, self.prompt_length)
    self.state = self.engine.insert(prefix, self.state, list(range(self.batch)))
    jax.block_until_ready(self.state)
    start = time.perf_counter()
    for _ in range(self.new_tokens - 1):
      self.state, tokens = self.engine.generate(self.params, self.state)
    np.asarray(tokens)
    return self.batch * (self.new_tokens - 1) / (time.perf_counter() - start)


def run(preset: str = "cpu", overrides: list[str] | None = None, config_path: str = "MaxText/configs/base.yml", **kw):
  """Builds every variant, measures them interleaved, prints a table; returns {variant: (bytes, median tokens/s)}."""
  opts = {**PRESETS[preset], **{k: v for k, v in kw.items() if v is not None}}
  overrides = overrides or []
  float_config = pyconfig.initialize(["", config_path, *BASE, "dtype=float32", "weight_dtype=float32", *overrides])
  float_params = nnx.state(
      model_creation.create_sharded_model(float_config, sharding.create_mesh(float_config)), nnx.Param
  ).to_pure_dict()
  runners = {}
  for name in opts["variants"]:
    keys = VARIANTS[name]
    extra = ["checkpoint_is_quantized=true"] if any(k.startswith("quantization") for k in keys) else []
    config = pyconfig.initialize(["", config_path, *BASE, *keys, *extra, *overrides])
    runners[name] = Runner(config, float_params, opts["batch"], opts["prompt_length"], opts["new_tokens"])
  rates = {name: [] for name in runners}
  for _ in range(opts["repeats"]):
    for name, runner in runners.items():
      rates[name].append(runner.measure())
  results = {name: (runner.bytes, statistics.median(rates[name])) for name, runner in runners.items()}
  base = next(iter(results))  # the first variant (bf16 unless --variants says otherwise) is the baseline
  base_bytes, base_rate = results[base]
  print(
      f"device {jax.devices()[0].device_kind} x{jax.device_count()}, model {float_config.model_name}, batch"
      f" {opts['batch']}, prompt {opts['prompt_length']}, {opts['new_tokens']} new tokens, median of"
      f" {opts['repeats']}"
  )
  print(f"{'variant':10} {'param MB':>9} {'vs ' + base:>8} {'generate tok/s':>15} {'vs ' + base:>8}")
  for name, (nbytes, rate) in results.items():
    print(f"{name:10} {nbytes / 1e6:9.1f} {nbytes / base_bytes:8.2f} {rate:15.1f} {rate / base_rate:8.2f}")
  return results


def main(argv: list[str]):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
  parser.add_argument("--batch", type=int)
  parser.add_argument("--prompt-length", type=int)
  parser.add_argument("--new-tokens", type=int)
  parser.add_argument("--repeats", type=int)
  parser.add_argument("--variants", type=lambda s: tuple(s.split(",")), help=f"comma-separated, of {list(VARIANTS)}")
  parser.add_argument("rest", nargs="*", help="an optional config path, then key=value overrides")
  args = parser.parse_args(argv)
  rest = list(args.rest)
  config_path = rest.pop(0) if rest and "=" not in rest[0] else "MaxText/configs/base.yml"
  # The process set up as the entry points' is (reuse_host_memory on CPU) before JAX starts.
  startup.start(["", config_path, *BASE, *rest])
  run(
      args.preset,
      rest,
      config_path,
      batch=args.batch,
      prompt_length=args.prompt_length,
      new_tokens=args.new_tokens,
      repeats=args.repeats,
      variants=args.variants,
  )


if __name__ == "__main__":
  main(sys.argv[1:])
