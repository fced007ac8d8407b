"""Fit table for published training recipes: each compiled by the real TPU compiler for its slice on this host.

  python3 benchmarks/aot_fit.py [--only NAME ...] [--out FILE.md]

Runs `python3 -m MaxText.train_compile MaxText/configs/base.yml KEY=VALUE ...` once per recipe (a fresh process
each, so one recipe's compile cannot change another's) and prints a markdown table: per-device memory and
whether it fits the chip's HBM, analytic and compiler TFLOPs, the collective bytes per step, and the compile time
on this machine. Needs libtpu (`DEVICE=tpu bash setup.sh`, or requirements-test.txt).
"""

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# name -> compile arguments. Batch is per chip; remat full unless a recipe says otherwise.
RECIPES = {
    "llama2-7b v5e-256": "model_name=llama2-7b compile_topology=v5e-256 max_target_length=2048 per_device_batch_size=1",
    "llama2-7b 2x v5e-256": (
        "model_name=llama2-7b compile_topology=v5e-256 compile_topology_num_slices=2 dcn_data_parallelism=2"
        " max_target_length=2048 per_device_batch_size=1"
    ),
    "llama3.1-8b v5p-128 flash": (
        "model_name=llama3.1-8b compile_topology=v5p-128 max_target_length=8192 per_device_batch_size=2 attention=flash"
    ),
    "llama3.1-70b v5p-512": (
        "model_name=llama3.1-70b compile_topology=v5p-512 max_target_length=4096 per_device_batch_size=1"
    ),
    "llama3.1-405b v5p-1024": (
        "model_name=llama3.1-405b compile_topology=v5p-1024 max_target_length=4096 per_device_batch_size=1"
    ),
    "mixtral-8x7b v5p-256": (
        "model_name=mixtral-8x7b compile_topology=v5p-256 max_target_length=4096 per_device_batch_size=1"
    ),
    "deepseek3-671b v5p-1024": (
        "model_name=deepseek3-671b compile_topology=v5p-1024 max_target_length=4096 per_device_batch_size=1"
    ),
    "gemma2-9b v6e-64": "model_name=gemma2-9b compile_topology=v6e-64 max_target_length=8192 per_device_batch_size=1",
    "gemma2-27b v6e-256": "model_name=gemma2-27b compile_topology=v6e-256 max_target_length=8192 per_device_batch_size=1",
    "qwen3-235b-a22b v5p-512": (
        "model_name=qwen3-235b-a22b compile_topology=v5p-512 max_target_length=4096 per_device_batch_size=1"
    ),
    # The settings that make the recipes above that do not fit, fit (benchmarks/RESULTS.md).
    "llama3.1-405b v5p-1024, batch 0.5/chip, tensor=2": (
        "model_name=llama3.1-405b compile_topology=v5p-1024 max_target_length=4096 per_device_batch_size=0.5"
        " ici_tensor_parallelism=2"
    ),
    "gemma2-27b v6e-256, batch 0.5/chip, tensor=2": (
        "model_name=gemma2-27b compile_topology=v6e-256 max_target_length=8192 per_device_batch_size=0.5"
        " ici_tensor_parallelism=2"
    ),
    "deepseek3-671b v5p-1024, expert=4, flash": (
        "model_name=deepseek3-671b compile_topology=v5p-1024 max_target_length=4096 per_device_batch_size=1"
        " attention=flash ici_expert_parallelism=4"
    ),
}
COMMON = "remat_policy=full log_config=false"

_MEM = re.compile(r"-> about ([0-9.]+) GiB of ([0-9.]+) GiB HBM: (fits|DOES NOT FIT)")
_ARGS = re.compile(r"arguments ([0-9.]+) GiB.*temporaries ([0-9.]+) GiB")
_FLOPS = re.compile(r"TFLOPs per step per device: ([0-9.]+) .*compiler's count ([0-9.]+|n/a)")
_COLL = re.compile(r"(all-gather|reduce-scatter|all-reduce|all-to-all|collective-permute) ([0-9.]+) GiB")
_PARAMS = re.compile(r"model \S+: ([0-9,]+) parameters")


def run(name: str, args: str, extra: str) -> dict:
  cmd = [sys.executable, "-m", "MaxText.train_compile", "MaxText/configs/base.yml", *f"{args} {COMMON} {extra}".split()]
  env = dict(os.environ, PYTHONPATH=str(REPO))
  start = time.perf_counter()
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=False)
  row = {"name": name, "command": "python3 -m MaxText.train_compile MaxText/configs/base.yml " + " ".join(cmd[4:])}
  row["seconds"] = time.perf_counter() - start
  out = proc.stdout
  if proc.returncode != 0:
    verdict = [line for line in out.splitlines() if line.startswith("DOES NOT FIT")]
    err = (verdict or proc.stderr.strip().splitlines() or ["?"])[-1]
    row["error"] = err[:300]
    return row
  mem, args_tmp, flops = _MEM.search(out), _ARGS.search(out), _FLOPS.search(out)
  row.update(
      params=_PARAMS.search(out).group(1),
      total=float(mem.group(1)),
      hbm=float(mem.group(2)),
      fits=mem.group(3) == "fits",
      arguments=float(args_tmp.group(1)),
      temp=float(args_tmp.group(2)),
      tflops=float(flops.group(1)),
      compiler_tflops=flops.group(2),
      collectives={k: float(v) for k, v in _COLL.findall(out)},
  )
  return row


def table(rows) -> str:
  lines = [
      "| recipe | params | GiB/device (args + temps) | HBM | fits | TFLOPs/step/device (compiler) |"
      " all-gather / reduce-scatter / all-reduce / all-to-all / permute GiB | compile s |",
      "|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    if "error" in r:
      lines.append(f"| {r['name']} | | failed: {r['error']} | | | | | {r['seconds']:.0f} |")
      continue
    c = r["collectives"]
    coll = " / ".join(
        f"{c.get(k, 0):.2f}" for k in ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
    )
    lines.append(
        f"| {r['name']} | {r['params']} | {r['total']:.2f} ({r['arguments']:.2f} + {r['temp']:.2f}) | {r['hbm']:.0f} |"
        f" {'yes' if r['fits'] else '**no**'} | {r['tflops']:.1f} ({r['compiler_tflops']}) | {coll} |"
        f" {r['seconds']:.0f} |"
    )
  lines.append("")
  lines += [f"- {r['name']}: `{r['command']}`" for r in rows]
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--only", nargs="*", help="recipe names (default: all)")
  parser.add_argument("--extra", default="", help="key=value arguments added to every recipe")
  parser.add_argument("--out", help="also write the table to this file")
  args = parser.parse_args()
  rows = []
  for name, recipe in RECIPES.items():
    if args.only and name not in args.only:
      continue
    rows.append(run(name, recipe, args.extra))
    print(f"{name}: {rows[-1].get('error') or 'ok'} ({rows[-1]['seconds']:.0f} s)", file=sys.stderr, flush=True)
  text = table(rows)
  print(text)
  if args.out:
    Path(args.out).write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
  main()
