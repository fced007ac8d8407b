"""DeepSeek V2 and V3: Multi-head Latent Attention and a routed MoE with shared experts after a dense prefix.

The layer is the shared pre-norm block (as Llama) with MLA (MaxText/layers/mla.py, `attention_type: mla`) for
attention and, from layer `first_num_dense_layers` on, the MoeBlock (MaxText/layers/moe.py) in the MLP's slot.
V2 and V3 differ only in config keys: V2 routes on softmax scores (group-limited by the best expert of each group
in the 236B model), V3 on sigmoid scores plus a selection-only bias (`routed_bias`, its e_score_correction_bias)
with groups ranked by their top-2 scores, renormalised top-k weights and a routed scaling factor.
Multi-token prediction (V3's extra MTP module) is not implemented; converting a checkpoint skips its MTP layer.

The module is the Hugging Face mapping (DeepseekV2ForCausalLM, DeepseekV3ForCausalLM) and the spec.
"""

import dataclasses
import re

import numpy as np

from MaxText.config_schema import ConfigError
from MaxText.models import llama
from MaxText.models.spec import FamilySpec, HFMapping
from MaxText.utils.ckpt_conversion import moe_mapping, weight_mapping


def check_config(values: dict):
  """The block's attention is MLA only when `attention_type: mla`; DeepSeek has no other."""
  if values["attention_type"] != "mla":
    raise ConfigError(f"attention_type: decoder_block deepseek needs mla (got {values['attention_type']!r})")


# ---------------------------------------------------------------- Hugging Face (DeepseekV2/V3ForCausalLM)

_MODEL_TYPES = {"DeepseekV3ForCausalLM": "deepseek_v3", "DeepseekV2ForCausalLM": "deepseek_v2"}
# transformers' config defaults for keys a config.json may leave out (both versions, where they differ: V3's).
HF_DEFAULTS = {
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "kv_lora_rank": 512,
    "rms_norm_eps": 1e-6,
    "first_k_dense_replace": 0,
    "routed_scaling_factor": 1.0,
    "rope_interleave": True,
}
_V3_DEFAULTS = {"n_group": 8, "topk_group": 4, "first_k_dense_replace": 3, "norm_topk_prob": True}


def _is_v3(hf: weight_mapping.HFConfig) -> bool:
  architecture = (hf.get("architectures") or [""])[0]
  return architecture == "DeepseekV3ForCausalLM" or hf.get("model_type") == "deepseek_v3"


def hf_architecture(config) -> tuple[str, str]:
  """(architecture, model_type) the config is written as: V3 with the selection bias, else V2."""
  architecture = "DeepseekV3ForCausalLM" if config.routed_bias else "DeepseekV2ForCausalLM"
  return architecture, _MODEL_TYPES[architecture]


def _unsupported(message: str):
  raise weight_mapping.UnsupportedCheckpointError(message)


