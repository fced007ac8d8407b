"""Llama decoder layer (Llama 2, Llama 3.x): pre-RMSNorm self-attention and gated MLP, each on a residual branch.

Every Llama generation shares this layer; generations differ only by config keys (GQA head counts, `rope_type`,
`rope_max_timescale`, vocab), which the model ymls set.
Other families reuse it where they differ only in config (Qwen 3: QK norm; Gemma: (1 + scale) norms and GeGLU;
GPT-3: LayerNorm, biases, learned positions). The Hugging Face mapping (LlamaForCausalLM) is at the end.
"""

import jax
from flax import nnx

from MaxText import sharding
from MaxText.layers.attentions import Attention
from MaxText.layers.linears import MlpBlock
from MaxText.layers.normalizations import create_norm
from MaxText.layers.quantization import spec_from_config
from MaxText.utils.ckpt_conversion import weight_mapping

_EMBED_NAMES = ("activation_batch", "activation_length", "activation_embed")


class LlamaDecoderLayer(nnx.Module):
  """x + attn(norm(x)), then x + mlp(norm(x)); dropout (when training) on each branch before the residual add."""

  def __init__(self, config, *, rngs: nnx.Rngs):
    self.pre_self_attention_layer_norm = create_norm(config, config.emb_dim)
    self.self_attention = Attention(config, rngs=rngs)
    self.post_self_attention_layer_norm = create_norm(config, config.emb_dim)
    self.mlp = MlpBlock(
        config.emb_dim,
        config.mlp_dim,
        config.mlp_activations,
        rngs=rngs,
        dtype=config.dtype,
        weight_dtype=config.weight_dtype,
        use_bias=config.use_bias,
        quant=spec_from_config(config),
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
      layer_index: int | jax.Array = 0,
  ) -> jax.Array:
    attn_rng = mlp_rng = None
    if dropout_rng is not None:
      attn_rng, mlp_rng = jax.random.split(dropout_rng)
    h = self.pre_self_attention_layer_norm(x)
    h = self.self_attention(
        h, positions, segment_ids, model_mode=model_mode, deterministic=deterministic, layer_index=layer_index
    )
    x = x + self.dropout(h, deterministic=deterministic, rngs=attn_rng)
    x = sharding.with_logical_constraint(x, _EMBED_NAMES)
    h = self.feed_forward(self.post_self_attention_layer_norm(x), segment_ids)
    x = x + self.dropout(h, deterministic=deterministic, rngs=mlp_rng)
    return sharding.with_logical_constraint(x, _EMBED_NAMES)

  def feed_forward(self, h: jax.Array, segment_ids: jax.Array | None) -> jax.Array:
    """The MLP branch (a hook: MoE subclasses also pass `segment_ids`)."""
    del segment_ids
    return self.mlp(h)


# The name the shared decoder stack looks up in every family module.
DecoderLayer = LlamaDecoderLayer

# ---------------------------------------------------------------- Hugging Face (LlamaForCausalLM)

HF_ARCHITECTURES = ("LlamaForCausalLM",)
HF_MODEL_TYPE = "llama"


def config_from_hf(hf: weight_mapping.HFConfig) -> dict:
  return weight_mapping.llama_config(hf)


def hf_config(config) -> dict:
  return weight_mapping.llama_hf_config(config)


def hf_weights(config) -> list[weight_mapping.Rule]:
  return weight_mapping.embeddings_and_head(config) + weight_mapping.llama_layer(config)
