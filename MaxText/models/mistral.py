"""Mistral: the Llama layer; its sliding-window attention comes from the `sliding_window_size` config key."""

from MaxText.models import llama
from MaxText.models.spec import FamilySpec, HFMapping
from MaxText.utils.ckpt_conversion.weight_mapping import HFConfig


def config_from_hf(hf: HFConfig) -> dict:
  return llama.llama_config(hf, has_mlp_bias=False) | {"sliding_window_size": int(hf.get("sliding_window") or 0)}


def hf_config(config) -> dict:
  return llama.llama_hf_config(config, has_mlp_bias=False) | {"sliding_window": config.sliding_window_size or None}


SPEC = FamilySpec(
    name="mistral",
    # transformers' MistralConfig default for a config.json that omits it
    hf=HFMapping(
        ("MistralForCausalLM",),
        "mistral",
        config_from_hf,
        hf_config,
        llama.llama_weights,
        defaults={"sliding_window": 4096},
    ),
    tiny_hf_configs={"mistral": dict(llama.TINY, sliding_window=8)},
)
