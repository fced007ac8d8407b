"""Multi-head Latent Attention (MLA, DeepSeek V2/V3): keys and values decompressed from a small per-token latent.

Per token, `wkv_a` makes a latent of kv_lora_rank (RMS-normed) plus one rope key of qk_rope_head_dim that every head
shares; `wkv_b` expands the latent into per-head no-rope keys and values. Queries come from `query` (q_lora_rank=0)
or from the low-rank `wq_a` -> RMSNorm -> `wq_b`; each head's query is [no-rope part, rope part].

Training and prefill expand the latent and attend as ordinary multi-head attention (masks and kernels from
attentions.py). Decoding keeps only the latent and the rope key in the KV cache (kv_lora_rank + qk_rope_head_dim
numbers per token and layer) and attends in latent space: each head's no-rope query is folded through its slice of
`wkv_b` (q . W_uk c = (W_uk^T q) . c), so the cache is one shared "head" whose values are the latent itself, and the
attended latent is expanded through the value slice of `wkv_b` afterwards. Both orders compute the same logits.

RoPE pairs are (i, i + d/2) as everywhere in MaxText; DeepSeek checkpoints interleave them, which the Hugging Face
mapping (MaxText/models/deepseek.py) undoes by permuting the rope columns of the projections.
"""

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from MaxText import context_parallel, lora, sharding
from MaxText.layers.cache import PageSpec, new_cache
from MaxText.layers.attentions import MODEL_MODES, attention_mask
from MaxText.layers.embeddings import RotaryEmbedding
from MaxText.layers.linears import DenseGeneral
from MaxText.layers.normalizations import RMSNorm
from MaxText.layers.ops.attention import dot_product_attention, fused_kernel, log_once, splash_unsupported_reason

_BATCH_LEN = ("activation_batch", "activation_length")
_HEAD_NAMES = _BATCH_LEN + ("activation_heads", "activation_kv")


