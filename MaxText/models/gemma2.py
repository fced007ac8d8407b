"""Gemma 2: Gemma's numerics plus norms after attention and after the MLP (its BlockSpec), and from config keys:
local (sliding-window) and global layers alternating (`sliding_window_pattern: 2`), tanh soft caps on attention
logits and final logits, and attention scaled by `query_pre_attn_scalar`**-0.5.
"""

from MaxText.layers.blocks import BlockSpec
from MaxText.models import gemma
from MaxText.models.spec import FamilySpec, HFMapping
from MaxText.utils.ckpt_conversion import weight_mapping

# Each branch is normed on the way in and on the way out.
BLOCK = BlockSpec(
    pre_attention_norm="pre_self_attention_norm",
    post_attention_norm="post_self_attention_norm",
    pre_ffw_norm="pre_ffw_norm",
    post_ffw_norm="post_ffw_norm",
)

# ---------------------------------------------------------------- Hugging Face (Gemma2ForCausalLM)

# transformers' Gemma2Config defaults for keys a config.json may leave out.
HF_DEFAULTS = gemma.HF_DEFAULTS | {
    "query_pre_attn_scalar": 256,
    "sliding_window": 4096,
    "final_logit_softcapping": 30.0,
    "attn_logit_softcapping": 50.0,
}


def local_global_config(hf: weight_mapping.HFConfig, default_pattern: int, head_dim: int) -> dict:
  """Sliding window, its layer pattern (from `layer_types`, else every `default_pattern`th layer global), soft caps
  and attention scale (0 when it is head_dim's, the MaxText default)."""
  window = hf.get("sliding_window") or 0
  scalar = float(hf.get("query_pre_attn_scalar") or 0.0)
  kinds = hf.get("layer_types")
  pattern = weight_mapping.sliding_window_pattern(kinds) if kinds else default_pattern
  if kinds and all(k == "full_attention" for k in kinds):
    window = 0
  return {
      "sliding_window_size": int(window),
      "sliding_window_pattern": pattern if window else 0,
      "query_pre_attn_scalar": 0.0 if scalar == head_dim else scalar,
      "attn_logits_soft_cap": float(hf.get("attn_logit_softcapping") or 0.0),
      "final_logits_soft_cap": float(hf.get("final_logit_softcapping") or 0.0),
  }


def _int_if_whole(x: float) -> int | float:
  return int(x) if float(x).is_integer() else x


def local_global_hf_config(config) -> dict:
  return {
      "sliding_window": config.sliding_window_size or None,
      "layer_types": weight_mapping.layer_types(config),
      "query_pre_attn_scalar": _int_if_whole(config.query_pre_attn_scalar or config.head_dim),  # transformers: an int
      "attn_logit_softcapping": config.attn_logits_soft_cap or None,
      "final_logit_softcapping": config.final_logits_soft_cap or None,
  }


def gemma2_layer(config) -> list[weight_mapping.Rule]:
  """Gemma 2/3 layer params in Hugging Face's names (four norms around attention and MLP)."""
  layer, hf = "decoder/layers/{i}", "model.layers.{i}"
  e = config.emb_dim
  rules = []
  for ours, theirs in (
      (BLOCK.pre_attention_norm, "input_layernorm"),
      (BLOCK.post_attention_norm, "post_attention_layernorm"),
      (BLOCK.pre_ffw_norm, "pre_feedforward_layernorm"),
      (BLOCK.post_ffw_norm, "post_feedforward_layernorm"),
  ):
    rules += weight_mapping.norm(config, f"{layer}/{ours}", f"{hf}.{theirs}", e)
  return rules + weight_mapping.attention(config) + weight_mapping.gated_mlp(config)


def config_from_hf(hf: weight_mapping.HFConfig) -> dict:
  keys = gemma.gemma_config(hf)
  return keys | local_global_config(hf, 2, keys["head_dim"])


def hf_config(config) -> dict:
  return gemma.gemma_hf_config(config) | local_global_hf_config(config)


def hf_weights(config) -> list[weight_mapping.Rule]:
  return weight_mapping.embeddings_and_head(config) + gemma2_layer(config)


SPEC = FamilySpec(
    name="gemma2",
    hf=HFMapping(("Gemma2ForCausalLM",), "gemma2", config_from_hf, hf_config, hf_weights, defaults=HF_DEFAULTS),
    block=BLOCK,
    tiny_hf_configs={
        "gemma2": dict(
            gemma.TINY,
            num_hidden_layers=4,
            sliding_window=8,
            query_pre_attn_scalar=24,
            attn_logit_softcapping=5.0,
            final_logit_softcapping=3.0,
        )
    },
)
