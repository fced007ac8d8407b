"""Qwen 3 (dense): the Llama layer with RMSNorm on per-head queries and keys (`use_qk_norm`) and GQA.

Sizes differ in head counts and whether the output head is tied to the embedding (0.6B-4B tie, 8B and up do not).
"""

from MaxText.models.llama2 import LlamaDecoderLayer
from MaxText.utils.ckpt_conversion import weight_mapping

DecoderLayer = LlamaDecoderLayer

# ---------------------------------------------------------------- Hugging Face (Qwen3ForCausalLM)

HF_ARCHITECTURES = ("Qwen3ForCausalLM",)
HF_MODEL_TYPE = "qwen3"
HF_DEFAULTS = {"head_dim": 128}  # transformers' Qwen3Config default (not hidden_size / heads)


def config_from_hf(hf: weight_mapping.HFConfig) -> dict:
  if hf.get("use_sliding_window", False):
    raise weight_mapping.UnsupportedCheckpointError("Qwen 3 with use_sliding_window=true is not supported")
  return weight_mapping.llama_config(hf, has_mlp_bias=False) | {"use_qk_norm": True}


def hf_config(config) -> dict:
  return weight_mapping.llama_hf_config(config, has_mlp_bias=False) | {"use_sliding_window": False}


def hf_weights(config) -> list[weight_mapping.Rule]:
  return weight_mapping.embeddings_and_head(config) + weight_mapping.llama_layer(config)
