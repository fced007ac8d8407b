"""Qwen 3 (dense): the Llama layer with RMSNorm on per-head queries and keys (`use_qk_norm`) and GQA.

Sizes differ in head counts and whether the output head is tied to the embedding (0.6B-4B tie, 8B and up do not).
"""

from MaxText.models import llama
from MaxText.models.spec import FamilySpec, HFMapping
from MaxText.utils.ckpt_conversion.weight_mapping import HFConfig, UnsupportedCheckpointError


def config_from_hf(hf: HFConfig) -> dict:
  if hf.get("use_sliding_window", False):
    raise UnsupportedCheckpointError("Qwen 3 with use_sliding_window=true is not supported")
  return llama.llama_config(hf, has_mlp_bias=False) | {"use_qk_norm": True}


def hf_config(config) -> dict:
  return llama.llama_hf_config(config, has_mlp_bias=False) | {"use_sliding_window": False}


TINY = dict(llama.TINY, rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0})

SPEC = FamilySpec(
    name="qwen3",
    # transformers' Qwen3Config default (not hidden_size / heads)
    hf=HFMapping(
        ("Qwen3ForCausalLM",), "qwen3", config_from_hf, hf_config, llama.llama_weights, defaults={"head_dim": 128}
    ),
    tiny_hf_configs={"qwen3": TINY},
)
