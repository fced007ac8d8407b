"""One command for a config's training and decode throughput, MFU and memory, optionally side by side with HF.

  python3 benchmarks/run.py [--config configs/cpu/llama-small.yml] [--train] [--decode] [--vs hf] [--vs hf-compile]
      [--rounds 3] [--steps 2] [--batch-sizes 1 8] [key=value ...]

Neither --train nor --decode runs both. Training: median step time over `--rounds` rounds of `--steps` steps, tokens/s,
TFLOP/s/device (analytic model FLOPs, as the train loop counts them), MFU against the device's documented peak
(metrics.py's table) or, on CPU, against the f32/bf16 matmul ceiling measured in this process, the compiled step's
memory (arguments, temporaries) and the peak device memory (memory_stats) or, on CPU, the process's peak RSS.
`--vs hf` builds the same model in Hugging Face transformers (torch, 2 threads; dims from the checkpoint converter's
mapping) and alternates rounds with it, so a shared machine's load hits both alike, then prints the ratios;
`--vs hf-compile` (training only) adds the same model with its forward/backward and optimizer update compiled by
torch.compile (inductor), and `--vs hf --vs hf-compile` runs all three side by side.
CPU-s/step (process CPU time per step) is printed too: on a loaded machine it moves less than wall time.
Decode reuses benchmarks/decode_benchmark.py (prefill and generate tokens/s, HF generate with --vs hf).
"""

import argparse
import os
import pathlib
import resource
import statistics
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
# pylint: disable=wrong-import-position
import decode_benchmark  # noqa: E402
import train_benchmark  # noqa: E402
from MaxText import metrics, startup  # noqa: E402

# pylint: enable=wrong-import-position

REPO = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "configs" / "cpu" / "llama-small.yml"
# --vs choices and the names their rows carry.
PEERS = {"hf": "HF torch", "hf-compile": "HF compile"}


def _cpu_seconds() -> float:
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def peak_memory_bytes() -> tuple[int, str]:
  """(bytes, what they are): the device allocator's peak where it reports one, else this process's peak RSS."""
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    return int(stats["peak_bytes_in_use"]), "device peak_bytes_in_use"
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process peak RSS (host)"


def mfu_reference(config) -> tuple[float, str]:
  """(TFLOP/s, label) that MFU is taken against: the documented peak, else (CPU) the measured matmul ceiling."""
  peak = metrics.device_peak_tflops(config)
  if peak:
    return peak, f"documented peak {peak} TFLOP/s"
  dtype = jnp.dtype(config.dtype)
  ceiling = train_benchmark.matmul_ceiling_tflops(dtype)
  return ceiling, f"measured {dtype.name} 2048^3 matmul ceiling {ceiling:.4f} TFLOP/s"


def _round(runner, steps: int) -> tuple[float, float]:
  """(median step seconds, CPU seconds per step) of one round."""
  cpu = _cpu_seconds()
  times = runner.measure(steps)
  return statistics.median(times), (_cpu_seconds() - cpu) / steps


