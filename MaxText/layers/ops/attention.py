"""The attention core for one layer's queries, keys and values, chosen by `attention` and the backend.

- dot_product (the default; every backend): `dot_product_attention`, plain einsums under an explicit mask (packed
  segments, sliding windows, chunks, a KV cache's parts). `attention_causal_blocks` > 1 (the CPU default: 4)
  splits a causal sequence's queries into blocks that skip the masked upper triangle, and has a prompt chunk over a
  KV cache read only the cache's filled blocks (`filled_block_attention`); 1 elsewhere, and whenever the sequence
  axis is sharded (ops.auto_causal_blocks). Same values as one block, up to f32 rounding.
- autoselected: `jax.nn.dot_product_attention` with implementation "cudnn" (flash attention) on an NVIDIA GPU
  when cuDNN's constraints hold, else "xla"; the reason for falling back is logged once.
- flash: the Pallas splash-attention kernel (`jax.experimental.pallas.ops.tpu`) on TPU only.

The fused kernels take query [B,S,Hq,D], key/value [B,S,Hkv,D] of one aligned sequence, causal, with optional
packed-segment ids ([B,S], 0 = padding) and an optional sliding window, and return [B,S,Hq,D].
"""

import functools
import logging

import jax
import jax.numpy as jnp

from MaxText import context_parallel, sharding

logger = logging.getLogger("MaxText")

_LOGGED: set[str] = set()
_CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)


def log_once(message: str):
  """logger.info, once per distinct message (a fallback is said once, not per traced layer)."""
  if message not in _LOGGED:
    _LOGGED.add(message)
    logger.info(message)


def dot_product_attention(
    query: jax.Array,
    key: jax.Array | tuple[jax.Array, ...],
    value: jax.Array | tuple[jax.Array, ...],
    mask: jax.Array,
    *,
    scale: float,
    attn_logits_soft_cap: float = 0.0,
    float32_qk_product: bool = True,
    float32_logits: bool = True,
    kv_heads_first: bool = False,
    causal_blocks: int = 1,
    key_window: int = 0,
) -> jax.Array:
  """Reference attention in plain einsums. query [B,S,Hq,D], key/value [B,T,Hkv,D], mask [B,S,T] -> [B,S,Hq,D].

  The value head dim may differ from the query/key one (the output has the value's).
  Query heads are grouped onto their kv head by reshaping (no repeat of K/V in memory). `kv_heads_first`: key/value
  are [B,Hkv,T,D] (the KV cache's layout), so both einsums are plain batched matmuls over (B, Hkv) and XLA never
  transposes the cache (on CPU that made a decode step's attention ~10x faster). key/value may be tuples of parts
  (a KV cache and the new tokens) attended as one sequence, concatenated along T, without building the
  concatenation; the mask then covers the parts' tokens in order.

  `causal_blocks` > 1 (queries and keys the same sequence, and a mask that is causal): see causal_block_attention;
  `key_window` > 0 there is a static sliding window.
  """
  core = dict(
      scale=scale,
      attn_logits_soft_cap=attn_logits_soft_cap,
      float32_qk_product=float32_qk_product,
      float32_logits=float32_logits,
  )
  if causal_blocks > 1 and query.shape[1] > 1:
    if isinstance(key, (tuple, list)) or kv_heads_first or key.shape[1] != query.shape[1]:
      raise ValueError("causal_blocks needs one key/value array over the queries' own sequence")
    return causal_block_attention(query, key, value, mask, causal_blocks, key_window, **core)
  keys = tuple(key) if isinstance(key, (tuple, list)) else (key,)
  values = tuple(value) if isinstance(value, (tuple, list)) else (value,)
  return _attend(query, keys, values, mask, kv_heads_first=kv_heads_first, **core)


