"""GPT-3 (and GPT-2, its Hugging Face form): the shared pre-norm block configured by keys.

LayerNorm with a bias (`normalization_type: layernorm`), biases on every projection (`use_bias`), a plain GELU MLP
(`mlp_activations: [gelu_tanh]`), learned positions instead of RoPE (`trainable_position_size`, `rope_type: none`) and
an output head tied to the token embedding. GPT-3's alternating sparse attention is not modelled (dense everywhere).
"""

import numpy as np

from MaxText.models.spec import FamilySpec, HFMapping
from MaxText.utils.ckpt_conversion import weight_mapping

# ---------------------------------------------------------------- Hugging Face (GPT2LMHeadModel)

HF_DEFAULTS = {"tie_word_embeddings": True, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5}

_UNSUPPORTED = {"scale_attn_by_inverse_layer_idx": True, "add_cross_attention": True, "scale_attn_weights": False}


def config_from_hf(hf: weight_mapping.HFConfig) -> dict:
  for key, bad in _UNSUPPORTED.items():
    if hf.get(key) == bad:
      raise weight_mapping.UnsupportedCheckpointError(f"GPT-2 with {key}={bad} is not supported")
  emb, heads = hf.get("n_embd") or hf.require("hidden_size"), hf.get("n_head") or hf.require("num_attention_heads")
  return dict(
      base_emb_dim=emb,
      base_num_query_heads=heads,
      base_num_kv_heads=heads,
      base_mlp_dim=hf.get("n_inner") or 4 * emb,
      base_num_decoder_layers=hf.get("n_layer") or hf.require("num_hidden_layers"),
      head_dim=emb // heads,
      vocab_size=hf.require("vocab_size"),
      normalization_type="layernorm",
      normalization_layer_epsilon=float(hf.get("layer_norm_epsilon")),
      use_bias=True,
      mlp_activations=[weight_mapping.activation_name(hf.get("activation_function"))],
      rope_type="none",
      trainable_position_size=hf.get("n_positions") or hf.require("max_position_embeddings"),
      logits_via_embedding=bool(hf.get("tie_word_embeddings")),
  )


def hf_config(config) -> dict:
  if config.num_query_heads * config.head_dim != config.emb_dim or config.num_kv_heads != config.num_query_heads:
    raise weight_mapping.UnsupportedCheckpointError(
        "GPT-2 needs num_kv_heads == num_query_heads and num_query_heads * head_dim == emb_dim"
    )
  if len(config.mlp_activations) != 1:
    raise weight_mapping.UnsupportedCheckpointError(f"GPT-2's MLP has one activation, not {config.mlp_activations}")
  act = config.mlp_activations[0]
  return dict(
      n_embd=config.emb_dim,
      n_head=config.num_query_heads,
      n_layer=config.num_decoder_layers,
      n_inner=config.mlp_dim,
      n_positions=config.trainable_position_size,
      vocab_size=config.vocab_size,
      layer_norm_epsilon=config.normalization_layer_epsilon,
      activation_function="gelu_new" if act == "gelu_tanh" else weight_mapping.hf_activation_name(act),
      tie_word_embeddings=config.logits_via_embedding,
      resid_pdrop=config.dropout_rate,
      embd_pdrop=config.dropout_rate,
      attn_pdrop=config.dropout_rate,
  )


def hf_tensor_name(name: str) -> str | None:
  """Names with the GPT2LMHeadModel prefix (OpenAI's original files have none); the causal-mask buffers skipped."""
  if name.endswith((".attn.bias", ".attn.masked_bias")):
    return None
  return name if name.startswith(("transformer.", "lm_head.")) else f"transformer.{name}"


def _fused_qkv(config, suffix: str) -> weight_mapping.Rule:
  """c_attn (queries, keys and values side by side in the last axis) <-> MaxText's three projections."""
  e, h, d = config.emb_dim, config.num_query_heads, config.head_dim
  layer = "decoder/layers/{i}/self_attention"
  is_kernel = suffix == "kernel"
  lead = (e,) if is_kernel else ()

  def to_maxtext(arrays):
    return [part.reshape(lead + (h, d)) for part in np.split(arrays[0], 3, axis=-1)]

  def to_hf(arrays):
    return [np.concatenate([a.reshape(lead + (h * d,)) for a in arrays], axis=-1)]

  return weight_mapping.Rule(
      tuple(f"{layer}/{name}/{suffix}" for name in ("query", "key", "value")),
      (f"transformer.h.{{i}}.attn.c_attn.{'weight' if is_kernel else 'bias'}",),
      (lead + (3 * h * d,),),
      to_maxtext,
      to_hf,
  )


def hf_weights(config) -> list[weight_mapping.Rule]:
  e, m, h, d = config.emb_dim, config.mlp_dim, config.num_query_heads, config.head_dim
  layer, hf = "decoder/layers/{i}", "transformer.h.{i}"
  identity, conv1d = weight_mapping.identity, weight_mapping.conv1d
  rules = [
      identity("token_embedder/embedding", "transformer.wte.weight", (config.vocab_size, e)),
      identity("position_embedder/embedding", "transformer.wpe.weight", (config.trainable_position_size, e)),
      *weight_mapping.norm(config, "decoder_norm", "transformer.ln_f", e),
      *weight_mapping.norm(config, f"{layer}/pre_self_attention_layer_norm", f"{hf}.ln_1", e),
      *weight_mapping.norm(config, f"{layer}/post_self_attention_layer_norm", f"{hf}.ln_2", e),
      _fused_qkv(config, "kernel"),
      _fused_qkv(config, "bias"),
      conv1d(f"{layer}/self_attention/out/kernel", f"{hf}.attn.c_proj.weight", (h, d), e),
      identity(f"{layer}/self_attention/out/bias", f"{hf}.attn.c_proj.bias", e),
      conv1d(f"{layer}/mlp/wi/kernel", f"{hf}.mlp.c_fc.weight", e, m),
      identity(f"{layer}/mlp/wi/bias", f"{hf}.mlp.c_fc.bias", m),
      conv1d(f"{layer}/mlp/wo/kernel", f"{hf}.mlp.c_proj.weight", m, e),
      identity(f"{layer}/mlp/wo/bias", f"{hf}.mlp.c_proj.bias", e),
  ]
  if not config.logits_via_embedding:
    rules.append(weight_mapping.linear("logits_dense/kernel", "lm_head.weight", e, config.vocab_size))
  return rules


SPEC = FamilySpec(
    name="gpt3",
    hf=HFMapping(
        ("GPT2LMHeadModel",),
        "gpt2",
        config_from_hf,
        hf_config,
        hf_weights,
        defaults=HF_DEFAULTS,
        tensor_name=hf_tensor_name,
    ),
    tiny_hf_configs={
        "gpt3": dict(
            n_embd=64,
            n_head=4,
            n_layer=2,
            n_inner=256,
            n_positions=64,
            vocab_size=256,
            activation_function="gelu_new",
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=0,
            eos_token_id=0,
        )
    },
)
