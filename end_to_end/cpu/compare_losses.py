"""Compares the losses of two metrics.jsonl files on the steps they share: end_to_end/cpu scripts' checker.

  python3 end_to_end/cpu/compare_losses.py REFERENCE.jsonl OTHER.jsonl [--min_steps N] [--rtol 1e-5]
"""

import argparse
import json
import sys


def losses(path):
  with open(path, encoding="utf-8") as f:
    return {r["step"]: r["learning/loss"] for r in map(json.loads, f) if "learning/loss" in r}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("reference")
  parser.add_argument("other")
  parser.add_argument("--min_steps", type=int, default=1)
  parser.add_argument("--rtol", type=float, default=1e-5)
  args = parser.parse_args()
  ref, other = losses(args.reference), losses(args.other)
  shared = sorted(set(ref) & set(other))
  if len(shared) < args.min_steps:
    print(f"FAIL: only {len(shared)} shared steps (need {args.min_steps})")
    sys.exit(1)
  worst = max(abs(ref[s] - other[s]) / max(abs(ref[s]), 1e-12) for s in shared)
  status = "OK" if worst <= args.rtol else "FAIL"
  print(f"{status}: {len(shared)} steps ({shared[0]}..{shared[-1]}) compared, max relative loss difference {worst:.2e} (rtol {args.rtol})")
  sys.exit(0 if status == "OK" else 1)


if __name__ == "__main__":
  main()
