"""Llama (Llama 2, Llama 3.x): pre-RMSNorm self-attention and gated MLP, each on a residual branch.

Every Llama generation shares this layer; generations differ only by config keys (GQA head counts, `rope_type`,
`rope_max_timescale`, vocab), which the model ymls set. The Hugging Face mapping (LlamaForCausalLM) here is the
config.json and tensor naming most other families start from (`llama_config`, `llama_hf_config`, `llama_layer`).
"""

from typing import Any

from MaxText.models.spec import FamilySpec, HFMapping
from MaxText.utils.ckpt_conversion import weight_mapping
from MaxText.utils.ckpt_conversion.weight_mapping import HFConfig, Rule, UnsupportedCheckpointError


def llama_config(hf: HFConfig, *, has_mlp_bias: bool = True) -> dict[str, Any]:
  """MaxText model keys for a Llama-style config.json (dims, norm epsilon, tying, gated MLP, RoPE, biases).

  `has_mlp_bias=False` for families whose MLP never has biases (there attention_bias must be false too).
  """
  hidden, heads = hf.require("hidden_size"), hf.require("num_attention_heads")
  attention_bias = bool(hf.get("attention_bias", False))
  mlp_bias = bool(hf.get("mlp_bias", False)) if has_mlp_bias else False
  if attention_bias != mlp_bias:
    raise UnsupportedCheckpointError(
        f"attention_bias={attention_bias} with mlp_bias={mlp_bias}: biases must be on both or neither (use_bias)"
    )
  act = hf.get("hidden_activation") or hf.get("hidden_act") or "silu"
  keys = dict(
      base_emb_dim=hidden,
      base_num_query_heads=heads,
      base_num_kv_heads=hf.get("num_key_value_heads") or heads,
      base_mlp_dim=hf.require("intermediate_size"),
      base_num_decoder_layers=hf.require("num_hidden_layers"),
      head_dim=hf.get("head_dim") or hidden // heads,
      vocab_size=hf.require("vocab_size"),
      normalization_layer_epsilon=float(hf.get("rms_norm_eps") or 1e-6),
      logits_via_embedding=bool(hf.get("tie_word_embeddings")),
      mlp_activations=[weight_mapping.activation_name(act), "linear"],
      use_bias=attention_bias,
  )
  keys.update(weight_mapping.rope_keys(hf.rope(), hf.get("max_position_embeddings")))
  return keys


def llama_hf_config(config, *, has_mlp_bias: bool = True) -> dict[str, Any]:
  """The Llama-style config.json fields for a MaxText config (both RoPE spellings, so 4.x and 5.x read it)."""
  acts = list(config.mlp_activations)
  if len(acts) != 2 or acts[1] != "linear":
    raise UnsupportedCheckpointError(f"mlp_activations {acts}: Hugging Face's gated MLP needs [activation, linear]")
  rope = weight_mapping.hf_rope(config)
  fields = dict(
      hidden_size=config.emb_dim,
      intermediate_size=config.mlp_dim,
      num_hidden_layers=config.num_decoder_layers,
      num_attention_heads=config.num_query_heads,
      num_key_value_heads=config.num_kv_heads,
      head_dim=config.head_dim,
      vocab_size=config.vocab_size,
      rms_norm_eps=config.normalization_layer_epsilon,
      tie_word_embeddings=config.logits_via_embedding,
      hidden_act=weight_mapping.hf_activation_name(acts[0]),
      max_position_embeddings=config.max_target_length,
      attention_bias=config.use_bias,
      rope_parameters=rope,
      **weight_mapping.legacy_rope(rope),
  )
  if has_mlp_bias:
    fields["mlp_bias"] = config.use_bias
  return fields


def llama_norms(config) -> list[Rule]:
  """The block's two norms in Llama's names: input_layernorm, post_attention_layernorm."""
  layer, hf, e = "decoder/layers/{i}", "model.layers.{i}", config.emb_dim
  rules = weight_mapping.norm(config, f"{layer}/pre_self_attention_layer_norm", f"{hf}.input_layernorm", e)
  return rules + weight_mapping.norm(
      config, f"{layer}/post_self_attention_layer_norm", f"{hf}.post_attention_layernorm", e
  )


def llama_layer(config) -> list[Rule]:
  """A whole Llama layer: norms, self_attn, gated mlp."""
  return llama_norms(config) + weight_mapping.attention(config) + weight_mapping.gated_mlp(config)


def llama_weights(config) -> list[Rule]:
  return weight_mapping.embeddings_and_head(config) + llama_layer(config)


# The tiny test model (configs/models/tests/tiny-llama.yml's dims); the parity test fills its weights.
TINY = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=128,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
)

SPEC = FamilySpec(
    name="llama2",
    hf=HFMapping(("LlamaForCausalLM",), "llama", llama_config, llama_hf_config, llama_weights),
    tiny_hf_configs={
        "llama": TINY,
        # Llama 3.1 RoPE scaling (all three frequency bands occur at head_dim 16), biases, a tied head.
        "llama3.1-bias": dict(
            TINY,
            tie_word_embeddings=True,
            attention_bias=True,
            mlp_bias=True,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        ),
    },
)
