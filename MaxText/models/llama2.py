"""Llama decoder layer (Llama 2, Llama 3.x): pre-RMSNorm self-attention and gated MLP, each on a residual branch.

Every Llama generation shares this layer; generations differ only by config keys (GQA head counts, `rope_type`,
`rope_max_timescale`, vocab), which the model ymls set.
"""

import jax
from flax import nnx

from MaxText import sharding
from MaxText.layers.attentions import Attention
from MaxText.layers.linears import MlpBlock
from MaxText.layers.normalizations import RMSNorm

_EMBED_NAMES = ("activation_batch", "activation_length", "activation_embed")


class LlamaDecoderLayer(nnx.Module):
  """x + attn(norm(x)), then x + mlp(norm(x)); dropout (when training) on each branch before the residual add."""

  def __init__(self, config, *, rngs: nnx.Rngs):
    norm_kw = dict(epsilon=config.normalization_layer_epsilon, dtype=config.dtype, weight_dtype=config.weight_dtype)
    self.pre_self_attention_layer_norm = RMSNorm(config.emb_dim, **norm_kw)
    self.self_attention = Attention(config, rngs=rngs)
    self.post_self_attention_layer_norm = RMSNorm(config.emb_dim, **norm_kw)
    self.mlp = MlpBlock(
        config.emb_dim,
        config.mlp_dim,
        config.mlp_activations,
        rngs=rngs,
        dtype=config.dtype,
        weight_dtype=config.weight_dtype,
    )
    self.dropout = nnx.Dropout(config.dropout_rate if config.enable_dropout else 0.0)

  def __call__(
      self,
      x: jax.Array,
      positions: jax.Array,
      segment_ids: jax.Array | None = None,
      *,
      deterministic: bool = True,
      model_mode: str = "train",
      dropout_rng: jax.Array | None = None,
  ) -> jax.Array:
    attn_rng = mlp_rng = None
    if dropout_rng is not None:
      attn_rng, mlp_rng = jax.random.split(dropout_rng)
    h = self.pre_self_attention_layer_norm(x)
    h = self.self_attention(h, positions, segment_ids, model_mode=model_mode, deterministic=deterministic)
    x = x + self.dropout(h, deterministic=deterministic, rngs=attn_rng)
    x = sharding.with_logical_constraint(x, _EMBED_NAMES)
    h = self.mlp(self.post_self_attention_layer_norm(x))
    x = x + self.dropout(h, deterministic=deterministic, rngs=mlp_rng)
    return sharding.with_logical_constraint(x, _EMBED_NAMES)


# The name the shared decoder stack looks up in every family module.
DecoderLayer = LlamaDecoderLayer
