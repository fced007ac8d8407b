"""Qwen 3 MoE: the Qwen 3 layer (QK norm, GQA) with a top-k softmax mixture of experts as its MLP.

Qwen3-30B-A3B and 235B-A22B route each token to 8 of 128 experts and renormalize the top-8 weights
(norm_topk_prob). Layers listed in Hugging Face's `mlp_only_layers`, or skipped by `decoder_sparse_step`, keep a
dense MLP of `intermediate_size`; MaxText expresses that as `first_num_dense_layers` (a leading run of dense layers)
and `interleave_moe_layer_step`, and refuses other arrangements.
"""

import dataclasses

from MaxText.models import llama, qwen3
from MaxText.models.spec import FamilySpec, HFMapping
from MaxText.utils.ckpt_conversion import moe_mapping, weight_mapping

# ---------------------------------------------------------------- Hugging Face (Qwen3MoeForCausalLM)

# transformers' Qwen3MoeConfig defaults for keys a config.json may omit
HF_DEFAULTS = {
    "num_local_experts": 128,
    "num_experts_per_tok": 8,
    "moe_intermediate_size": 768,
    "norm_topk_prob": False,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
}


def _sparse_layers(hf: weight_mapping.HFConfig) -> dict:
  """first_num_dense_layers / interleave_moe_layer_step that give transformers' choice of MoE layers."""
  n, step = int(hf.require("num_hidden_layers")), int(hf.get("decoder_sparse_step") or 1)
  dense_only = set(hf.get("mlp_only_layers") or [])
  want = [i not in dense_only and (i + 1) % step == 0 for i in range(n)]
  for first in range(n + 1):
    if want == [i >= first and (i + 1) % step == 0 for i in range(n)]:
      return {"first_num_dense_layers": first, "interleave_moe_layer_step": step}
  raise weight_mapping.UnsupportedCheckpointError(
      f"mlp_only_layers={sorted(dense_only)} with decoder_sparse_step={step}: MaxText supports dense layers only as"
      " a leading run (first_num_dense_layers) plus every decoder_sparse_step-th layer MoE"
  )


def config_from_hf(hf: weight_mapping.HFConfig) -> dict:
  if hf.get("use_sliding_window", False):
    raise weight_mapping.UnsupportedCheckpointError("Qwen 3 MoE with use_sliding_window=true is not supported")
  # 4.x writes num_experts; 5.x renamed it num_local_experts (the attribute_map still reads num_experts)
  num_experts = int(hf.data["num_experts"] if "num_experts" in hf.data else hf.require("num_local_experts"))
  if num_experts < 2:
    raise weight_mapping.UnsupportedCheckpointError(f"num_experts={num_experts}: a Qwen 3 MoE needs at least 2")
  return (
      llama.llama_config(hf, has_mlp_bias=False)
      | {
          "use_qk_norm": True,
          "num_experts": num_experts,
          "num_experts_per_tok": int(hf.require("num_experts_per_tok")),
          "moe_mlp_dim": int(hf.require("moe_intermediate_size")),
          "norm_topk_prob": bool(hf.get("norm_topk_prob")),
      }
      | _sparse_layers(hf)
  )


def hf_config(config) -> dict:
  if config.num_experts < 2:
    raise weight_mapping.UnsupportedCheckpointError("Qwen3MoeForCausalLM needs num_experts > 1")
  return llama.llama_hf_config(config, has_mlp_bias=False) | {
      "use_sliding_window": False,
      "num_experts": config.num_experts,  # 4.x's name; 5.x maps it to num_local_experts
      "num_local_experts": config.num_experts,
      "num_experts_per_tok": config.num_experts_per_tok,
      "moe_intermediate_size": config.moe_mlp_dim,
      "norm_topk_prob": config.norm_topk_prob,
      "decoder_sparse_step": config.interleave_moe_layer_step,
      "mlp_only_layers": list(range(config.first_num_dense_layers)),
      "output_router_logits": False,
  }


def hf_weights(config) -> list[weight_mapping.Rule]:
  moe, dense = moe_mapping.moe_layers(config), moe_mapping.dense_layers(config)
  mlp = "model.layers.{i}.mlp"
  rules = weight_mapping.embeddings_and_head(config)
  for rule in llama.llama_layer(config):
    if "/mlp/" not in rule.maxtext[0]:
      rules.append(rule)
    elif dense:
      rules.append(dataclasses.replace(rule, layers=dense))
  return (
      rules
      + moe_mapping.router(config, hf=f"{mlp}.gate.weight", layers=moe)
      + moe_mapping.experts(config, hf=f"{mlp}.experts", layers=moe)
  )


SPEC = FamilySpec(
    name="qwen3_moe",
    # 5.x fused expert tensors read as per-expert ones
    hf=HFMapping(
        ("Qwen3MoeForCausalLM",),
        "qwen3_moe",
        config_from_hf,
        hf_config,
        hf_weights,
        defaults=HF_DEFAULTS,
        reader=moe_mapping.PerExpertView,
    ),
    tiny_hf_configs={
        "qwen3-moe": dict(
            qwen3.TINY,
            num_hidden_layers=3,
            num_experts=8,
            num_experts_per_tok=4,
            moe_intermediate_size=32,
            norm_topk_prob=True,
            mlp_only_layers=[0],
        )
    },
)