def causal_block_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    mask: jax.Array,
    blocks: int,
    key_window: int = 0,
    **core,
) -> jax.Array:
  """dot_product_attention over a causal sequence, its queries split into `blocks` blocks, each attending only to
  the keys up to its own end (with `key_window` > 0 only to the last key_window of those): the masked upper
  triangle is never computed. The mask still decides every kept entry, so the result is exactly that of one block.
  """
  s = query.shape[1]
  bounds = [round(i * s / blocks) for i in range(blocks + 1)]
  # Heads-first once, so each block's key range is a plain slice rather than a transpose of its own.
  key, value = key.transpose(0, 2, 1, 3), value.transpose(0, 2, 1, 3)
  parts = []
  for lo, hi in zip(bounds[:-1], bounds[1:]):
    if hi == lo:
      continue
    k_lo = max(0, lo - key_window + 1) if key_window > 0 else 0
    keys, values = (key[:, :, k_lo:hi],), (value[:, :, k_lo:hi],)
    parts.append(_attend(query[:, lo:hi], keys, values, mask[:, lo:hi, k_lo:hi], kv_heads_first=True, **core))
  return jnp.concatenate(parts, axis=1)


def _scaled_logits(
    grouped: jax.Array,
    keys: jax.Array,
    kv: str,
    *,
    scale: float,
    attn_logits_soft_cap: float,
    float32_qk_product: bool,
    float32_logits: bool,
) -> jax.Array:
  """Logits [B,Hkv,G,S,T] of queries grouped onto their kv head [B,S,Hkv,G,D] against one key part (einsum layout
  `kv`): q.k (in float32 with float32_qk_product), cast to float32 with float32_logits, scaled, then soft-capped."""
  # float32_qk_product: products of bfloat16 inputs are exact in float32, so accumulating in float32 is the
  # upcast's math without the upcast copies, and XLA:CPU runs it in its matmul library (AMX) instead of as a
  # float32 dot.
  accumulate = jnp.float32 if float32_qk_product else None
  logits = jnp.einsum(f"bskgd,{kv}->bkgst", grouped, keys, preferred_element_type=accumulate)
  if float32_logits:
    logits = logits.astype(jnp.float32)
  logits = logits * jnp.asarray(scale, logits.dtype)
  if attn_logits_soft_cap > 0:
    logits = attn_logits_soft_cap * jnp.tanh(logits / attn_logits_soft_cap)
  return logits


