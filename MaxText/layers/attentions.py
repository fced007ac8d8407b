"""Multi-head attention with grouped/multi-query key-value heads, RoPE, packed-sequence, sliding-window and chunk masks.

The module is split into steps a KV cache slots between without rewriting any of them:
`project_qkv` -> `position_qk` (QK norm, RoPE) -> [KV cache update] -> `attend` (the core) -> `out_projection`.
The core takes explicit query/key indices and segment ids, so a cache only has to supply its own key indices.
Llama 4's per-layer kinds come from the layer index: every `nope_layer_interval`-th layer has no RoPE (and attends
causally over everything, with optional query temperature tuning); the others rotate, may L2-normalize q/k
(`use_qk_l2_norm`) and attend within their chunk (`chunk_attn_window_size`).
model_mode "prefill" attends like training and fills the cache; "autoregressive" appends to it and attends over it
(`init_cache` creates the cache first, see MaxText.layers.cache).
"""

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from MaxText import context_parallel, lora, sharding
from MaxText.layers.cache import PageSpec, new_cache
from MaxText.layers.embeddings import RotaryEmbedding, apply_rope
from MaxText.layers.linears import DenseGeneral
from MaxText.layers.quantization import spec_from_config
from MaxText.layers.normalizations import RMSNorm
from MaxText.layers.ops.attention import (
    dot_product_attention,
    filled_block_attention,
    fused_kernel,
    log_once,
    splash_unsupported_reason,
)

MODEL_MODES = ("train", "prefill", "autoregressive")
# Cache block of filled_block_attention: the chunk length, at least this (fewer, larger blocks for short chunks).
FILLED_BLOCK_MIN = 32
_BATCH_LEN = ("activation_batch", "activation_length")


def attention_mask(
    q_segment_ids: jax.Array,
    kv_segment_ids: jax.Array,
    q_index: jax.Array,
    kv_index: jax.Array,
    sliding_window_size: int = 0,
    window_active: bool | jax.Array = True,
    *,
    chunk_size: int = 0,
    chunk_active: bool | jax.Array = False,
    q_position: jax.Array | None = None,
    kv_position: jax.Array | None = None,
) -> jax.Array:
  """Boolean [batch, q_len, kv_len]: causal, same segment, and (if set) within the last `sliding_window_size` tokens
  and within the same chunk of `chunk_size` positions.

  Indices are token offsets in the row (not RoPE positions, which restart per packed segment). Padding (segment 0)
  attends only to padding, so no row is empty and the softmax never sees an all-masked row. `window_active` and
  `chunk_active` may be traced bools (a scanned layer whose kind depends on its index). Chunks are aligned on
  `q_position`/`kv_position` (RoPE positions, so each packed document starts a chunk; default: the indices).
  """
  q_index, kv_index = q_index[:, :, None], kv_index[:, None, :]
  mask = (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]) & (kv_index <= q_index)
  if sliding_window_size > 0 and window_active is not False:
    in_window = q_index - kv_index < sliding_window_size
    if window_active is not True:
      in_window |= ~jnp.asarray(window_active)
    mask &= in_window
  if chunk_size > 0 and chunk_active is not False:
    q_pos = q_index if q_position is None else q_position[:, :, None]
    kv_pos = kv_index if kv_position is None else kv_position[:, None, :]
    in_chunk = q_pos // chunk_size == kv_pos // chunk_size
    if chunk_active is not True:
      in_chunk |= ~jnp.asarray(chunk_active)
    mask &= in_chunk
  return mask


def l2_norm(x: jax.Array, epsilon: float) -> jax.Array:
  """x / rms(x) over the last axis, in float32, with no learned scale (Llama 4's QK norm)."""
  x32 = x.astype(jnp.float32)
  return (x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + epsilon)).astype(x.dtype)


def _select(flag: bool | jax.Array, if_true: jax.Array, if_false: jax.Array) -> jax.Array:
  """if_true where a (possibly traced) per-layer flag holds; a static flag picks without computing a select."""
  if flag is True:
    return if_true
  if flag is False:
    return if_false
  return jnp.where(flag, if_true, if_false)