class MLA(nnx.Module):
  """Multi-head Latent Attention of one decoder layer (called like attentions.Attention)."""

  def __init__(self, config, *, rngs: nnx.Rngs):
    emb, heads = config.emb_dim, config.num_query_heads
    self.num_heads = heads
    self.q_lora_rank, self.kv_lora_rank = config.q_lora_rank, config.kv_lora_rank
    self.nope_dim, self.rope_dim, self.v_dim = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
    self.dtype = config.dtype
    self.attention_kind = config.attention
    self.hardware = config.hardware
    self.logical_axis_rules = config.logical_axis_rules
    # Training rows arrive in load-balanced order over this many context shards (MaxText/context_parallel.py).
    self.context_shards = (
        context_parallel.context_parallel_size(config) if context_parallel.is_load_balanced(config) else 1
    )
    self.float32_qk_product = config.float32_qk_product
    self.float32_logits = config.float32_logits
    self.quantize_kvcache = config.quantize_kvcache
    self.rope = RotaryEmbedding.from_config(config, self.rope_dim)
    # YaRN's mscale correction (DeepSeek) rides on the usual 1/sqrt(query-key dim).
    self.scale = (self.nope_dim + self.rope_dim) ** -0.5 * self.rope.softmax_scale_multiplier()
    kw = dict(rngs=rngs, dtype=config.dtype, weight_dtype=config.weight_dtype)
    kw["matmul_backward"] = config.dense_matmul_backward
    adapter = lora.dense_kwargs(config)
    norm_kw = dict(epsilon=config.normalization_layer_epsilon, dtype=config.dtype, weight_dtype=config.weight_dtype)
    qk_dim = self.nope_dim + self.rope_dim
    if self.q_lora_rank > 0:
      self.wq_a = DenseGeneral(emb, self.q_lora_rank, kernel_axes=("embed", None), **kw, **adapter("wq_a"))
      self.q_norm = RMSNorm(self.q_lora_rank, **norm_kw)
      # The latent (input) side of both up-projections splits like every other weight's embed side: left whole,
      # DeepSeek V3's wq_b and wkv_b (12 GiB in bf16 with 128 heads) were replicated on every device.
      self.wq_b = DenseGeneral(
          self.q_lora_rank, (heads, qk_dim), kernel_axes=("embed", "q_heads", "kv"), **kw, **adapter("wq_b")
      )
      self.query = None
    else:
      self.wq_a = self.q_norm = self.wq_b = None
      self.query = DenseGeneral(emb, (heads, qk_dim), kernel_axes=("embed", "q_heads", "kv"), **kw, **adapter("query"))
    self.wkv_a = DenseGeneral(
        emb, self.kv_lora_rank + self.rope_dim, kernel_axes=("embed", None), **kw, **adapter("wkv_a")
    )
    self.kv_norm = RMSNorm(self.kv_lora_rank, **norm_kw)
    self.wkv_b = DenseGeneral(
        self.kv_lora_rank,
        (heads, self.nope_dim + self.v_dim),
        kernel_axes=("embed", "kv_heads", "kv"),
        **kw,
        **adapter("wkv_b"),
    )
    self.out = DenseGeneral((heads, self.v_dim), emb, kernel_axes=("heads", "kv", "embed"), **kw, **adapter("out"))
    self.kv_cache = nnx.data(None)  # a keys-only layers.cache.Cache of [latent, rope key] once init_cache runs

  def init_cache(self, batch: int, length: int, stack: tuple[int, ...] = (), paged: PageSpec | None = None):
    """An empty latent cache (paged or not): per token one shared row of kv_lora_rank + qk_rope_head_dim numbers."""
    self.kv_cache = new_cache(
        batch,
        length,
        1,
        self.kv_lora_rank + self.rope_dim,
        dtype=self.dtype,
        quantize=self.quantize_kvcache,
        stack=stack,
        store_values=False,
        paged=paged,
    )

  def project_query(
      self, x: jax.Array, positions: jax.Array, lora_rng: jax.Array | None = None
  ) -> tuple[jax.Array, jax.Array]:
    """(no-rope part [B, S, H, nope], rotated part [B, S, H, rope]) of the queries."""
    if self.query is not None:
      q = self.query(x, lora_rng=lora.subkey(lora_rng, 0))
    else:
      latent = self.q_norm(self.wq_a(x, lora_rng=lora.subkey(lora_rng, 1)))
      q = self.wq_b(latent, lora_rng=lora.subkey(lora_rng, 2))
    q = sharding.with_logical_constraint(checkpoint_name(q, "query_proj"), _HEAD_NAMES)
    return q[..., : self.nope_dim], self.rope(q[..., self.nope_dim :], positions)

  def project_latent(self, x: jax.Array, positions: jax.Array, lora_rng: jax.Array | None = None) -> jax.Array:
    """The cached row per token [B, S, 1, kv_lora_rank + rope]: normed latent, then the rotated shared rope key."""
    kv = checkpoint_name(self.wkv_a(x, lora_rng=lora.subkey(lora_rng, 3)), "key_proj")
    latent = self.kv_norm(kv[..., : self.kv_lora_rank])
    rope_key = self.rope(kv[..., None, self.kv_lora_rank :], positions)
    return jnp.concatenate([latent[:, :, None, :], rope_key.astype(latent.dtype)], axis=-1)

  def expand(self, latent_rows: jax.Array, lora_rng: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Per-head keys [B, T, H, nope + rope] and values [B, T, H, v] from cached rows [B, T, 1, lora + rope]."""
    kv = self.wkv_b(latent_rows[:, :, 0, : self.kv_lora_rank], lora_rng=lora.subkey(lora_rng, 4))
    kv = sharding.with_logical_constraint(checkpoint_name(kv, "value_proj"), _HEAD_NAMES)
    rope_key = jnp.broadcast_to(latent_rows[:, :, :, self.kv_lora_rank :], kv.shape[:3] + (self.rope_dim,))
    key = jnp.concatenate([kv[..., : self.nope_dim], rope_key.astype(kv.dtype)], axis=-1)
    return key, kv[..., self.nope_dim :]

  def __call__(
      self,
      x: jax.Array,
      positions: jax.Array,
      segment_ids: jax.Array | None = None,
      *,
      model_mode: str = "train",
      deterministic: bool = True,  # pylint: disable=unused-argument
      layer_index: int | jax.Array = 0,  # pylint: disable=unused-argument
      lora_rng: jax.Array | None = None,
  ) -> jax.Array:
    """`lora_rng`: the adapters' dropout key (training with lora_dropout), else None."""
    if model_mode not in MODEL_MODES:
      raise ValueError(f"model_mode {model_mode!r} is not one of {MODEL_MODES}")
    if model_mode != "train" and self.kv_cache is None:
      raise ValueError(f"model_mode {model_mode!r} needs a KV cache: call the model's init_cache first")
    q_nope, q_rope = self.project_query(x, positions, lora_rng)
    rows = self.project_latent(x, positions, lora_rng)
    if model_mode == "autoregressive":
      context = self._attend_latent_cache(q_nope, q_rope, rows)
    else:
      if model_mode == "prefill":
        lengths = x.shape[1] if segment_ids is None else jnp.sum(segment_ids != 0, axis=1)
        self.kv_cache.prefill(rows, None, jnp.broadcast_to(lengths, x.shape[:1]))
      key, value = self.expand(rows, lora_rng)
      query = jnp.concatenate([q_nope, q_rope.astype(q_nope.dtype)], axis=-1)
      shards = self.context_shards if model_mode == "train" else 1
      context = self._attend_expanded(query, key, value, segment_ids, shards)
    return self.out_projection(checkpoint_name(context, "context"), lora_rng)

  def _attend_expanded(self, query, key, value, segment_ids, context_shards: int = 1) -> jax.Array:
    """Causal self-attention of the aligned sequence (train/prefill) with per-head keys and values.

    `context_shards` > 1: the sequence is in load-balanced order (MaxText/context_parallel.py).
    """
    kind = self.attention_kind
    if kind == "flash" and splash_unsupported_reason(query.shape[1]):
      # Only a prefill bucket shorter than the config's length (checked at config time) gets here.
      log_once(f"attention=flash: {splash_unsupported_reason(query.shape[1])}; using dot_product for it")
      kind = "dot_product"
    if kind in ("autoselected", "flash"):
      # The fused kernels want one head dim: values are zero-padded to the query/key width and sliced back.
      pad = query.shape[-1] - value.shape[-1]
      padded = jnp.pad(value, ((0, 0), (0, 0), (0, 0), (0, max(pad, 0))))
      kernel = fused_kernel(kind, context_shards, platform=self.hardware, logical_axis_rules=self.logical_axis_rules)
      return kernel(query, key, padded, segment_ids, scale=self.scale, sliding_window_size=0)[..., : value.shape[-1]]
    order = context_parallel.load_balanced_order(query.shape[1], context_shards)  # natural offset of each slot
    index = jnp.broadcast_to(jnp.asarray(order), query.shape[:2])
    segments = jnp.ones(index.shape, jnp.int32) if segment_ids is None else segment_ids
    mask = attention_mask(segments, segments, index, index)
    return dot_product_attention(
        query,
        key,
        value,
        mask,
        scale=self.scale,
        float32_qk_product=self.float32_qk_product,
        float32_logits=self.float32_logits,
    )

  def _attend_latent_cache(self, q_nope: jax.Array, q_rope: jax.Array, rows: jax.Array) -> jax.Array:
    """New tokens attend over their row's latent cache and themselves in latent space, then join the cache."""
    w_b = self.wkv_b.merged_kernel(self.dtype)  # [lora, H, nope + v], absorbed into the query and the output
    w_uk, w_uv = w_b[..., : self.nope_dim], w_b[..., self.nope_dim :]
    q_latent = jnp.einsum("bshn,rhn->bshr", q_nope.astype(self.dtype), w_uk)
    query = jnp.concatenate([q_latent, q_rope.astype(q_latent.dtype)], axis=-1)
    view = self.kv_cache.attention_view(rows, None)
    latents = tuple(k[..., : self.kv_lora_rank] for k in view.keys)  # values are the latent part of the rows
    context_latent = dot_product_attention(
        query,
        view.keys,
        latents,
        attention_mask(jnp.ones(view.q_index.shape, jnp.int32), view.kv_segment_ids, view.q_index, view.kv_index),
        scale=self.scale,
        float32_qk_product=self.float32_qk_product,
        float32_logits=self.float32_logits,
        kv_heads_first=True,
    )
    context = jnp.einsum("bshr,rhv->bshv", context_latent.astype(self.dtype), w_uv)
    self.kv_cache.append(rows, None, after=context)
    return context

  def out_projection(self, context: jax.Array, lora_rng: jax.Array | None = None) -> jax.Array:
    context = sharding.with_logical_constraint(context, _HEAD_NAMES)
    out = checkpoint_name(self.out(context.astype(self.dtype), lora_rng=lora.subkey(lora_rng, 5)), "out_proj")
    return sharding.with_logical_constraint(out, _BATCH_LEN + ("activation_embed",))
