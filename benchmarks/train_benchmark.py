"""Training throughput and MFU of a config on this machine, against its measured matmul ceiling.

  python3 benchmarks/train_benchmark.py [--steps 10] [--warmup 2] [CONFIG] [key=value ...]

Defaults to configs/cpu/llama-small.yml (vocab 32000, emb 512, 8 layers, 8 heads x 64, mlp 1408, seq 512,
global batch 8, f32, remat none) on synthetic data. Prints the median step time over `--steps` steps after
`--warmup`, tokens/s, TFLOP/s per device (analytic, as the train loop counts them) and MFU against both the
device's data-sheet peak (if known) and the f32/bf16 matmul ceiling measured in this same process.
"""

import argparse
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp

from MaxText import metrics, pyconfig, sharding, startup, training
from MaxText.layers.ops import matmul

REPO = pathlib.Path(__file__).resolve().parents[1]

QUIET = [
    "dataset_type=synthetic",
    "enable_checkpointing=false",
    "enable_tensorboard=false",
    "write_metrics_to_run_dir=false",
    "save_config_to_output=false",
    "log_config=false",
]


def matmul_ceiling_tflops(dtype, n: int = 2048, repeats: int = 10) -> float:
  """Median TFLOP/s of one n x n x n matmul on device 0: the practical ceiling for dense model math. Sub-32-bit
  inputs accumulate in float32, as the model's matmuls do (on XLA:CPU a bf16 dot with bf16 results is 3-7x slower)."""
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  b = jax.random.normal(jax.random.key(1), (n, n), dtype)
  f = jax.jit(lambda x, y: jnp.matmul(x, y, preferred_element_type=matmul.accumulate_dtype(dtype)))
  f(a, b).block_until_ready()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    f(a, b).block_until_ready()
    times.append(time.perf_counter() - start)
  return 2 * n**3 / statistics.median(times) / 1e12


class MaxTextTrainRunner:
  """The compiled train step of a config on synthetic data, its state kept between measurements."""

  def __init__(self, config):
    from MaxText import input_pipeline  # pylint: disable=import-outside-toplevel

    self.config = config
    self.mesh = sharding.create_mesh(config)
    setup = training.TrainSetup(config, self.mesh)
    with sharding.use_mesh(self.mesh, config.logical_axis_rules):
      data, _ = input_pipeline.create_data_iterators(config, self.mesh)
      self.batch = next(data)
      step_fn, _, _ = training.compile_train_step(setup, self.batch)
      self.state = setup.init_state()
      self.frozen = (setup.load_frozen(),) if setup.has_frozen else ()  # LoRA base or DPO reference
      start = time.perf_counter()
      self.compiled = step_fn.lower(self.state, self.batch, *self.frozen).compile()
      self.compile_seconds = time.perf_counter() - start
    self.tokens_per_step = config.global_batch_size_to_train_on * config.max_target_length
    self.loss = float("nan")

  def measure(self, steps: int) -> list[float]:
    """Seconds of each of `steps` training steps (each waits for its own result)."""
    times = []
    with sharding.use_mesh(self.mesh, self.config.logical_axis_rules):
      for _ in range(steps):
        start = time.perf_counter()
        self.state, m = self.compiled(self.state, self.batch, *self.frozen)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - start)
        self.loss = float(m["learning/loss"])
    return times


def run(config, steps: int, warmup: int) -> dict:
  runner = MaxTextTrainRunner(config)
  runner.measure(warmup)
  step_time = statistics.median(runner.measure(steps))
  tflops_per_device = metrics.training_tflops_per_device(config)[0]
  return {
      "compile_seconds": runner.compile_seconds,
      "step_seconds": step_time,
      "tokens_per_sec": runner.tokens_per_step / step_time,
      "tflops_per_sec_per_device": tflops_per_device / step_time,
      "loss": runner.loss,
      "memory": runner.compiled.memory_analysis(),
  }


def main(argv):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("config", nargs="?", default=str(REPO / "configs" / "cpu" / "llama-small.yml"))
  parser.add_argument("overrides", nargs="*")
  args = parser.parse_args(argv)
  config = startup.start(["", args.config, *QUIET, *args.overrides])  # sets the process up before JAX starts
  n_dev = jax.device_count()
  if not any(o.startswith("per_device_batch_size=") for o in args.overrides) and n_dev != 1:
    # Keep llama-small's global batch of 8 on any device count.
    config = pyconfig.initialize_or_exit(["", args.config, *QUIET, f"per_device_batch_size={8 / n_dev}", *args.overrides])
  ceilings = {d: matmul_ceiling_tflops(jnp.dtype(d)) for d in ("float32", "bfloat16")}
  result = run(config, args.steps, args.warmup)
  peak = metrics.device_peak_tflops(config)
  ceiling = ceilings[config.dtype.name] if config.dtype.name in ceilings else ceilings["float32"]
  mem = result["memory"]
  print(f"device: {jax.devices()[0].device_kind} x {n_dev}, dtype {config.dtype.name}, remat {config.remat_policy}")
  print(
      f"matmul ceiling (measured, 2048^3): f32 {ceilings['float32']:.4f} TFLOP/s, bf16 {ceilings['bfloat16']:.4f} TFLOP/s"
  )
  print(
      f"compile: {result['compile_seconds']:.1f} s; median step: {result['step_seconds']:.3f} s over {args.steps} steps"
  )
  print(f"tokens/s: {result['tokens_per_sec']:.1f}; TFLOP/s/device: {result['tflops_per_sec_per_device']:.4f}")
  achieved = result["tflops_per_sec_per_device"]
  print(f"MFU vs measured {config.dtype.name} matmul ceiling: {100 * achieved / ceiling:.1f}%")
  print(f"MFU vs measured f32 ceiling: {100 * achieved / ceilings['float32']:.1f}%")
  if peak:
    print(f"MFU vs data-sheet peak {peak} TFLOP/s: {100 * result['tflops_per_sec_per_device'] / peak:.1f}%")
  if mem is not None:
    mib = 2**20
    args_mib, temps_mib = mem.argument_size_in_bytes / mib, mem.temp_size_in_bytes / mib
    print(f"memory per device: args {args_mib:.1f} MiB, temps {temps_mib:.1f} MiB")
  print(f"final loss {result['loss']:.3f}")


if __name__ == "__main__":
  main(sys.argv[1:])