def config_from_hf(hf: weight_mapping.HFConfig) -> dict:
  v3 = _is_v3(hf)
  if v3:
    hf = weight_mapping.HFConfig(hf.data, {**hf.defaults, **_V3_DEFAULTS})
  heads = hf.require("num_attention_heads")
  if (hf.get("num_key_value_heads") or heads) != heads:
    _unsupported(f"num_key_value_heads={hf.get('num_key_value_heads')}: MLA has one key/value per query head ({heads})")
  for key in ("attention_bias", "mlp_bias"):
    if hf.get(key, False):
      _unsupported(f"{key}=true is not supported for DeepSeek (the published models have no biases)")
  if v3 and not hf.get("rope_interleave"):
    _unsupported("rope_interleave=false is not supported (DeepSeek checkpoints interleave the rope dimensions)")
  if (hf.get("moe_layer_freq") or 1) != 1:
    _unsupported(f"moe_layer_freq={hf.get('moe_layer_freq')}: transformers makes every layer after the dense ones MoE")
  if hf.get("n_shared_experts", 0) < 1:
    _unsupported("n_shared_experts must be >= 1 (transformers' DeepSeek MoE always has its shared MLP)")
  act = hf.get("hidden_act") or "silu"
  n_group, topk_group = hf.get("n_group") or 1, hf.get("topk_group") or 1
  if v3:
    routing = dict(routed_score_func="sigmoid", routed_bias=True, norm_topk_prob=bool(hf.get("norm_topk_prob")))
    grouped = n_group > 1
  else:
    if hf.get("norm_topk_prob"):
      _unsupported("norm_topk_prob=true with DeepseekV2: transformers ignores it; refusing to guess")
    method = hf.get("topk_method") or "greedy"
    if method not in ("greedy", "group_limited_greedy"):
      _unsupported(f"topk_method={method!r} is not supported for DeepseekV2 (greedy, group_limited_greedy)")
    routing = dict(routed_score_func="softmax", routed_bias=False, norm_topk_prob=False)
    grouped = method == "group_limited_greedy"
  keys = dict(
      base_emb_dim=hf.require("hidden_size"),
      base_num_query_heads=heads,
      base_num_kv_heads=heads,
      base_mlp_dim=hf.require("intermediate_size"),
      base_num_decoder_layers=hf.require("num_hidden_layers"),
      head_dim=hf.get("qk_nope_head_dim") + hf.get("qk_rope_head_dim"),
      vocab_size=hf.require("vocab_size"),
      normalization_layer_epsilon=float(hf.get("rms_norm_eps")),
      logits_via_embedding=bool(hf.get("tie_word_embeddings")),
      mlp_activations=[weight_mapping.activation_name(act), "linear"],
      use_bias=False,
      attention_type="mla",
      q_lora_rank=hf.get("q_lora_rank") or 0,
      kv_lora_rank=hf.get("kv_lora_rank"),
      qk_nope_head_dim=hf.get("qk_nope_head_dim"),
      qk_rope_head_dim=hf.get("qk_rope_head_dim"),
      v_head_dim=hf.get("v_head_dim"),
      num_experts=hf.require("n_routed_experts"),
      num_experts_per_tok=hf.require("num_experts_per_tok"),
      moe_mlp_dim=hf.require("moe_intermediate_size"),
      shared_experts=hf.get("n_shared_experts"),
      routed_scaling_factor=float(hf.get("routed_scaling_factor")),
      n_routing_groups=n_group if grouped else -1,
      topk_routing_group=topk_group if grouped else -1,
      first_num_dense_layers=hf.get("first_k_dense_replace"),
      interleave_moe_layer_step=1,
      **routing,
  )
  keys.update(weight_mapping.rope_keys(hf.rope(), hf.get("max_position_embeddings")))
  return keys


def hf_config(config) -> dict:
  v3 = config.routed_bias
  grouped = config.n_routing_groups > 0
  # Llama's fields, but MLA has one key/value per query head and no single head_dim.
  fields = {k: v for k, v in llama.llama_hf_config(config, has_mlp_bias=False).items() if k != "head_dim"}
  fields.update(
      moe_intermediate_size=config.moe_mlp_dim,
      num_key_value_heads=config.num_query_heads,
      q_lora_rank=config.q_lora_rank or None,
      kv_lora_rank=config.kv_lora_rank,
      qk_nope_head_dim=config.qk_nope_head_dim,
      qk_rope_head_dim=config.qk_rope_head_dim,
      v_head_dim=config.v_head_dim,
      n_routed_experts=config.num_experts,
      num_experts_per_tok=config.num_experts_per_tok,
      n_shared_experts=config.shared_experts,
      routed_scaling_factor=config.routed_scaling_factor,
      norm_topk_prob=config.norm_topk_prob,
      first_k_dense_replace=config.first_num_dense_layers,
      n_group=config.n_routing_groups if grouped else 1,
      topk_group=config.topk_routing_group if grouped else 1,
  )
  if v3:
    fields.update(topk_method="noaux_tc", scoring_func="sigmoid", rope_interleave=True, num_nextn_predict_layers=0)
  else:
    fields.update(topk_method="group_limited_greedy" if grouped else "greedy", scoring_func="softmax", mlp_bias=False)
  return fields


