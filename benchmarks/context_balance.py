"""Per-device causal attention FLOPs under context parallelism, with and without load balancing.

Analytic, from the mask each device's queries see (MaxText/context_parallel.causal_work): device i of n holds the
queries at slots [i S/n, (i+1) S/n) of the layout (natural order, or load-balanced: chunks i and 2n-1-i of 2n) and
attends over the all-gathered keys, computing only the unmasked query-key pairs (as a flash kernel does, to within a
block). A step waits for the busiest device, so max/mean is the attention slowdown versus perfect balance.

  python3 benchmarks/context_balance.py [--length 131072] [--heads 32] [--head-dim 128] [--window 0]
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from MaxText import context_parallel  # pylint: disable=wrong-import-position


def attention_tflops(pairs: int, heads: int, head_dim: int) -> float:
  """Forward + backward TFLOPs of `pairs` query-key pairs: q.k and p.v are 2 x 2 x head_dim each, backward 2x."""
  return 3 * 4 * head_dim * heads * pairs / 1e12


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--length", type=int, default=131072, help="tokens per sequence")
  parser.add_argument("--heads", type=int, default=32, help="query heads (Llama 3.1 8B: 32)")
  parser.add_argument("--head-dim", type=int, default=128)
  parser.add_argument("--window", type=int, default=0, help="sliding window (0 = full causal)")
  parser.add_argument("--shards", type=int, nargs="+", default=[2, 4, 8])
  args = parser.parse_args(argv)
  what = f"window {args.window}" if args.window else "full causal"
  print(f"sequence {args.length}, {args.heads} heads x {args.head_dim}, {what}; per layer, fwd+bwd, one sequence")
  print("| context n | layout | max TFLOPs/device | mean TFLOPs/device | min TFLOPs/device | max/mean |")
  print("|---|---|---|---|---|---|")
  for n in args.shards:
    for balanced in (False, True):
      work = context_parallel.causal_work(args.length, n, balanced, args.window)
      tf = [attention_tflops(int(w), args.heads, args.head_dim) for w in (work.max(), work.mean(), work.min())]
      layout = "load-balanced" if balanced else "contiguous"
      print(f"| {n} | {layout} | {tf[0]:.3f} | {tf[1]:.3f} | {tf[2]:.3f} | {work.max() / work.mean():.3f} |")


if __name__ == "__main__":
  main()
