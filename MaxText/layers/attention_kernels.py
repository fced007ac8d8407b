"""Fused attention kernels for train/prefill self-attention, chosen by `attention` and the backend.

- `attention=autoselected`: `jax.nn.dot_product_attention` with implementation "cudnn" (flash attention) on an NVIDIA
  GPU when cuDNN's constraints hold, else "xla"; the reason for falling back is logged once.
- `attention=flash`: the Pallas splash-attention kernel (`jax.experimental.pallas.ops.tpu`) on TPU only.

Both take query [B,S,Hq,D], key/value [B,S,Hkv,D] of one aligned sequence, causal, with optional packed-segment ids
([B,S], 0 = padding) and an optional sliding window, and return [B,S,Hq,D].
"""

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np

logger = logging.getLogger("MaxText")

_LOGGED: set[str] = set()
_CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)


def _log_once(message: str):
  if message not in _LOGGED:
    _LOGGED.add(message)
    logger.info(message)


def _compute_capability() -> tuple[int, ...] | None:
  """The first GPU's CUDA compute capability, or None when it has none (CPU, TPU, ROCm)."""
  capability = getattr(jax.devices()[0], "compute_capability", None)
  if not capability:
    return None
  return tuple(int(x) for x in str(capability).split("."))


def cudnn_unsupported_reason(
    query: jax.Array,
    key: jax.Array,
    *,
    backend: str,
    compute_capability: tuple[int, ...] | None,
    has_segments: bool,
) -> str | None:
  """Why cuDNN flash attention cannot run these inputs (None when it can): backend, dtype, head dim, length, GPU."""
  if backend != "gpu":
    return f"backend is {backend!r}, not 'gpu'"
  if compute_capability is None:
    return "the GPU reports no CUDA compute capability (not an NVIDIA GPU)"
  if compute_capability < (8, 0):
    return f"compute capability {compute_capability} is below 8.0 (Ampere)"
  if query.dtype not in _CUDNN_DTYPES or key.dtype not in _CUDNN_DTYPES:
    return f"dtype {jnp.dtype(query.dtype).name} (cuDNN flash attention needs bfloat16 or float16: set dtype)"
  head_dim = query.shape[-1]
  head_max = 256 if compute_capability >= (9, 0) else 128
  if head_dim > head_max or head_dim % 8:
    return f"head_dim {head_dim} (cuDNN needs a multiple of 8 up to {head_max} on this GPU)"
  if has_segments and query.shape[1] % 2:
    return f"sequence length {query.shape[1]} is odd (cuDNN's masked training kernel needs an even length)"
  return None


def autoselected_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    segment_ids: jax.Array | None,
    *,
    scale: float,
    sliding_window_size: int = 0,
) -> jax.Array:
  """Causal self-attention through `jax.nn.dot_product_attention`: cuDNN where it can run, XLA otherwise.

  Causality and the window are flags (cuDNN skips the masked blocks); packed segments become a [B,1,S,S] mask.
  Logits are float32 inside either implementation whatever the input dtype.
  """
  key, value = key.astype(query.dtype), value.astype(query.dtype)
  mask = None
  if segment_ids is not None:
    mask = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None, :, :]
  backend = jax.default_backend()
  reason = cudnn_unsupported_reason(
      query,
      key,
      backend=backend,
      compute_capability=_compute_capability() if backend == "gpu" else None,
      has_segments=mask is not None,
  )
  implementation = "cudnn" if reason is None else "xla"
  _log_once(
      "attention=autoselected: cuDNN flash attention"
      if reason is None
      else f"attention=autoselected: XLA attention, because {reason}"
  )
  return jax.nn.dot_product_attention(
      query,
      key,
      value,
      mask=mask,
      scale=scale,
      is_causal=True,
      local_window_size=(sliding_window_size - 1, 0) if sliding_window_size > 0 else None,
      implementation=implementation,
  )


def check_flash_backend(backend: str):
  """attention=flash runs only on TPU: a clear error elsewhere rather than a Mosaic lowering failure."""
  if backend != "tpu":
    raise ValueError(
        f"attention=flash: the Pallas splash-attention kernel runs on TPU only, but the backend is {backend!r};"
        " use attention=autoselected (cuDNN on GPU) or attention=dot_product"
    )


@functools.lru_cache(maxsize=32)
def _splash_kernel(num_heads: int, seq_len: int, sliding_window_size: int, block: int, interpret: bool):
  # Imported lazily: Pallas' TPU ops are only needed (and only lower) on TPU.
  from jax.experimental.pallas.ops.tpu.splash_attention import (  # pylint: disable=import-outside-toplevel
      splash_attention_kernel as kernel_lib,
      splash_attention_mask as mask_lib,
  )

  shape = (seq_len, seq_len)
  if sliding_window_size > 0:
    one = mask_lib.LocalMask(shape, window_size=(sliding_window_size - 1, 0), offset=0)
  else:
    one = mask_lib.CausalMask(shape)
  blocks = kernel_lib.BlockSizes(
      block_q=block,
      block_kv=block,
      block_kv_compute=block,
      block_q_dkv=block,
      block_kv_dkv=block,
      block_kv_dkv_compute=block,
      block_q_dq=block,
      block_kv_dq=block,
  )
  return kernel_lib.make_splash_mha(
      mask_lib.MultiHeadMask([one] * num_heads),
      block_sizes=blocks,
      head_shards=1,
      q_seq_shards=1,
      interpret=interpret,
  )


def splash_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    segment_ids: jax.Array | None,
    *,
    scale: float,
    sliding_window_size: int = 0,
    block_size: int = 512,
    interpret: bool = False,
    platform: str | None = None,
) -> jax.Array:
  """Causal self-attention with the Pallas TPU splash kernel (`interpret=True` runs it on CPU, for tests).

  The kernel wants [heads, seq, head_dim] per row and unscaled logits, so the query is scaled first and the batch is
  vmapped. Grouped kv heads are repeated up to the query heads (splash's MHA kernel takes equal head counts).
  `platform` (default: the running backend) is the one the call lowers for, e.g. "tpu" under jax.export.
  """
  if not interpret:
    check_flash_backend(platform or jax.default_backend())
  _, s, num_q, _ = query.shape
  num_kv = key.shape[2]
  if num_q % num_kv:
    raise ValueError(f"{num_q} query heads are not a multiple of {num_kv} kv heads")
  block = min(block_size, s)
  if s % block:
    raise ValueError(f"attention=flash: sequence length {s} is not a multiple of the kernel block {block}")
  kernel = _splash_kernel(num_q, s, sliding_window_size, block, interpret)
  q = (query * jnp.asarray(scale, query.dtype)).transpose(0, 2, 1, 3)
  k = jnp.repeat(key.astype(query.dtype), num_q // num_kv, axis=2).transpose(0, 2, 1, 3)
  v = jnp.repeat(value.astype(query.dtype), num_q // num_kv, axis=2).transpose(0, 2, 1, 3)
  if segment_ids is None:
    out = jax.vmap(kernel)(q, k, v)
  else:
    from jax.experimental.pallas.ops.tpu.splash_attention import (  # pylint: disable=import-outside-toplevel
        SegmentIds,
    )

    segments = SegmentIds(q=segment_ids.astype(np.int32), kv=segment_ids.astype(np.int32))
    out = jax.vmap(lambda q_, k_, v_, seg: kernel(q_, k_, v_, segment_ids=seg))(q, k, v, segments)
  return out.transpose(0, 2, 1, 3)