def _rope_permutation(rope_dim: int) -> np.ndarray:
  """MaxText rope column j holds checkpoint column perm[j]: interleaved pairs (2i, 2i+1) -> (i, i + d/2)."""
  return np.concatenate([np.arange(0, rope_dim, 2), np.arange(1, rope_dim, 2)])


def _with_rope_columns(rule: weight_mapping.Rule, rope_dim: int) -> weight_mapping.Rule:
  """A linear rule whose kernel's last axis ends in `rope_dim` rope columns, de-interleaved for MaxText."""
  perm = _rope_permutation(rope_dim)
  inverse = np.argsort(perm)

  def permute(kernel: np.ndarray, order: np.ndarray) -> np.ndarray:
    out = kernel.copy()
    out[..., -rope_dim:] = kernel[..., -rope_dim:][..., order]
    return out

  def to_hf(arrays):
    return rule.to_hf([permute(arrays[0], inverse)])

  return dataclasses.replace(rule, to_maxtext=lambda a: [permute(rule.to_maxtext(a)[0], perm)], to_hf=to_hf)


def attention_rules(config) -> list[weight_mapping.Rule]:
  """MLA's projections and norms in transformers' names (rope columns de-interleaved)."""
  mt, hf = "decoder/layers/{i}/self_attention", "model.layers.{i}.self_attn"
  e, h = config.emb_dim, config.num_query_heads
  nope, rope, v, lora = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim, config.kv_lora_rank
  linear = weight_mapping.linear
  if config.q_lora_rank > 0:
    q = config.q_lora_rank
    rules = [
        linear(f"{mt}/wq_a/kernel", f"{hf}.q_a_proj.weight", e, q),
        weight_mapping.identity(f"{mt}/q_norm/scale", f"{hf}.q_a_layernorm.weight", q),
        _with_rope_columns(linear(f"{mt}/wq_b/kernel", f"{hf}.q_b_proj.weight", q, (h, nope + rope)), rope),
    ]
  else:
    rules = [_with_rope_columns(linear(f"{mt}/query/kernel", f"{hf}.q_proj.weight", e, (h, nope + rope)), rope)]
  return rules + [
      _with_rope_columns(linear(f"{mt}/wkv_a/kernel", f"{hf}.kv_a_proj_with_mqa.weight", e, lora + rope), rope),
      weight_mapping.identity(f"{mt}/kv_norm/scale", f"{hf}.kv_a_layernorm.weight", lora),
      linear(f"{mt}/wkv_b/kernel", f"{hf}.kv_b_proj.weight", lora, (h, nope + v)),
      linear(f"{mt}/out/kernel", f"{hf}.o_proj.weight", (h, v), e),
  ]


def moe_rules(config) -> list[weight_mapping.Rule]:
  """Router (+ V3's e_score_correction_bias), per-expert routed experts and the shared MLP of the MoE layers."""
  layers = moe_mapping.moe_layers(config)
  hf = "model.layers.{i}.mlp"
  rules = moe_mapping.router(config, hf=f"{hf}.gate.weight", layers=layers)
  if config.routed_bias:
    rules += moe_mapping.router_bias(config, hf=f"{hf}.gate.e_score_correction_bias", layers=layers)
  rules += moe_mapping.experts(config, hf=f"{hf}.experts", layers=layers)
  return rules + moe_mapping.shared_experts(config, hf=f"{hf}.shared_experts", layers=layers)


