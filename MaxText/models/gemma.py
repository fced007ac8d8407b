"""Gemma (1): the Llama layer with Gemma's numerics, all from config keys.

GeGLU MLP (`mlp_activations: [gelu_tanh, linear]`), norms scaling by (1 + scale) (`normalization_scale_offset: 1`),
token embeddings tied to the output head and scaled by sqrt(emb_dim) (`scale_embedding_by_sqrt_dim`), head_dim 256,
multi-query attention in the 2B size.
"""

from MaxText.models import llama
from MaxText.models.spec import FamilySpec, HFMapping
from MaxText.utils.ckpt_conversion.weight_mapping import HFConfig

HF_DEFAULTS = {"tie_word_embeddings": True, "head_dim": 256, "hidden_act": "gelu_pytorch_tanh"}
# Keys every Gemma generation sets the same way.
GEMMA_KEYS = {"normalization_scale_offset": 1.0, "scale_embedding_by_sqrt_dim": True, "logits_via_embedding": True}


def gemma_config(hf: HFConfig) -> dict:
  keys = llama.llama_config(hf, has_mlp_bias=False) | GEMMA_KEYS
  if keys["mlp_activations"][0] == "gelu":
    # Gemma's original config.json says "gelu" but means the tanh approximation (transformers reads it so too).
    keys["mlp_activations"] = ["gelu_tanh", "linear"]
  return keys


def gemma_hf_config(config) -> dict:
  fields = llama.llama_hf_config(config, has_mlp_bias=False)
  return fields | {"hidden_activation": fields["hidden_act"]}  # the name transformers 4.x reads


# Shared by the Gemma generations' tiny test models (configs/models/tests/tiny-gemma*.yml).
TINY = dict(
    llama.TINY,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
    pad_token_id=0,
    hidden_act="gelu_pytorch_tanh",
    hidden_activation="gelu_pytorch_tanh",
)

SPEC = FamilySpec(
    name="gemma",
    hf=HFMapping(
        ("GemmaForCausalLM",), "gemma", gemma_config, gemma_hf_config, llama.llama_weights, defaults=HF_DEFAULTS
    ),
    tiny_hf_configs={"gemma": dict(TINY, num_key_value_heads=1)},
)
