"""MoE layer throughput (forward + backward) against a dense MLP layer with the same active parameters.

  python3 benchmarks/moe_benchmark.py [--tokens 4096] [--emb 512] [--experts 8] [--top-k 2] [--expert-mlp 512]
                                      [--repeats 10] [--dtype float32]

The dense baseline is the gated MLP of width top_k * expert_mlp, so every token does the same multiply-adds in
both (the MoE adds its router). Variants: dropless (sorted tokens + jax.lax.ragged_dot, or the CPU path of
MaxText/layers/ops/grouped_matmul.py: batched blocks per expert) and capacity-limited
(one-hot dispatch/combine einsums) at capacity factors 1.0 and 2.0; and two floors: the experts' three
projections alone as batched einsums over even blocks and over blocks that hold the largest expert. Runs are
interleaved round-robin and each row reports the median step time, tokens/s, the ratio to the dense layer measured
in the same process, and the first call's time (compile + one step).
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx

from MaxText import pyconfig, startup
from MaxText.layers.linears import MlpBlock
from MaxText.layers.moe import MoeBlock


def _config(args, **kw) -> pyconfig.Config:
  return pyconfig.initialize(
      ["", str(pyconfig.CONFIGS_DIR / "base.yml")],
      log_config=False,
      base_emb_dim=args.emb,
      num_experts=args.experts,
      num_experts_per_tok=args.top_k,
      moe_mlp_dim=args.expert_mlp,
      dtype=args.dtype,
      weight_dtype=args.dtype,
      **kw,
  )


def _step_fn(module):
  """jit(fwd + bwd) of sum(y^2) with respect to the module's params and the input."""
  graphdef, params, rest = nnx.split(module, nnx.Param, ...)

  def loss(params, x):
    y = nnx.merge(graphdef, params, rest)(x)
    y = y[0] if isinstance(y, tuple) else y  # the MoE block returns (output, aux)
    return jnp.sum(jnp.square(y.astype(jnp.float32)))

  grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
  return lambda x: grad(params, x)


def _expert_matmuls_step(args, block: int):
  """jit(fwd + bwd) of the experts' three projections alone on [experts, block, emb] rows (no router, no sort, no row
  movement): what a layer that multiplies every expert's rows as one `block`-row batch costs at least."""
  keys = jax.random.split(jax.random.key(1), 4)
  dtype = jnp.dtype(args.dtype)
  xe = jax.random.normal(keys[0], (args.experts, block, args.emb), dtype)
  w0, w1 = (jax.random.normal(k, (args.experts, args.emb, args.expert_mlp), dtype) / args.emb**0.5 for k in keys[1:3])
  wo = jax.random.normal(keys[3], (args.experts, args.expert_mlp, args.emb), dtype) / args.expert_mlp**0.5

  def loss(xe, w0, w1, wo):
    hidden = jax.nn.silu(jnp.einsum("gcd,gdn->gcn", xe, w0)) * jnp.einsum("gcd,gdn->gcn", xe, w1)
    return jnp.sum(jnp.square(jnp.einsum("gcn,gnd->gcd", hidden, wo).astype(jnp.float32)))

  grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))
  return lambda _x: grad(xe, w0, w1, wo)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n", maxsplit=1)[0])
  parser.add_argument("--tokens", type=int, default=4096, help="tokens per step (batch 8 x tokens/8)")
  parser.add_argument("--emb", type=int, default=512)
  parser.add_argument("--experts", type=int, default=8)
  parser.add_argument("--top-k", type=int, default=2)
  parser.add_argument("--expert-mlp", type=int, default=512)
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  args = parser.parse_args()
  # The process set up as MaxText.train's is (reuse_host_memory on CPU) before JAX starts: without it every step's
  # temporaries are fresh pages (the dense layer 81.7 against 70.9 ms here, the tiled MoE 121.6 against 98.2).
  startup.start(["", str(pyconfig.CONFIGS_DIR / "base.yml"), "log_config=False"])

  dense_cfg = _config(args)
  variants = {
      f"dense MLP (width {args.top_k * args.expert_mlp})": MlpBlock(
          args.emb,
          args.top_k * args.expert_mlp,
          dense_cfg.mlp_activations,
          rngs=nnx.Rngs(0),
          dtype=dense_cfg.dtype,
          weight_dtype=dense_cfg.weight_dtype,
      ),
      "MoE dropless (ragged_dot)": MoeBlock(
          _config(args, capacity_factor=-1.0, moe_grouped_matmul="ragged_dot"), rngs=nnx.Rngs(0)
      ),
      "MoE dropless (tiled)": MoeBlock(_config(args, capacity_factor=-1.0, moe_grouped_matmul="tiled"), rngs=nnx.Rngs(0)),
      "MoE capacity 1.0 (einsum)": MoeBlock(_config(args, capacity_factor=1.0), rngs=nnx.Rngs(0)),
      "MoE capacity 2.0 (einsum)": MoeBlock(_config(args, capacity_factor=2.0), rngs=nnx.Rngs(0)),
  }
  batch = 8
  x = jax.random.normal(jax.random.key(0), (batch, args.tokens // batch, args.emb), dense_cfg.dtype)
  steps = {name: _step_fn(module) for name, module in variants.items()}
  # How even the routing is: the dropless grouped matmuls' cost follows the largest expert's share.
  _, experts, _ = variants["MoE dropless (tiled)"].route(x.reshape(-1, args.emb))
  load = jnp.bincount(experts.reshape(-1), length=args.experts)
  # Floors for any layer built on equal blocks per expert: perfectly even rows, and blocks that hold this routing's
  # largest expert (rounded up to 8 rows).
  mean_rows = -(-args.tokens * args.top_k // args.experts)
  largest_rows = -(-int(load.max()) // 8) * 8
  steps[f"expert matmuls alone, {mean_rows}-row blocks"] = _expert_matmuls_step(args, mean_rows)
  steps[f"expert matmuls alone, {largest_rows}-row blocks"] = _expert_matmuls_step(args, largest_rows)
  first = {}
  for name, step in steps.items():  # compile and warm up
    start = time.perf_counter()
    jax.block_until_ready(step(x))
    first[name] = time.perf_counter() - start
  times = {name: [] for name in steps}
  for _ in range(args.repeats):
    for name, step in steps.items():
      start = time.perf_counter()
      jax.block_until_ready(step(x))
      times[name].append(time.perf_counter() - start)

  device = jax.devices()[0]
  print(
      f"device: {device.device_kind} ({jax.device_count()} x {device.platform}), dtype {args.dtype}, "
      f"{args.tokens} tokens/step, emb {args.emb}, {args.experts} experts top-{args.top_k} x {args.expert_mlp} "
      f"(largest expert load / mean {float(load.max() / load.mean()):.3f}); median of {args.repeats}, fwd+bwd"
  )
  base = statistics.median(times[next(iter(times))])
  print(f"{'layer':<44} {'median ms':>10} {'tokens/s':>12} {'vs dense':>9} {'first call s':>13}")
  for name, ts in times.items():
    median = statistics.median(ts)
    print(f"{name:<44} {1e3 * median:>10.2f} {args.tokens / median:>12.0f} {base / median:>8.2f}x {first[name]:>13.2f}")


if __name__ == "__main__":
  main()
