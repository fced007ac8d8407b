"""The pre-norm residual decoder block every family configures.

    x = x + post_attention_norm(attention(pre_attention_norm(x)))      post_attention_norm: optional
    x = x + post_ffw_norm(feed_forward(pre_ffw_norm(x)))               post_ffw_norm: optional

Attention is multi-head (layers/attentions.py) or Multi-head Latent Attention (layers/mla.py) by `attention_type`;
the feed-forward is the dense MLP (layers/linears.py) or, in MoE layers, the MoeBlock (layers/moe.py), always in the
`mlp` slot. Dropout (when training) sits on each branch before its residual add. A family's BlockSpec names the
norms (the names are the checkpoint's parameter paths) and says which optional norms exist.

The block returns (x, aux): aux holds what its sub-layers report besides their output (the MoE block's
load-balancing loss and expert loads) under the sub-layer's name, as values; nothing is written into the module.
"""

import dataclasses
from typing import Optional

import jax
from flax import nnx

from MaxText import lora, sharding
from MaxText.layers.attentions import Attention
from MaxText.layers.linears import MlpBlock
from MaxText.layers.mla import MLA
from MaxText.layers.moe import MoeBlock
from MaxText.layers.normalizations import create_norm
from MaxText.layers.quantization import spec_from_config


@dataclasses.dataclass(frozen=True)
class BlockSpec:
  """Parameter names of the block's norms; None leaves that norm out."""

  pre_attention_norm: str = "pre_self_attention_layer_norm"
  post_attention_norm: Optional[str] = None
  pre_ffw_norm: str = "post_self_attention_layer_norm"
  post_ffw_norm: Optional[str] = None

  def norm_names(self) -> tuple[str, ...]:
    names = (self.pre_attention_norm, self.post_attention_norm, self.pre_ffw_norm, self.post_ffw_norm)
    return tuple(n for n in names if n is not None)


def attention_class(config) -> type[nnx.Module]:
  return MLA if config.attention_type == "mla" else Attention


class DecoderBlock(nnx.Module):
  """One decoder layer: attention then feed-forward, each a pre-normed residual branch (see the module doc)."""

  def __init__(self, config, spec: BlockSpec, *, rngs: nnx.Rngs, use_moe: bool = False):
    self.spec = spec
    for name in spec.norm_names():
      setattr(self, name, create_norm(config, config.emb_dim))
    self.self_attention = attention_class(config)(config, rngs=rngs)
    self.use_moe = use_moe
    if use_moe:
      self.mlp = MoeBlock(config, rngs=rngs)
    else:
      self.mlp = MlpBlock(
          config.emb_dim,
          config.mlp_dim,
          config.mlp_activations,
          rngs=rngs,
          dtype=config.dtype,
          weight_dtype=config.weight_dtype,
          use_bias=config.use_bias,
          quant=spec_from_config(config),
          matmul_backward=config.dense_matmul_backward,
          lora=lora.dense_kwargs(config),
      )
    self.dropout = nnx.Dropout(config.dropout_rate if config.enable_dropout else 0.0)
    self.lora_dropout = config.lora_dropout if config.lora_rank > 0 else 0.0

  def _norm(self, name: Optional[str], x: jax.Array) -> jax.Array:
    return x if name is None else getattr(self, name)(x)

  def __call__(
      self,
      x: jax.Array,
      positions: jax.Array,
      segment_ids: jax.Array | None = None,
      *,
      deterministic: bool = True,
      model_mode: str = "train",
      dropout_rng: jax.Array | None = None,
      layer_index: int | jax.Array = 0,
  ) -> tuple[jax.Array, dict]:
    attn_rng = mlp_rng = attn_lora_rng = mlp_lora_rng = None
    if dropout_rng is not None:
      attn_rng, mlp_rng = jax.random.split(dropout_rng)
      if self.lora_dropout > 0:
        attn_lora_rng, mlp_lora_rng = lora.subkey(attn_rng, 1), lora.subkey(mlp_rng, 1)
    spec = self.spec
    h = self.self_attention(
        self._norm(spec.pre_attention_norm, x),
        positions,
        segment_ids,
        model_mode=model_mode,
        deterministic=deterministic,
        layer_index=layer_index,
        lora_rng=attn_lora_rng,
    )
    h = self._norm(spec.post_attention_norm, h)
    x = x + self.dropout(h, deterministic=deterministic, rngs=attn_rng)
    x = sharding.with_logical_constraint(x, sharding.EMBED_ACTIVATION)
    h = self._norm(spec.pre_ffw_norm, x)
    aux = {}
    if self.use_moe:
      # Padding is not counted in the loads or the aux loss.
      h, aux["mlp"] = self.mlp(h, segment_ids=segment_ids, lora_rng=mlp_lora_rng)
    else:
      h = self.mlp(h, lora_rng=mlp_lora_rng)
    h = self._norm(spec.post_ffw_norm, h)
    x = x + self.dropout(h, deterministic=deterministic, rngs=mlp_rng)
    return sharding.with_logical_constraint(x, sharding.EMBED_ACTIVATION), aux

  def post_update(self, stats: dict):
    """The sub-layers' update rules after an optimizer step (`stats`: this block's aux, summed over the step)."""
    if self.use_moe:
      self.mlp.post_update(stats["mlp"])


def forward_flops(config, tokens: int, use_moe: bool) -> tuple[float, float]:
  """Forward FLOPs of one block over `tokens` tokens: (learnable-weight matmuls, attention scores + weighted sum).

  Matmuls count 2 FLOPs per multiply-add; causal attention counts half of the full square. MoE layers count the
  router, the k active routed experts and the shared experts per token (capacity padding and dropped tokens are
  not counted: model FLOPs of the tokens actually routed).
  """
  projections, attention = _attention_flops(config, tokens)
  emb, gated = config.emb_dim, len(config.mlp_activations) + 1
  if use_moe:
    active = config.num_experts_per_tok + config.shared_experts
    ffn = 2 * tokens * emb * config.num_experts + 2 * tokens * emb * config.moe_mlp_dim * gated * active
  else:
    ffn = 2 * tokens * emb * config.mlp_dim * gated
  return projections + ffn, attention


def _attention_flops(config, tokens: int) -> tuple[float, float]:
  """(weight matmuls, QK^T + AV) of one layer's attention; MLA counts its low-rank projections and expanded heads."""
  emb, heads, seq = config.emb_dim, config.num_query_heads, config.max_target_length
  if config.attention_type == "mla":
    qk_dim, v_dim = config.qk_nope_head_dim + config.qk_rope_head_dim, config.v_head_dim
    if config.q_lora_rank > 0:
      query = emb * config.q_lora_rank + config.q_lora_rank * heads * qk_dim
    else:
      query = emb * heads * qk_dim
    latent = emb * (config.kv_lora_rank + config.qk_rope_head_dim)
    expand = config.kv_lora_rank * heads * (config.qk_nope_head_dim + v_dim)
    projections = 2 * tokens * (query + latent + expand + heads * v_dim * emb)
    return projections, 2 * tokens * seq * heads * (qk_dim + v_dim) / 2
  hd, kv = config.head_dim, config.num_kv_heads
  projections = 2 * tokens * emb * (heads + 2 * kv) * hd + 2 * tokens * heads * hd * emb
  return projections, 2 * 2 * tokens * seq * heads * hd / 2
