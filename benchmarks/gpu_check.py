"""The GPU checks of benchmarks/gpu_check.sh, one section per call: `python3 benchmarks/gpu_check.py SECTION`.

Sections (each prints one or more `| name | value | target | status |` table rows to stdout):
  attention  cuDNN flash attention (attention=autoselected) against the dot_product reference: forward and gradients,
             causal with packed segments, bf16, GQA; also that cuDNN was actually chosen (its custom call is in the HLO)
  train      training MFU of configs/gpu/llama3.2-1b-1xh100.yml (~1.2B params, seq 2048) against the data-sheet peak
  decode     decode tokens/s at batch 1 and 32 against the HBM-bandwidth roofline (weights + KV cache read per step)
GPU_CHECK_SMOKE=1 runs the same code at tiny sizes on whatever backend is present (CPU in CI): numbers are then
meaningless, but every line of the script runs.
"""

import os
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
# pylint: disable=wrong-import-position
import train_benchmark  # noqa: E402
from MaxText import metrics, pyconfig  # noqa: E402
from MaxText.layers import attentions  # noqa: E402
from MaxText.layers.ops import attention as attention_kernels  # noqa: E402

# pylint: enable=wrong-import-position

REPO = pathlib.Path(__file__).resolve().parents[1]
SMOKE = os.environ.get("GPU_CHECK_SMOKE", "0") == "1"
TRAIN_CONFIG = REPO / "configs" / "gpu" / "llama3.2-1b-1xh100.yml"
# Tiny dims for GPU_CHECK_SMOKE=1 (same code path, CPU-sized).
SMOKE_MODEL = [
    "base_emb_dim=64",
    "base_num_query_heads=4",
    "base_num_kv_heads=2",
    "head_dim=16",
    "base_mlp_dim=128",
    "base_num_decoder_layers=2",
    "vocab_size=256",
    "max_target_length=128",
    "per_device_batch_size=2",
]


def row(name: str, value: str, target: str = "", ok: bool | None = None):
  status = "" if ok is None else ("ok" if ok else "MISS")
  print(f"| {name} | {value} | {target} | {status} |", flush=True)


def check_attention():
  """cuDNN vs the einsum reference on packed, causal, GQA bf16 inputs: outputs and all three gradients."""
  b, s, hq, hkv, d = (2, 128, 4, 2, 16) if SMOKE else (2, 2048, 16, 8, 128)
  keys = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(keys[0], (b, s, hq, d), jnp.bfloat16)
  k = jax.random.normal(keys[1], (b, s, hkv, d), jnp.bfloat16)
  v = jax.random.normal(keys[2], (b, s, hkv, d), jnp.bfloat16)
  cut = s // 3
  seg = jnp.broadcast_to(jnp.where(jnp.arange(s) < cut, 1, 2), (b, s)).astype(jnp.int32)
  index = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
  mask = attentions.attention_mask(seg, seg, index, index)
  scale = d**-0.5
  reason = attention_kernels.cudnn_unsupported_reason(
      q,
      k,
      backend=jax.default_backend(),
      compute_capability=attention_kernels._compute_capability(),  # pylint: disable=protected-access
      has_segments=True,
  )
  row("attention: cuDNN eligible", "yes" if reason is None else f"no ({reason})", "yes", reason is None or SMOKE)

  def fused(q, k, v):
    return attention_kernels.autoselected_attention(q, k, v, seg, scale=scale)

  def reference(q, k, v):  # float32 reference
    return attentions.dot_product_attention(
        q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), mask, scale=scale
    )

  def loss(fn):
    return lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * jnp.cos(jnp.arange(d, dtype=jnp.float32)))

  lowered = jax.jit(jax.grad(loss(fused), argnums=(0, 1, 2))).lower(q, k, v)
  hlo = lowered.compile().as_text()
  used = "cudnn" in hlo.lower() and "fmha" in hlo.lower()
  row("attention: cuDNN kernel in compiled HLO", str(used), "True", used or SMOKE)
  out, want = jax.jit(fused)(q, k, v), jax.jit(reference)(q, k, v)
  err = float(jnp.max(jnp.abs(out.astype(jnp.float32) - want)))
  row("attention: max |out - ref| (bf16)", f"{err:.4f}", "< 0.05", err < 0.05)
  got_g = jax.jit(jax.grad(loss(fused), argnums=(0, 1, 2)))(q, k, v)
  want_g = jax.jit(jax.grad(loss(reference), argnums=(0, 1, 2)))(q, k, v)
  for name, g, w in zip("qkv", got_g, want_g):
    rel = float(jnp.linalg.norm(g.astype(jnp.float32) - w) / (jnp.linalg.norm(w) + 1e-12))
    row(f"attention: d{name} relative error", f"{rel:.4f}", "< 0.02", rel < 0.02)
  # Speed of the two kernels (fwd+bwd), same inputs.
  for name, fn in (("cudnn" if reason is None else "xla fallback", fused), ("dot_product", reference)):
    step = jax.jit(jax.grad(loss(fn), argnums=(0, 1, 2)))
    jax.block_until_ready(step(q, k, v))
    times = []
    for _ in range(5):
      start = time.perf_counter()
      jax.block_until_ready(step(q, k, v))
      times.append(time.perf_counter() - start)
    row(f"attention fwd+bwd ms: {name}", f"{1e3 * statistics.median(times):.2f}")