def hf_weights(config) -> list[weight_mapping.Rule]:
  """Every parameter, experts per expert (what save_pretrained writes; hf_reader also reads the fused layout)."""
  rules = weight_mapping.embeddings_and_head(config) + llama.llama_norms(config) + attention_rules(config)
  dense = [dataclasses.replace(r, layers=moe_mapping.dense_layers(config)) for r in weight_mapping.gated_mlp(config)]
  return rules + dense + moe_rules(config)


class _WithoutMtpLayers:
  """A reader view hiding V3's multi-token-prediction layers (the layers holding an `eh_proj`), which MaxText lacks."""

  def __init__(self, reader):
    self.reader = reader
    mtp = {m.group(1) for m in map(_MTP_PROJ.fullmatch, reader.names()) if m}
    self.tensors = {k: v for k, v in reader.tensors.items() if _layer_of(k) not in mtp}

  def names(self) -> list[str]:
    return list(self.tensors)

  def read(self, name: str) -> np.ndarray:
    return self.reader.read(name)


_MTP_PROJ = re.compile(r"model\.layers\.(\d+)\.eh_proj\.weight")
_LAYER = re.compile(r"model\.layers\.(\d+)\.")


def _layer_of(name: str) -> str | None:
  match = _LAYER.match(name)
  return match.group(1) if match else None


def hf_reader(reader) -> moe_mapping.PerExpertView:
  """The checkpoint without MTP layers, with 5.x fused expert tensors shown per expert."""
  return moe_mapping.PerExpertView(_WithoutMtpLayers(reader))


def _tiny(**kw) -> dict:
  """The tiny test models' shared settings (configs/models/tests/tiny-deepseek{2,3}.yml), YaRN-scaled."""
  rope = dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=16, beta_fast=32.0)
  mscales = {k: kw.pop(k) for k in ("mscale", "mscale_all_dim")}
  return dict(
      vocab_size=256,
      hidden_size=64,
      intermediate_size=128,
      moe_intermediate_size=32,
      num_hidden_layers=3,
      num_attention_heads=4,
      num_key_value_heads=4,
      n_routed_experts=8,
      num_experts_per_tok=2,
      kv_lora_rank=32,
      qk_nope_head_dim=16,
      qk_rope_head_dim=8,
      v_head_dim=12,
      n_group=4,
      topk_group=2,
      first_k_dense_replace=1,
      max_position_embeddings=64,
      rms_norm_eps=1e-6,
      tie_word_embeddings=False,
      rope_parameters=dict(rope, beta_slow=1.0, **mscales),
      **kw,
  )


SPEC = FamilySpec(
    name="deepseek",
    # V3 is written for configs with routed_bias (sigmoid routing), V2 for the others (see hf_architecture).
    hf=HFMapping(
        ("DeepseekV3ForCausalLM", "DeepseekV2ForCausalLM"),
        "deepseek_v3",
        config_from_hf,
        hf_config,
        hf_weights,
        defaults=HF_DEFAULTS,
        architecture_for=hf_architecture,
        reader=hf_reader,
    ),
    check_config=check_config,
    tiny_hf_configs={
        # A plain query projection, group-limited softmax routing.
        "deepseek2": _tiny(
            architectures=["DeepseekV2ForCausalLM"],
            model_type="deepseek_v2",
            q_lora_rank=None,
            n_shared_experts=2,
            routed_scaling_factor=2.0,
            norm_topk_prob=False,
            topk_method="group_limited_greedy",
            mscale=0.707,
            mscale_all_dim=0.707,
        ),
        # A low-rank query, sigmoid routing with a selection bias, renormalized top-k.
        "deepseek3": _tiny(
            architectures=["DeepseekV3ForCausalLM"],
            model_type="deepseek_v3",
            q_lora_rank=24,
            n_shared_experts=1,
            routed_scaling_factor=2.5,
            norm_topk_prob=True,
            mscale=1.0,
            mscale_all_dim=0.8,
        ),
    },
)