def bench_train(config, args) -> dict:
  """Interleaved rounds of MaxText (and HF) training steps; prints and returns the medians."""
  runners = {"MaxText": train_benchmark.MaxTextTrainRunner(config)}
  print(f"MaxText train step compiled in {runners['MaxText'].compile_seconds:.1f} s", flush=True)
  if args.vs:
    import hf_peer  # pylint: disable=import-outside-toplevel

    for peer in args.vs:
      name = PEERS[peer]
      runners[name] = hf_peer.HFTrainRunner(config, threads=args.hf_threads, compiled=peer == "hf-compile")
      print(f"{name} warm-up took {runners[name].warmup_seconds:.1f} s", flush=True)
  runners["MaxText"].measure(2)  # warm-up: the first steps also grow the host heap to its steady size
  rounds = {name: [] for name in runners}
  for r in range(args.rounds):
    for name, runner in runners.items():
      rounds[name].append(_round(runner, args.steps))
      print(f"  round {r + 1}: {name} {rounds[name][-1][0]:.2f} s/step", flush=True)
  tflops_per_step = metrics.training_tflops_per_device(config)[0]
  reference, reference_label = mfu_reference(config)
  results = {}
  for name, runner in runners.items():
    step = statistics.median(t for t, _ in rounds[name])
    cpu = statistics.median(c for _, c in rounds[name])
    # Both systems do the same model math, so the same analytic FLOPs give comparable TFLOP/s.
    results[name] = {
        "step_seconds": step,
        "cpu_seconds_per_step": cpu,
        "tokens_per_sec": runner.tokens_per_step / step,
        "tflops_per_sec_per_device": tflops_per_step / step,
        "mfu": tflops_per_step / step / reference,
    }
  print(
      f"\ntraining {config.model_name} ({config.dtype.name}, remat {config.remat_policy}, scan {config.scan_layers},"
      f" attention {config.attention}), {runners['MaxText'].tokens_per_step} tokens/step;"
      f" medians of {args.rounds} rounds x {args.steps} steps; MFU vs {reference_label}"
  )
  header = f"{'system':<13} | {'s/step':>7} | {'tokens/s':>9} | {'TFLOP/s/dev':>11} | {'MFU':>6} | {'CPU-s/step':>10}"
  print(header + "\n" + "-" * len(header))
  for name, r in results.items():
    print(
        f"{name:<13} | {r['step_seconds']:>7.2f} | {r['tokens_per_sec']:>9.1f} | {r['tflops_per_sec_per_device']:>11.4f}"
        f" | {100 * r['mfu']:>5.1f}% | {r['cpu_seconds_per_step']:>10.2f}"
    )
  ours = results["MaxText"]
  for peer in args.vs:
    theirs = results[PEERS[peer]]
    print(
        f"{'vs ' + peer:<13} | {'':>7} | {ours['tokens_per_sec'] / theirs['tokens_per_sec']:>8.2f}x |"
        f" {'':>11} | {'':>6} | {theirs['cpu_seconds_per_step'] / ours['cpu_seconds_per_step']:>9.2f}x"
    )
  mem = runners["MaxText"].compiled.memory_analysis()
  if mem is not None:
    mib = 2**20
    print(
        f"MaxText compiled step memory per device: arguments {mem.argument_size_in_bytes / mib:.1f} MiB,"
        f" temporaries {mem.temp_size_in_bytes / mib:.1f} MiB"
    )
  return results


def bench_decode(config_path: str, overrides: list[str], args):
  argv = ["decode_benchmark", "--batch-sizes", *map(str, args.batch_sizes), "--repeats", str(args.rounds)]
  argv += [] if "hf" in args.vs else ["--skip-hf"]
  print(f"\ndecode ({' '.join(argv[1:])})", flush=True)
  decode_benchmark.main([*argv, config_path, *overrides])


def main(argv):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default=str(DEFAULT_CONFIG))
  parser.add_argument("--train", action="store_true")
  parser.add_argument("--decode", action="store_true")
  parser.add_argument(
      "--vs", action="append", choices=list(PEERS), default=None, help="also run this peer on the same model (repeatable)"
  )
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--steps", type=int, default=2, help="training steps per round")
  parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8], help="decode batch sizes")
  parser.add_argument("--hf-threads", type=int, default=2)
  parser.add_argument("overrides", nargs="*", help="key=value config overrides")
  args = parser.parse_args(argv)
  args.vs = list(dict.fromkeys(args.vs or []))  # each peer once, in the order given
  both = not (args.train or args.decode)
  # The config first: it sets the process up for the backend (reuse_host_memory) before JAX starts.
  config = None
  if args.train or both:
    config = startup.start(["", args.config, *train_benchmark.QUIET, *args.overrides])
  n_dev = jax.device_count()
  print(
      f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; jax {jax.__version__}; {jax.devices()[0].device_kind}"
      f" x {n_dev}; {os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.1f}; config {args.config}"
      f" {' '.join(args.overrides)}",
      flush=True,
  )
  if config is not None:
    bench_train(config, args)
  if args.decode or both:
    bench_decode(args.config, args.overrides, args)
  peak, what = peak_memory_bytes()
  print(f"\npeak memory: {peak / 2**30:.2f} GiB ({what}); load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
  main(sys.argv[1:])
