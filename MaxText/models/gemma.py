"""Gemma (1): the Llama layer with Gemma's numerics, all from config keys.

GeGLU MLP (`mlp_activations: [gelu_tanh, linear]`), norms scaling by (1 + scale) (`normalization_scale_offset: 1`),
token embeddings tied to the output head and scaled by sqrt(emb_dim) (`scale_embedding_by_sqrt_dim`), head_dim 256,
multi-query attention in the 2B size.
"""

from MaxText.models.llama2 import LlamaDecoderLayer
from MaxText.utils.ckpt_conversion import weight_mapping

DecoderLayer = LlamaDecoderLayer

# ---------------------------------------------------------------- Hugging Face (GemmaForCausalLM)

HF_ARCHITECTURES = ("GemmaForCausalLM",)
HF_MODEL_TYPE = "gemma"
HF_DEFAULTS = {"tie_word_embeddings": True, "head_dim": 256, "hidden_act": "gelu_pytorch_tanh"}

# Keys every Gemma generation sets the same way.
GEMMA_KEYS = {"normalization_scale_offset": 1.0, "scale_embedding_by_sqrt_dim": True, "logits_via_embedding": True}


def gemma_config(hf: weight_mapping.HFConfig) -> dict:
  keys = weight_mapping.llama_config(hf, has_mlp_bias=False) | GEMMA_KEYS
  if keys["mlp_activations"][0] == "gelu":
    # Gemma's original config.json says "gelu" but means the tanh approximation (transformers reads it so too).
    keys["mlp_activations"] = ["gelu_tanh", "linear"]
  return keys


def gemma_hf_config(config) -> dict:
  fields = weight_mapping.llama_hf_config(config, has_mlp_bias=False)
  return fields | {"hidden_activation": fields["hidden_act"]}  # the name transformers 4.x reads


def config_from_hf(hf: weight_mapping.HFConfig) -> dict:
  return gemma_config(hf)


def hf_config(config) -> dict:
  return gemma_hf_config(config)


def hf_weights(config) -> list[weight_mapping.Rule]:
  return weight_mapping.embeddings_and_head(config) + weight_mapping.llama_layer(config)
