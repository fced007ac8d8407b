"""Mixtral: the Llama layer with its MLP replaced by a top-2 softmax mixture of experts (layers/moe.py).

The shared block puts the MoeBlock in the `mlp` slot of MoE layers (`num_experts` > 1), so the family is keys.

Every layer is MoE; the router's top-2 weights are renormalized to sum to 1 (norm_topk_prob). The Hugging Face
mapping (MixtralForCausalLM) reads both expert layouts: per-expert `block_sparse_moe.experts.{j}.w1/w2/w3` (what
transformers 4.x and 5.x save_pretrained write) and 5.x's fused `mlp.experts.gate_up_proj/down_proj`.
"""

from MaxText.models import llama
from MaxText.models.spec import FamilySpec, HFMapping
from MaxText.utils.ckpt_conversion import moe_mapping, weight_mapping

# ---------------------------------------------------------------- Hugging Face (MixtralForCausalLM)

# transformers' MixtralConfig defaults for keys a config.json may omit
HF_DEFAULTS = {"sliding_window": None, "num_local_experts": 8, "num_experts_per_tok": 2, "rope_theta": 1e6}
_HF_EXPERT_NAMES = ("w1", "w3", "w2")  # gate, up, down


def config_from_hf(hf: weight_mapping.HFConfig) -> dict:
  return llama.llama_config(hf, has_mlp_bias=False) | {
      "sliding_window_size": int(hf.get("sliding_window") or 0),
      "num_experts": int(hf.require("num_local_experts")),
      "num_experts_per_tok": int(hf.require("num_experts_per_tok")),
      "moe_mlp_dim": int(hf.require("intermediate_size")),
      "norm_topk_prob": True,  # Mixtral always renormalizes its top-k weights
  }


def hf_config(config) -> dict:
  if config.num_experts < 2 or moe_mapping.moe_layers(config) != tuple(range(config.num_decoder_layers)):
    raise weight_mapping.UnsupportedCheckpointError("MixtralForCausalLM needs every layer MoE (num_experts > 1)")
  return llama.llama_hf_config(config, has_mlp_bias=False) | {
      "intermediate_size": config.moe_mlp_dim,
      "sliding_window": config.sliding_window_size or None,
      "num_local_experts": config.num_experts,
      "num_experts_per_tok": config.num_experts_per_tok,
      "output_router_logits": False,
  }


def hf_tensor_name(name: str) -> str | None:
  """transformers 5.x in-memory names (mlp.gate, mlp.experts.{j}.gate_proj, ...) in the saved 4.x spelling."""
  return moe_mapping.rename_experts(
      name, "mlp", "block_sparse_moe", dict(zip(moe_mapping.EXPERT_NAMES, _HF_EXPERT_NAMES))
  )


def hf_weights(config) -> list[weight_mapping.Rule]:
  layers = moe_mapping.moe_layers(config)
  moe = "model.layers.{i}.block_sparse_moe"
  return (
      weight_mapping.embeddings_and_head(config)
      + llama.llama_norms(config)
      + weight_mapping.attention(config)
      + moe_mapping.router(config, hf=f"{moe}.gate.weight", layers=layers)
      + moe_mapping.experts(config, hf=f"{moe}.experts", names=_HF_EXPERT_NAMES, layers=layers)
  )


SPEC = FamilySpec(
    name="mixtral",
    # 5.x fused expert tensors read as per-expert ones
    hf=HFMapping(
        ("MixtralForCausalLM",),
        "mixtral",
        config_from_hf,
        hf_config,
        hf_weights,
        defaults=HF_DEFAULTS,
        tensor_name=hf_tensor_name,
        reader=moe_mapping.PerExpertView,
    ),
    tiny_hf_configs={
        "mixtral": dict(
            llama.TINY,
            intermediate_size=96,
            num_local_experts=4,
            num_experts_per_tok=2,
            rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        )
    },
)
