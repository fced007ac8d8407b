"""XLA flags every test process runs with: the pytest workers (conftest.py) and the training/decoding subprocesses
tests start. Kept free of jax imports: conftest must set XLA_FLAGS before jax initializes its backend."""

import os

# Tests check behaviour and numerics, not speed. On the tiny test models LLVM's backend optimizations cost more
# compile time than they save at run time (a resume test: 52 s -> 28 s); HLO passes (fusion, SPMD partitioning)
# still run, and TPU AOT compiles report the same memory and collectives with it. XLA:CPU's MLIR fusion emitters
# take 2.6x the compile time of its elemental emitters on these programs (a tiny 8-device train step: 4.2 s -> 1.6 s
# of backend compile; test_paged_attention + test_lora: 515 s -> 289 s with two workers).
_FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
# XLA:CPU aborts the process when a collective's devices do not all reach it within its timeout. On the 2-core CI
# machine two pytest workers plus the multi-process tests' children run 8+ device threads per process, so a device
# thread can be starved long enough to trip it (a CI train step died once with a silent SIGABRT, the abort this
# watchdog raises); allow 15 minutes.
_TIMEOUTS = "--xla_cpu_collective_call_terminate_timeout_seconds=900 --xla_cpu_collective_timeout_seconds=900"
FLAGS = f"{_FAST_COMPILE} {_TIMEOUTS}"


def cpu_env(devices: int, base=None, **extra) -> dict:
  """Environment for a CPU subprocess with `devices` simulated devices and the test XLA flags."""
  env = dict(os.environ if base is None else base, **extra)
  env["JAX_PLATFORMS"] = "cpu"
  env["XLA_FLAGS"] = f"{FLAGS} --xla_force_host_platform_device_count={devices}"
  return env
