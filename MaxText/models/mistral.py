"""Mistral: the Llama layer; its sliding-window attention comes from the `sliding_window_size` config key."""

from MaxText.models.llama2 import LlamaDecoderLayer
from MaxText.utils.ckpt_conversion import weight_mapping

DecoderLayer = LlamaDecoderLayer

# ---------------------------------------------------------------- Hugging Face (MistralForCausalLM)

HF_ARCHITECTURES = ("MistralForCausalLM",)
HF_MODEL_TYPE = "mistral"
HF_DEFAULTS = {"sliding_window": 4096}  # transformers' MistralConfig defaults for keys a config.json may omit


def config_from_hf(hf: weight_mapping.HFConfig) -> dict:
  return weight_mapping.llama_config(hf, has_mlp_bias=False) | {"sliding_window_size": int(hf.get("sliding_window") or 0)}


def hf_config(config) -> dict:
  return weight_mapping.llama_hf_config(config, has_mlp_bias=False) | {
      "sliding_window": config.sliding_window_size or None
  }


def hf_weights(config) -> list[weight_mapping.Rule]:
  return weight_mapping.embeddings_and_head(config) + weight_mapping.llama_layer(config)