def check_train():
  overrides = [*train_benchmark.QUIET, *(SMOKE_MODEL if SMOKE else [])]
  if SMOKE and jax.default_backend() == "cpu":
    overrides += ["hardware=cpu"]
  config = pyconfig.initialize_or_exit(["", str(TRAIN_CONFIG), *overrides])
  result = train_benchmark.run(config, steps=3 if SMOKE else 10, warmup=1 if SMOKE else 3)
  peak = metrics.device_peak_tflops(config)
  params = f"{config.emb_dim}x{config.num_decoder_layers}L seq {config.max_target_length}"
  row(f"train {params}: tokens/s/device", f"{result['tokens_per_sec'] / jax.device_count():.0f}")
  row("train: TFLOP/s/device", f"{result['tflops_per_sec_per_device']:.1f}")
  if peak:
    mfu = result["tflops_per_sec_per_device"] / peak
    row(f"train: MFU vs {peak:.0f} TFLOP/s", f"{100 * mfu:.1f}%", ">= 50%", mfu >= 0.5)
  else:
    row("train: MFU", "n/a (no documented peak for this device)")
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    row("train: peak device memory GiB", f"{stats['peak_bytes_in_use'] / 2**30:.1f}")


def _decode_bytes_per_step(config, params, batch: int, cache_len: int) -> int:
  """Bytes a generate step must read: every parameter once, plus the filled KV cache of every row."""
  weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
  kv_bytes = 2 * config.num_decoder_layers * config.num_kv_heads * config.head_dim * jnp.dtype(config.dtype).itemsize
  return weight_bytes + batch * cache_len * kv_bytes


def check_decode():
  from decode_benchmark import MaxTextRunner  # pylint: disable=import-outside-toplevel

  prompt, new = (16, 8) if SMOKE else (1024, 128)
  overrides = [
      *train_benchmark.QUIET,
      *(SMOKE_MODEL if SMOKE else []),
      f"max_target_length={prompt + new}",
      f"max_prefill_predict_length={prompt}",
      "weight_dtype=bfloat16",
      "decode_sampling_strategy=greedy",
  ]
  if SMOKE and jax.default_backend() == "cpu":
    overrides += ["hardware=cpu"]
  config = pyconfig.initialize_or_exit(["", str(TRAIN_CONFIG), *overrides])
  gbps = metrics.device_hbm_gbps(jax.devices()[0].device_kind)
  for batch in (1, 32):
    runner = MaxTextRunner(config, batch, prompt, new)
    rates = [runner.measure()["generate"] for _ in range(3)]
    tokens_per_sec = statistics.median(rates)
    # The cache holds prompt .. prompt + new tokens during generation: the mean is what a step reads.
    step_bytes = _decode_bytes_per_step(config, runner.params, batch, prompt + new // 2)
    row(f"decode batch {batch}: tokens/s", f"{tokens_per_sec:.0f}")
    if gbps:
      roofline = batch * gbps * 1e9 / step_bytes
      frac = tokens_per_sec / roofline
      target = ">= 70%" if batch == 1 else ""
      row(
          f"decode batch {batch}: % of HBM roofline ({roofline:.0f} tok/s)",
          f"{100 * frac:.1f}%",
          target,
          frac >= 0.7 if batch == 1 else None,
      )
    else:
      row(f"decode batch {batch}: % of HBM roofline", "n/a (no bandwidth on record for this device)")


def main(argv):
  sections = {"attention": check_attention, "train": check_train, "decode": check_decode}
  if len(argv) != 1 or argv[0] not in sections:
    raise SystemExit(f"usage: gpu_check.py {{{'|'.join(sections)}}}")
  np.set_printoptions(precision=4)
  sections[argv[0]]()


if __name__ == "__main__":
  main(sys.argv[1:])