class Attention(nnx.Module):
  """Self-attention of one decoder layer: q/k/v/o projections, optional QK RMSNorm, RoPE, masked attention core.

  Settings come from the config; keyword overrides let a family vary them per layer. With `sliding_window_pattern`
  the layer's index (passed at call time, traced inside a scanned stack) picks local (sliding window, and the local
  RoPE when `local_rope_max_timescale` is set) or global attention, so every layer keeps the same parameters.
  `nope_layer_interval` picks NoPE layers from the index the same way (see is_nope).
  """

  def __init__(self, config, *, rngs: nnx.Rngs, sliding_window_size: int | None = None):
    emb, head_dim = config.emb_dim, config.head_dim
    self.num_query_heads, self.num_kv_heads, self.head_dim = config.num_query_heads, config.num_kv_heads, head_dim
    self.dtype = config.dtype
    self.attention_kind = config.attention  # checked by pyconfig (MaxText/config/checks.py), flash off TPU included
    # flash lowers for the config's hardware (tpu under compile_topology, on a CPU host) and shards over the mesh.
    self.hardware = config.hardware
    self.logical_axis_rules = config.logical_axis_rules
    self.sliding_window_size = config.sliding_window_size if sliding_window_size is None else sliding_window_size
    self.sliding_window_pattern = config.sliding_window_pattern
    self.attn_logits_soft_cap = config.attn_logits_soft_cap
    self.float32_qk_product = config.float32_qk_product
    self.float32_logits = config.float32_logits
    self.scale = (config.query_pre_attn_scalar or head_dim) ** -0.5
    self.chunk_attn_window_size = config.chunk_attn_window_size
    self.causal_blocks = config.attention_causal_blocks  # resolved by pyconfig: 1 under sequence parallelism
    # Training rows arrive in load-balanced order over this many context shards (1 = natural order).
    self.context_shards = (
        context_parallel.context_parallel_size(config) if context_parallel.is_load_balanced(config) else 1
    )
    self.nope_layer_interval = config.nope_layer_interval
    self.use_qk_l2_norm = config.use_qk_l2_norm
    self.qk_l2_norm_epsilon = config.normalization_layer_epsilon
    self.attn_temperature_tuning = config.attn_temperature_tuning
    self.attn_temperature_floor_scale = config.attn_temperature_floor_scale
    self.attn_temperature_scale = config.attn_temperature_scale
    kw = dict(rngs=rngs, dtype=config.dtype, weight_dtype=config.weight_dtype, use_bias=config.use_bias)
    kw["quant"] = spec_from_config(config)  # None unless `quantization` is set
    kw["matmul_backward"] = config.dense_matmul_backward
    adapter = lora.dense_kwargs(config)
    q_shape, kv_shape = (self.num_query_heads, head_dim), (self.num_kv_heads, head_dim)
    self.query = DenseGeneral(emb, q_shape, kernel_axes=("embed", "q_heads", "kv"), **kw, **adapter("query"))
    self.key = DenseGeneral(emb, kv_shape, kernel_axes=("embed", "kv_heads", "kv"), **kw, **adapter("key"))
    self.value = DenseGeneral(emb, kv_shape, kernel_axes=("embed", "kv_heads", "kv"), **kw, **adapter("value"))
    self.out = DenseGeneral(q_shape, emb, kernel_axes=("heads", "kv", "embed"), **kw, **adapter("out"))
    if config.use_qk_norm:
      norm_kw = dict(
          epsilon=config.normalization_layer_epsilon,
          dtype=config.dtype,
          weight_dtype=config.weight_dtype,
          scale_offset=config.normalization_scale_offset,
      )
      self.query_norm = RMSNorm(head_dim, **norm_kw)
      self.key_norm = RMSNorm(head_dim, **norm_kw)
    else:
      self.query_norm = self.key_norm = None
    self.rope = RotaryEmbedding.from_config(config, head_dim)
    self.local_rope = RotaryEmbedding.local_from_config(config, head_dim)
    self.quantize_kvcache = config.quantize_kvcache
    self.kv_cache = nnx.data(None)  # a layers.cache.Cache once init_cache runs (prefill/autoregressive)

  def init_cache(self, batch: int, length: int, stack: tuple[int, ...] = (), paged: PageSpec | None = None):
    """An empty KV cache of `batch` rows x `length` tokens (with leading `stack` dims inside a scanned stack).

    `paged`: a paged cache (MaxText.layers.cache.paged) of `batch` slots instead; `length` is then unused.
    """
    self.kv_cache = new_cache(
        batch,
        length,
        self.num_kv_heads,
        self.head_dim,
        dtype=self.dtype,
        quantize=self.quantize_kvcache,
        stack=stack,
        paged=paged,
    )

  def project_qkv(self, x: jax.Array, lora_rng: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    q_names = _BATCH_LEN + ("activation_heads", "activation_kv")
    kv_names = _BATCH_LEN + ("activation_kv_heads", "activation_kv")
    q, k, v = (proj(x, lora_rng=lora.subkey(lora_rng, i)) for i, proj in enumerate((self.query, self.key, self.value)))
    query = sharding.with_logical_constraint(checkpoint_name(q, "query_proj"), q_names)
    key = sharding.with_logical_constraint(checkpoint_name(k, "key_proj"), kv_names)
    value = sharding.with_logical_constraint(checkpoint_name(v, "value_proj"), kv_names)
    return query, key, value

  def is_local(self, layer_index: int | jax.Array) -> bool | jax.Array:
    """Whether the layer at `layer_index` attends within the sliding window (a traced bool for a traced index)."""
    if self.sliding_window_size <= 0:
      return False
    if self.sliding_window_pattern <= 0:
      return True
    return (layer_index + 1) % self.sliding_window_pattern != 0

  def is_nope(self, layer_index: int | jax.Array) -> bool | jax.Array:
    """Whether the layer at `layer_index` skips RoPE (every `nope_layer_interval`-th layer: N-1, 2N-1, ...)."""
    if self.nope_layer_interval <= 0:
      return False
    return (layer_index + 1) % self.nope_layer_interval == 0

  def is_chunked(self, layer_index: int | jax.Array) -> bool | jax.Array:
    """Whether the layer attends only within its chunk: every RoPE layer when chunk_attn_window_size > 0."""
    if self.chunk_attn_window_size <= 0:
      return False
    nope = self.is_nope(layer_index)
    return not nope if isinstance(nope, bool) else ~nope

  def _rotate(self, x: jax.Array, positions: jax.Array, local: bool | jax.Array) -> jax.Array:
    if self.local_rope is None or local is False:
      return self.rope(x, positions)
    if local is True:
      return self.local_rope(x, positions)
    inv_freq = jnp.where(local, self.local_rope.inv_frequencies(), self.rope.inv_frequencies())
    return apply_rope(x, positions, inv_freq)

  def position_qk(
      self,
      query: jax.Array,
      key: jax.Array,
      positions: jax.Array,
      local: bool | jax.Array = True,
      nope: bool | jax.Array = False,
  ) -> tuple[jax.Array, jax.Array]:
    """QK norm (per head, before rotation) then RoPE at each token's position (the local RoPE in local layers).

    Llama 4: RoPE layers L2-normalize q and k after the rotation (`use_qk_l2_norm`); NoPE layers (`nope`) keep q and
    k unrotated and, with `attn_temperature_tuning`, scale the queries up with the position (as transformers does).
    """
    if self.query_norm is not None:
      query, key = self.query_norm(query), self.key_norm(key)
    if nope is not True:
      rotated_q, rotated_k = self._rotate(query, positions, local), self._rotate(key, positions, local)
      if self.use_qk_l2_norm:
        rotated_q = l2_norm(rotated_q, self.qk_l2_norm_epsilon)
        rotated_k = l2_norm(rotated_k, self.qk_l2_norm_epsilon)
      query, key = _select(nope, query, rotated_q), _select(nope, key, rotated_k)
    if self.attn_temperature_tuning and nope is not False:
      steps = jnp.floor((positions.astype(jnp.float32) + 1.0) / self.attn_temperature_floor_scale)
      scale = _select(nope, jnp.log1p(steps) * self.attn_temperature_scale + 1.0, jnp.ones_like(steps))
      query = (query.astype(jnp.float32) * scale[:, :, None, None]).astype(query.dtype)
    return query, key

  def attend(
      self,
      query: jax.Array,
      key: jax.Array,
      value: jax.Array,
      *,
      q_segment_ids: jax.Array | None,
      kv_segment_ids: jax.Array | None,
      q_index: jax.Array,
      kv_index: jax.Array,
      aligned: bool,
      local: bool | jax.Array = True,
      kv_heads_first: bool = False,
      chunked: bool | jax.Array = False,
      q_position: jax.Array | None = None,
      kv_position: jax.Array | None = None,
      context_shards: int = 1,
  ) -> jax.Array:
    """The attention core. `aligned` means keys are exactly the queries' own sequence (train/prefill).

    `local` (see is_local) switches the sliding window on; it only matters when sliding_window_size > 0.
    `chunked` (see is_chunked) switches the chunk mask on, chunks aligned on q_position/kv_position (default: the
    indices). `kv_heads_first`: key/value are [B, Hkv, T, D] (a KV cache) rather than [B, T, Hkv, D].
    `context_shards` > 1: an aligned sequence in load-balanced order (MaxText/context_parallel.py); the indices
    carry each slot's natural offset, and the fused kernels (whose masks assume natural order) see it restored.
    """
    if self.attention_kind in ("autoselected", "flash") and aligned:
      kind = self.attention_kind
      if self.attn_logits_soft_cap > 0:
        log_once(f"attention={kind}: attn_logits_soft_cap needs the dot_product path; using it")
      elif self.chunk_attn_window_size > 0 and chunked is not False:
        log_once(f"attention={kind}: chunked attention (chunk_attn_window_size) needs the dot_product path")
      elif kind == "flash" and splash_unsupported_reason(query.shape[1]):
        # Only a prefill bucket shorter than the config's length (checked at config time) gets here.
        log_once(f"attention=flash: {splash_unsupported_reason(query.shape[1])}; using dot_product for it")
      else:
        kernel = fused_kernel(kind, context_shards, platform=self.hardware, logical_axis_rules=self.logical_axis_rules)

        def fused(window):
          return kernel(query, key, value, q_segment_ids, scale=self.scale, sliding_window_size=window)

        if isinstance(local, bool):
          return fused(self.sliding_window_size if local else 0)
        # The fused kernel needs a static window: compile both and let the traced flag pick one.
        return jax.lax.cond(local, lambda: fused(self.sliding_window_size), lambda: fused(0))
    if q_segment_ids is None:
      q_segment_ids = jnp.ones(q_index.shape, jnp.int32)
    if kv_segment_ids is None:
      kv_segment_ids = jnp.ones(kv_index.shape, jnp.int32)
    mask = attention_mask(
        q_segment_ids,
        kv_segment_ids,
        q_index,
        kv_index,
        self.sliding_window_size,
        local,
        chunk_size=self.chunk_attn_window_size,
        chunk_active=chunked,
        q_position=q_position,
        kv_position=kv_position,
    )
    return dot_product_attention(
        query,
        key,
        value,
        mask,
        scale=self.scale,
        attn_logits_soft_cap=self.attn_logits_soft_cap,
        float32_qk_product=self.float32_qk_product,
        float32_logits=self.float32_logits,
        kv_heads_first=kv_heads_first,
        # Query blocks assume natural order (pyconfig already makes them 1 whenever the context axis shards).
        causal_blocks=self.causal_blocks if aligned and query.shape[1] == key.shape[1] and context_shards == 1 else 1,
        key_window=self.sliding_window_size if local is True else 0,
    )

  def out_projection(self, context: jax.Array, lora_rng: jax.Array | None = None) -> jax.Array:
    context = sharding.with_logical_constraint(context, _BATCH_LEN + ("activation_heads", "activation_kv"))
    out = checkpoint_name(self.out(context.astype(self.dtype), lora_rng=lora.subkey(lora_rng, 3)), "out_proj")
    return sharding.with_logical_constraint(out, _BATCH_LEN + ("activation_embed",))

  def __call__(
      self,
      x: jax.Array,
      positions: jax.Array,
      segment_ids: jax.Array | None = None,
      *,
      model_mode: str = "train",
      deterministic: bool = True,  # pylint: disable=unused-argument
      layer_index: int | jax.Array = 0,
      lora_rng: jax.Array | None = None,
  ) -> jax.Array:
    """`layer_index` (this layer's place in the stack) picks local or global attention under sliding_window_pattern.

    `lora_rng`: the adapters' dropout key (training with lora_dropout), else None.
    """
    if model_mode not in MODEL_MODES:
      raise ValueError(f"model_mode {model_mode!r} is not one of {MODEL_MODES}")
    if model_mode != "train" and self.kv_cache is None:
      raise ValueError(f"model_mode {model_mode!r} needs a KV cache: call the model's init_cache first")
    query, key, value = self.project_qkv(x, lora_rng)
    local, chunked = self.is_local(layer_index), self.is_chunked(layer_index)
    query, key = self.position_qk(query, key, positions, local, self.is_nope(layer_index))
    if model_mode == "autoregressive":
      return self.out_projection(checkpoint_name(self._attend_cached(query, key, value, local, chunked), "context"))
    if model_mode == "prefill":
      lengths = x.shape[1] if segment_ids is None else jnp.sum(segment_ids != 0, axis=1)
      self.kv_cache.prefill(key, value, jnp.broadcast_to(lengths, x.shape[:1]))
    shards = self.context_shards if model_mode == "train" else 1
    order = context_parallel.load_balanced_order(x.shape[1], shards)  # natural offsets (arange unless balanced)
    index = jnp.broadcast_to(jnp.asarray(order), x.shape[:2])
    context = self.attend(
        query,
        key,
        value,
        q_segment_ids=segment_ids,
        kv_segment_ids=segment_ids,
        q_index=index,
        kv_index=index,
        aligned=True,
        local=local,
        chunked=chunked,
        q_position=positions,
        kv_position=positions,
        context_shards=shards,
    )
    return self.out_projection(checkpoint_name(context, "context"), lora_rng)

  def _attend_cached(
      self,
      query: jax.Array,
      key: jax.Array,
      value: jax.Array,
      local: bool | jax.Array = True,
      chunked: bool | jax.Array = False,
  ) -> jax.Array:
    """New tokens (one per row when decoding) attend over their row's cache and themselves, then join the cache.

    The cache is read as it was (its unfilled tail masked out) and the new keys/values are attended as a second
    part, so the cache write can happen in place after the read; the sliding window counts from each row's own
    position, and chunks from the row's start (a cached row holds one sequence, so its indices are its positions).
    """
    if self.kv_cache.kernel == "pallas":
      return self.kv_cache.kernel_attention(
          query,
          key,
          value,
          scale=self.scale,
          soft_cap=self.attn_logits_soft_cap,
          logical_axis_rules=self.logical_axis_rules,
      )
    view = self.kv_cache.attention_view(key, value)
    if self._reads_filled_blocks(query, view, local, chunked):
      context = filled_block_attention(
          query,
          (view.keys[0], view.values[0]),
          (view.keys[1], view.values[1]),
          view.q_index[:, 0],  # the row's filled length: its new tokens start there
          block=max(query.shape[1], FILLED_BLOCK_MIN),
          scale=self.scale,
          attn_logits_soft_cap=self.attn_logits_soft_cap,
          float32_qk_product=self.float32_qk_product,
          float32_logits=self.float32_logits,
      )
    else:
      context = self.attend(
          query,
          view.keys,
          view.values,
          q_segment_ids=None,
          kv_segment_ids=view.kv_segment_ids,
          q_index=view.q_index,
          kv_index=view.kv_index,
          aligned=False,
          local=local,
          kv_heads_first=True,
          chunked=chunked,
      )
    self.kv_cache.append(key, value, after=context)
    return context

  def _reads_filled_blocks(self, query, view, local, chunked) -> bool:
    """Whether a prompt chunk over the cache (S > 1 new tokens per row) reads only the cache's filled blocks
    (filled_block_attention): with attention_causal_blocks > 1 (CPU; on accelerators the loop would only add
    steps), global attention (no sliding window or chunk mask in force), keys and values cached."""
    windowed = self.sliding_window_size > 0 and local is not False
    chunk_masked = self.chunk_attn_window_size > 0 and chunked is not False
    return query.shape[1] > 1 and self.causal_blocks > 1 and view.values is not None and not windowed and not chunk_masked