def filled_block_attention(
    query: jax.Array,
    cached: tuple[jax.Array, jax.Array],
    new: tuple[jax.Array, jax.Array],
    filled: jax.Array,
    *,
    block: int,
    scale: float,
    attn_logits_soft_cap: float = 0.0,
    float32_qk_product: bool = True,
    float32_logits: bool = True,
) -> jax.Array:
  """S new tokens per row, query [B,S,Hq,D], over their row's KV cache and causally over themselves -> [B,S,Hq,Dv].

  `cached`: keys/values [B,Hkv,T,D] of which each row's first filled[b] tokens count; `new`: the new tokens'
  keys/values [B,Hkv,S,D]. The cache is read `block` tokens at a time in a loop whose trip count is the longest
  row's filled blocks, so the unfilled tail (most of it while a prompt is prefilled chunk by chunk) is never read or
  multiplied; the blocks are combined with the new tokens' part by an online softmax. Equal, up to f32 rounding, to
  dot_product_attention over the two parts with the cache's unfilled tail masked.
  """
  (cache_k, cache_v), (new_k, new_v) = cached, new
  b, s, num_q, d = query.shape
  num_kv, length = cache_k.shape[1], cache_k.shape[2]
  if num_q % num_kv:
    raise ValueError(f"{num_q} query heads are not a multiple of {num_kv} kv heads")
  block = min(block, length)
  grouped = query.reshape(b, s, num_kv, num_q // num_kv, d)
  big_negative = jnp.asarray(0.7 * jnp.finfo(jnp.float32).min, jnp.float32)
  core = dict(
      scale=scale,
      attn_logits_soft_cap=attn_logits_soft_cap,
      float32_qk_product=float32_qk_product,
      float32_logits=float32_logits,
  )

  def logits_of(keys):  # the online softmax runs in float32 whatever float32_logits says
    return _scaled_logits(grouped, keys, "bktd", **core).astype(jnp.float32)

  def weighted(probs, values):
    return jnp.einsum("bkgst,bktd->bkgsd", probs.astype(values.dtype), values, preferred_element_type=jnp.float32)

  # The new tokens first: every query sees at least itself, so the running max starts finite.
  causal = jnp.arange(s)[:, None] >= jnp.arange(s)[None, :]
  logits = jnp.where(causal, logits_of(new_k), big_negative)
  running_max = jnp.max(logits, axis=-1)
  probs = jnp.exp(logits - running_max[..., None])
  total, acc = jnp.sum(probs, axis=-1), weighted(probs, new_v)

  def read_block(j, carry):
    acc, running_max, total = carry
    # The last block may run past the cache: dynamic_slice clamps its start, and positions before j * block (read
    # by the previous block) are masked.
    start = jnp.minimum(j * block, length - block)
    keys, values = (jax.lax.dynamic_slice_in_dim(x, start, block, axis=2) for x in (cache_k, cache_v))
    # Materialized blocks: without the barrier XLA:CPU fuses the slice into the matmuls (up to ~1.7x slower here).
    keys, values = jax.lax.optimization_barrier((keys, values))
    position = start + jnp.arange(block)
    valid = (position[None, :] < filled[:, None]) & (position[None, :] >= j * block)  # [B, block]
    logits = jnp.where(valid[:, None, None, None, :], logits_of(keys), big_negative)
    new_max = jnp.maximum(running_max, jnp.max(logits, axis=-1))
    probs = jnp.exp(logits - new_max[..., None])
    rescale = jnp.exp(running_max - new_max)
    return acc * rescale[..., None] + weighted(probs, values), new_max, total * rescale + jnp.sum(probs, axis=-1)

  blocks = (jnp.max(filled) + block - 1) // block
  acc, _, total = jax.lax.fori_loop(0, blocks, read_block, (acc, running_max, total))
  out = (acc / total[..., None]).astype(cache_v.dtype)
  return out.transpose(0, 3, 1, 2, 4).reshape(b, s, num_q, -1)


def _attend(
    query: jax.Array,
    keys: tuple[jax.Array, ...],
    values: tuple[jax.Array, ...],
    mask: jax.Array,
    *,
    scale: float,
    attn_logits_soft_cap: float,
    float32_qk_product: bool,
    float32_logits: bool,
    kv_heads_first: bool,
) -> jax.Array:
  """One block of dot_product_attention: every query against every key of the parts, under the mask."""
  b, s, num_q, d = query.shape
  t_axis = 2 if kv_heads_first else 1
  num_kv = keys[0].shape[3 - t_axis]
  kv = "bktd" if kv_heads_first else "btkd"
  if num_q % num_kv:
    raise ValueError(f"{num_q} query heads are not a multiple of {num_kv} kv heads")
  grouped = query.reshape(b, s, num_kv, num_q // num_kv, d)
  core = dict(
      scale=scale,
      attn_logits_soft_cap=attn_logits_soft_cap,
      float32_qk_product=float32_qk_product,
      float32_logits=float32_logits,
  )
  logits = jnp.concatenate([_scaled_logits(grouped, k, kv, **core) for k in keys], axis=-1)
  big_negative = jnp.asarray(0.7 * jnp.finfo(logits.dtype).min, logits.dtype)
  logits = jnp.where(mask[:, None, None, :, :], logits, big_negative)
  probs = jax.nn.softmax(logits, axis=-1)
  out, start = None, 0
  for v in values:
    p = probs[..., start : start + v.shape[t_axis]].astype(v.dtype)
    start += v.shape[t_axis]
    # Accumulated in float32 over every part, rounded once (and XLA:CPU's fast path for bfloat16, as above).
    if kv_heads_first:
      part = jnp.einsum("bkgst,bktd->bkgsd", p, v, preferred_element_type=jnp.float32).transpose(0, 3, 1, 2, 4)
    else:
      part = jnp.einsum("bkgst,btkd->bskgd", p, v, preferred_element_type=jnp.float32)
    out = part if out is None else out + part
  return out.astype(jnp.result_type(*values)).reshape(b, s, num_q, -1)  # values may be narrower than queries/keys (MLA)


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
  log_once(
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


SPLASH_BLOCK = 512  # the kernel's block along the sequence, every pass
SPLASH_MIN_BLOCK = 128  # the TPU kernel tiles the sequence in multiples of 128 (one lane row)


def _splash_kernel(num_heads: int, seq_len: int, sliding_window_size: int, block: int, interpret: bool):
  """A splash kernel for one shard's heads. Not cached across calls: the kernel holds its mask's block tables as
  arrays, made under whatever trace the call is in, and a cached kernel reused by another jit (the eval step after
  the train step) would hand it the first trace's tracers."""
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
  # One block size for every pass (forward, dK/dV, dQ).
  names = ("q", "kv", "kv_compute", "q_dkv", "kv_dkv", "kv_dkv_compute", "q_dq", "kv_dq")
  blocks = kernel_lib.BlockSizes(**{f"block_{name}": block for name in names})
  return kernel_lib.make_splash_mha(
      mask_lib.MultiHeadMask([one] * num_heads),
      block_sizes=blocks,
      head_shards=1,
      q_seq_shards=1,
      interpret=interpret,
  )


def splash_block(seq_len: int, block_size: int = SPLASH_BLOCK) -> int:
  """The splash kernel's block along the sequence: block_size, or the whole sequence when shorter."""
  return min(block_size, seq_len)


def splash_unsupported_reason(seq_len: int, block_size: int = SPLASH_BLOCK) -> str | None:
  """Why the splash kernel cannot tile a sequence of seq_len tokens (None when it can); checked at config time."""
  block = splash_block(seq_len, block_size)
  if seq_len % block:
    return f"sequence length {seq_len} is not a multiple of the kernel block {block}"
  if block % SPLASH_MIN_BLOCK:
    return f"sequence length {seq_len} is not a multiple of {SPLASH_MIN_BLOCK} (the TPU kernel's smallest block)"
  return None


def _splash_specs(mesh, rules, shape) -> tuple:
  """shard_map specs for the kernel's [B,S,H,D] inputs and [B,S] segment ids: batch and heads split as the
  activations are (logical_axis_rules); the sequence stays whole on every shard (the kernel sees all keys).

  The sequence/context axes that shard the sequence outside the kernel split the heads inside it (where they
  divide them): the sequence-sharded q/k/v are exchanged all-to-all for head shards, so each device runs the whole
  causal sequence for its heads (equal work, none repeated) rather than every context device running all of it.
  """
  length_axes = [a for name, axes in rules if name == "activation_length" for a in axes]
  rules = [(name, list(axes) + length_axes if name == "activation_heads" else axes) for name, axes in rules]
  spec = sharding.logical_to_mesh_spec(("activation_batch", None, "activation_heads", None), rules, mesh, shape)
  spec = tuple(spec) + (None,) * (4 - len(spec))
  return jax.sharding.PartitionSpec(*spec), jax.sharding.PartitionSpec(spec[0], None)


def splash_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    segment_ids: jax.Array | None,
    *,
    scale: float,
    sliding_window_size: int = 0,
    block_size: int = SPLASH_BLOCK,
    interpret: bool = False,
    platform: str | None = None,
    logical_axis_rules=None,
    context_shards: int = 1,
) -> jax.Array:
  """Causal self-attention with the Pallas TPU splash kernel (`interpret=True` runs it on CPU, for tests).

  The kernel wants [heads, seq, head_dim] per row and unscaled logits, so the query is scaled first and the batch is
  vmapped. Grouped kv heads are repeated up to the query heads (splash's MHA kernel takes equal head counts).
  `platform` (default: the running backend) is the one the call lowers for, e.g. "tpu" for an ahead-of-time compile
  from a CPU host. A Pallas call is opaque to GSPMD (it would gather its inputs onto every device), so under a mesh
  (jax.set_mesh) with `logical_axis_rules` the kernel runs in a shard_map over the batch and head shards.
  `context_shards` > 1: the sequence is in load-balanced order (MaxText/context_parallel.py); each shard, holding
  the whole sequence, restores natural order for the kernel's causal mask and returns its output reordered.
  """
  if not interpret:
    check_flash_backend(platform or jax.default_backend())
  _, s, num_q, _ = query.shape
  num_kv = key.shape[2]
  if num_q % num_kv:
    raise ValueError(f"{num_q} query heads are not a multiple of {num_kv} kv heads")
  reason = splash_unsupported_reason(s, block_size)
  if reason:
    raise ValueError(f"attention=flash: {reason}")
  block = splash_block(s, block_size)
  key = jnp.repeat(key.astype(query.dtype), num_q // num_kv, axis=2)
  value = jnp.repeat(value.astype(query.dtype), num_q // num_kv, axis=2)
  query = query * jnp.asarray(scale, query.dtype)
  segments = None if segment_ids is None else segment_ids.astype(jnp.int32)

  def local(q, k, v, seg):
    if context_shards > 1:  # the whole sequence is local here, so restoring its order moves no data between devices
      q, k, v = (context_parallel.restore(x, context_shards, axis=1) for x in (q, k, v))
      seg = None if seg is None else context_parallel.restore(seg, context_shards, axis=1)
    return context_parallel.reorder(natural(q, k, v, seg), context_shards, axis=1)

  def natural(q, k, v, seg):
    # One shard's heads: the kernel's mask is built per head count, so it is made for the local count.
    kernel = _splash_kernel(q.shape[2], s, sliding_window_size, block, interpret)
    q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
    if seg is None:
      out = jax.vmap(kernel)(q, k, v)
    else:
      from jax.experimental.pallas.ops.tpu.splash_attention import (  # pylint: disable=import-outside-toplevel
          SegmentIds,
      )

      out = jax.vmap(lambda q_, k_, v_, s_: kernel(q_, k_, v_, segment_ids=SegmentIds(q=s_, kv=s_)))(q, k, v, seg)
    return out.transpose(0, 2, 1, 3)

  mesh = jax.sharding.get_abstract_mesh()
  if logical_axis_rules is None or mesh.empty or mesh.size == 1:
    return local(query, key, value, segments)
  qkv_spec, seg_spec = _splash_specs(mesh, logical_axis_rules, query.shape)
  if segments is None:
    body, args, specs = (lambda q, k, v: local(q, k, v, None)), (query, key, value), (qkv_spec,) * 3
  else:
    body, args, specs = local, (query, key, value, segments), (qkv_spec,) * 3 + (seg_spec,)
  return jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=qkv_spec, check_vma=False)(*args)


def fused_kernel(kind: str, context_shards: int, *, platform: str, logical_axis_rules):
  """The fused kernel of attention=`kind` ("flash": splash, "autoselected": cuDNN/XLA) as one call,
  (query, key, value, segment_ids, *, scale, sliding_window_size) -> out, for a sequence in load-balanced order over
  `context_shards` (each kernel sees natural order: splash restores it inside its shard_map, where the sequence is
  whole)."""
  if kind == "flash":
    return functools.partial(
        splash_attention, platform=platform, logical_axis_rules=logical_axis_rules, context_shards=context_shards
    )
  return functools.partial(context_parallel.in_natural_order, autoselected_attention, context_shards)
