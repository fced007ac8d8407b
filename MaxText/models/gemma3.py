"""Gemma 3 (text): the Gemma 2 layer with RMSNorm on per-head queries and keys (`use_qk_norm`), five local layers to
one global (`sliding_window_pattern: 6`), no soft caps, and separate RoPE for local layers (`local_rope_max_timescale`,
unscaled) and global ones (`rope_max_timescale`, with linear `rope_scaling_factor` from 4B up).
"""

from typing import Any

from MaxText.models import gemma, gemma2
from MaxText.models.spec import FamilySpec, HFMapping
from MaxText.utils.ckpt_conversion import weight_mapping

# ---------------------------------------------------------------- Hugging Face (Gemma3ForCausalLM; text of the 4B+)

# transformers' Gemma3TextConfig defaults: the 4B-27B checkpoints' text_config leaves most of these out.
HF_DEFAULTS = gemma.HF_DEFAULTS | {
    "vocab_size": 262_208,
    "hidden_size": 2304,
    "intermediate_size": 9216,
    "num_hidden_layers": 26,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "query_pre_attn_scalar": 256,
    "sliding_window": 4096,
    "sliding_window_pattern": 6,
    "rope_theta": 1_000_000.0,
    "rope_local_base_freq": 10_000.0,
}


def config_from_hf(hf: weight_mapping.HFConfig) -> dict:
  if "text_config" in hf.data:  # Gemma3ForConditionalGeneration: its language model
    hf = weight_mapping.HFConfig(hf.data["text_config"] or {}, HF_DEFAULTS)
  keys = gemma.gemma_config(hf)
  keys = {k: v for k, v in keys.items() if not k.startswith("rope_")}
  keys |= weight_mapping.rope_keys(hf.rope("full_attention"), hf.get("max_position_embeddings"))
  local = hf.rope("sliding_attention", theta_key="rope_local_base_freq", scaled=False)
  if local["rope_type"] != "default":
    raise weight_mapping.UnsupportedCheckpointError(f"Gemma 3 local RoPE of type {local['rope_type']!r}")
  keys["local_rope_max_timescale"] = float(local["rope_theta"])
  keys["use_qk_norm"] = True
  return keys | gemma2.local_global_config(hf, hf.get("sliding_window_pattern") or 6, keys["head_dim"])


def hf_config(config) -> dict:
  fields: dict[str, Any] = gemma.gemma_hf_config(config) | gemma2.local_global_hf_config(config)
  local_theta = config.local_rope_max_timescale or config.rope_max_timescale
  fields["rope_parameters"] = {
      "full_attention": fields["rope_parameters"],
      "sliding_attention": {"rope_type": "default", "rope_theta": local_theta},
  }
  fields["rope_local_base_freq"] = local_theta  # with rope_theta/rope_scaling: the 4.x spelling
  if config.sliding_window_pattern:
    fields["sliding_window_pattern"] = config.sliding_window_pattern
  return fields


def hf_tensor_name(name: str) -> str | None:
  """Gemma3ForConditionalGeneration's language-model tensors as Gemma3ForCausalLM's; vision tensors skipped."""
  for prefix in ("language_model.model.", "model.language_model."):
    if name.startswith(prefix):
      return "model." + name[len(prefix) :]
  if name == "language_model.lm_head.weight":
    return "lm_head.weight"
  if name.startswith(("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.")):
    return None
  return name


def hf_weights(config) -> list[weight_mapping.Rule]:
  return weight_mapping.embeddings_and_head(config) + gemma2.gemma2_layer(config)


SPEC = FamilySpec(
    name="gemma3",
    hf=HFMapping(
        ("Gemma3ForCausalLM", "Gemma3ForConditionalGeneration"),
        "gemma3_text",
        config_from_hf,
        hf_config,
        hf_weights,
        defaults=HF_DEFAULTS,
        tensor_name=hf_tensor_name,
    ),
    block=gemma2.BLOCK,
    tiny_hf_configs={
        "gemma3": dict(
            gemma.TINY,
            num_hidden_layers=6,
            sliding_window=8,
            query_pre_attn_scalar=24,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"] * 2,
            rope_parameters={
                "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            },
        )
    },
)
