"""Llama 4 (text): the Llama block with a top-1 sigmoid mixture of experts and Llama 4's per-layer attention kinds.

Everything else comes from config keys the shared layers read (MaxText/layers/attentions.py, moe.py):
- every `nope_layer_interval`-th layer (4) has no RoPE, attends causally over the whole context and scales its
  queries up with the position (`attn_temperature_tuning`); the other layers rotate (Scout: Llama 3.1 RoPE scaling),
  L2-normalize queries and keys after the rotation (`use_qk_l2_norm`, Scout) and attend only within their chunk of
  `chunk_attn_window_size` (8192) positions;
- MoE (`num_experts`, `num_experts_per_tok: 1`, `routed_score_func: sigmoid`, `moe_input_scaled_by_router`: the
  router score multiplies the expert's input, not its output) plus one shared expert, on every layer (Scout) or
  every other layer (Maverick, `interleave_moe_layer_step: 2`; its dense layers are `base_mlp_dim` wide).

The Hugging Face mapping (Llama4ForCausalLM, and the text model of Llama4ForConditionalGeneration) is at the end.
transformers rotates (2i, 2i+1) pairs (complex form) where MaxText rotates (i, i + head_dim/2), so the converter
permutes each head's query/key projection outputs: dot products, the L2 norm and the KV cache are unchanged by a
permutation shared by q and k, and the permutation round-trips bit for bit.
"""

import dataclasses
import re
from typing import Any

import numpy as np

from MaxText.models import llama
from MaxText.models.spec import FamilySpec, HFMapping
from MaxText.utils.ckpt_conversion import moe_mapping, weight_mapping

# ---------------------------------------------------------------- Hugging Face (Llama4ForCausalLM)

# transformers' Llama4TextConfig defaults, for keys a config.json may leave out.
HF_DEFAULTS = {
    "vocab_size": 202048,
    "hidden_size": 5120,
    "intermediate_size": 8192,
    "intermediate_size_mlp": 16384,
    "num_hidden_layers": 48,
    "num_attention_heads": 40,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "num_local_experts": 16,
    "num_experts_per_tok": 1,
    "interleave_moe_layer_step": 1,
    "use_qk_norm": True,
    "no_rope_layer_interval": 4,
    "attention_chunk_size": 8192,
    "attn_temperature_tuning": True,
    "floor_scale": 8192,
    "attn_scale": 0.1,
}


def _every_nth(flags: list[bool], what: str) -> int:
  """N when flags[i] == ((i + 1) % N == 0) for every i (0 when no flag is set), else an error naming `what`."""
  if not any(flags):
    return 0
  n = flags.index(True) + 1
  if flags != [(i + 1) % n == 0 for i in range(len(flags))]:
    raise weight_mapping.UnsupportedCheckpointError(f"{what} {flags} is not 'every Nth layer'")
  return n


def _moe_pattern(flags: list[bool]) -> tuple[int, int]:
  """(first_num_dense_layers, interleave_moe_layer_step) whose MoE layers are exactly `flags` (smallest of each)."""
  n = len(flags)
  for first in range(n + 1):
    for step in range(1, n + 1):
      if flags == [i >= first and (i + 1) % step == 0 for i in range(n)]:
        return first, step
  raise weight_mapping.UnsupportedCheckpointError(
      f"moe_layers {[i for i, f in enumerate(flags) if f]}: supported is every k-th layer after the first dense ones"
  )


def _moe_keys(hf: weight_mapping.HFConfig, num_layers: int) -> dict[str, Any]:
  """MoE keys: top-1 sigmoid routing scaling the expert input, one shared expert, the MoE layer pattern."""
  experts, top_k = int(hf.get("num_local_experts")), int(hf.get("num_experts_per_tok"))
  if top_k != 1:
    raise weight_mapping.UnsupportedCheckpointError(f"num_experts_per_tok={top_k}: Llama 4 routes each token to 1")
  step, first_dense = int(hf.get("interleave_moe_layer_step") or 1), 0
  moe_layers = hf.get("moe_layers")
  if moe_layers is not None:
    flags = [i in set(moe_layers) for i in range(num_layers)]
    if any(flags):
      first_dense, step = _moe_pattern(flags)
    else:
      experts = 1  # no MoE layer: a dense model
  return dict(
      num_experts=experts,
      num_experts_per_tok=1,
      moe_mlp_dim=hf.require("intermediate_size"),
      shared_experts=1,
      routed_score_func="sigmoid",
      moe_input_scaled_by_router=True,
      interleave_moe_layer_step=step,
      first_num_dense_layers=first_dense,
  )


def _attention_keys(hf: weight_mapping.HFConfig, num_layers: int) -> dict[str, Any]:
  """NoPE interval, chunk size (RoPE layers chunked, NoPE layers full), QK L2 norm and temperature tuning."""
  no_rope = hf.get("no_rope_layers")  # 1 = RoPE layer (transformers' spelling)
  if no_rope:
    nope_flags = [not bool(x) for x in no_rope[:num_layers]]
  else:
    interval = int(hf.get("no_rope_layer_interval") or 0)
    nope_flags = [interval > 0 and (i + 1) % interval == 0 for i in range(num_layers)]
  chunk = int(hf.get("attention_chunk_size") or 0)
  kinds = hf.get("layer_types")
  if kinds is not None:
    want = ["chunked_attention" if chunk and not nope else "full_attention" for nope in nope_flags]
    if list(kinds[:num_layers]) != want:
      raise weight_mapping.UnsupportedCheckpointError(
          f"layer_types {kinds}: supported is chunked attention on exactly the RoPE layers ({want})"
      )
  if chunk and all(nope_flags):
    chunk = 0
  return dict(
      nope_layer_interval=_every_nth(nope_flags, "NoPE layers (no_rope_layers == 0)"),
      chunk_attn_window_size=chunk,
      use_qk_l2_norm=bool(hf.get("use_qk_norm")),
      attn_temperature_tuning=bool(hf.get("attn_temperature_tuning")),
      attn_temperature_floor_scale=int(hf.get("floor_scale")),
      attn_temperature_scale=float(hf.get("attn_scale")),
  )


def config_from_hf(hf: weight_mapping.HFConfig) -> dict:
  if "text_config" in hf.data:  # Llama4ForConditionalGeneration: its language model
    hf = weight_mapping.HFConfig(hf.data["text_config"] or {}, HF_DEFAULTS)
  keys = llama.llama_config(hf, has_mlp_bias=False)
  layers = keys["base_num_decoder_layers"]
  keys["base_mlp_dim"] = hf.require("intermediate_size_mlp")
  return keys | _moe_keys(hf, layers) | _attention_keys(hf, layers)


def _check_expressible(config):
  """Settings transformers' Llama 4 has no field for (the round-trip check catches the rest)."""
  fixed = {
      "use_qk_norm": False,
      "use_bias": False,
      "routed_bias": False,
      "norm_topk_prob": False,
      "routed_scaling_factor": 1.0,
      "sliding_window_size": 0,
  }
  if config.num_experts > 1:
    fixed |= {"num_experts_per_tok": 1, "shared_experts": 1, "routed_score_func": "sigmoid"}
    fixed |= {"moe_input_scaled_by_router": True, "n_routing_groups": -1}
  bad = [f"{k}={config.get(k)!r} (Llama 4: {v!r})" for k, v in fixed.items() if config.get(k) != v]
  if bad:
    raise weight_mapping.UnsupportedCheckpointError(f"Llama4ForCausalLM cannot express {', '.join(bad)}")


def _nope_flags(config) -> list[bool]:
  n = config.nope_layer_interval
  return [n > 0 and (i + 1) % n == 0 for i in range(config.num_decoder_layers)]


def hf_config(config) -> dict:
  _check_expressible(config)
  fields = llama.llama_hf_config(config, has_mlp_bias=False)
  nope = _nope_flags(config)
  chunk = config.chunk_attn_window_size or None
  fields.update(
      intermediate_size=config.moe_mlp_dim,
      intermediate_size_mlp=config.mlp_dim,
      num_local_experts=max(config.num_experts, 1),
      num_experts_per_tok=1,
      interleave_moe_layer_step=config.interleave_moe_layer_step,
      moe_layers=list(moe_mapping.moe_layers(config)),
      no_rope_layers=[int(not x) for x in nope],
      no_rope_layer_interval=config.nope_layer_interval or config.num_decoder_layers + 1,
      attention_chunk_size=chunk,
      layer_types=["chunked_attention" if chunk and not x else "full_attention" for x in nope],
      use_qk_norm=config.use_qk_l2_norm,
      attn_temperature_tuning=config.attn_temperature_tuning,
      floor_scale=config.attn_temperature_floor_scale,
      attn_scale=config.attn_temperature_scale,
  )
  return fields


def hf_tensor_name(name: str) -> str | None:
  """Llama4ForConditionalGeneration's language-model tensors as Llama4ForCausalLM's; vision tensors skipped."""
  if name.startswith("language_model.model."):
    return name[len("language_model.") :]
  if name == "language_model.lm_head.weight":
    return "lm_head.weight"
  if name.startswith(("vision_model.", "multi_modal_projector.")):
    return None
  return name


# ---------------------------------------------------------------- weights


def _interleaved_to_half(heads: int, head_dim: int):
  """torch [heads * head_dim, embed] with (2i, 2i+1) rotary pairs <-> MaxText kernel [embed, heads, head_dim] with
  (i, i + head_dim/2) pairs."""
  half = head_dim // 2

  def to_maxtext(a):
    embed = a[0].shape[1]
    return [a[0].reshape(heads, half, 2, embed).transpose(3, 0, 2, 1).reshape(embed, heads, head_dim)]

  def to_hf(a):
    embed = a[0].shape[0]
    return [a[0].reshape(embed, heads, 2, half).transpose(1, 3, 2, 0).reshape(heads * head_dim, embed)]

  return to_maxtext, to_hf


def _rotary_linear(maxtext: str, hf: str, embed: int, heads: int, head_dim: int) -> weight_mapping.Rule:
  to_maxtext, to_hf = _interleaved_to_half(heads, head_dim)
  return weight_mapping.Rule((maxtext,), (hf,), ((heads * head_dim, embed),), to_maxtext, to_hf)


def attention(config) -> list[weight_mapping.Rule]:
  """q/k/v/o in Llama's names; q and k permuted from transformers' interleaved rotary layout (see module doc)."""
  e, hq, hkv, d = config.emb_dim, config.num_query_heads, config.num_kv_heads, config.head_dim
  ours, theirs = "decoder/layers/{i}/self_attention", "model.layers.{i}.self_attn"
  return [
      _rotary_linear(f"{ours}/query/kernel", f"{theirs}.q_proj.weight", e, hq, d),
      _rotary_linear(f"{ours}/key/kernel", f"{theirs}.k_proj.weight", e, hkv, d),
      weight_mapping.linear(f"{ours}/value/kernel", f"{theirs}.v_proj.weight", e, (hkv, d)),
      weight_mapping.linear(f"{ours}/out/kernel", f"{theirs}.o_proj.weight", (hq, d), e),
  ]


def _only(rules: list[weight_mapping.Rule], layers: tuple[int, ...]) -> list[weight_mapping.Rule]:
  return [dataclasses.replace(rule, layers=layers) for rule in rules]


def _fused_experts(config, ours: str, theirs: str) -> list[weight_mapping.Rule]:
  """Llama 4's fused experts: gate_up_proj [experts, embed, 2 * mlp] (gate first), down_proj [experts, mlp, embed]
  (input-major, unlike the [experts, out, in] of transformers 5's other fused MoEs), as MaxText stores them."""
  n, e, m = config.num_experts, config.emb_dim, config.moe_mlp_dim
  gate_up = weight_mapping.Rule(
      (f"{ours}/wi_0", f"{ours}/wi_1"),
      (f"{theirs}.gate_up_proj",),
      ((n, e, 2 * m),),
      lambda a: list(np.split(a[0], 2, axis=-1)),
      lambda a: [np.concatenate(a, axis=-1)],
  )
  return [gate_up, weight_mapping.identity(f"{ours}/wo", f"{theirs}.down_proj", (n, m, e))]


def hf_weights(config) -> list[weight_mapping.Rule]:
  """Every parameter, experts in the fused layout transformers writes (hf_reader also reads per-expert ones)."""
  layer, hf = "decoder/layers/{i}", "model.layers.{i}"
  e, m = config.emb_dim, config.mlp_dim
  rules = weight_mapping.embeddings_and_head(config) + llama.llama_norms(config) + attention(config)
  dense, ffn = moe_mapping.dense_layers(config), f"{hf}.feed_forward"
  if dense:
    rules += _only(
        [
            weight_mapping.linear(f"{layer}/mlp/wi_0/kernel", f"{ffn}.gate_proj.weight", e, m),
            weight_mapping.linear(f"{layer}/mlp/wi_1/kernel", f"{ffn}.up_proj.weight", e, m),
            weight_mapping.linear(f"{layer}/mlp/wo/kernel", f"{ffn}.down_proj.weight", m, e),
        ],
        dense,
    )
  moe_layers = moe_mapping.moe_layers(config)
  if moe_layers:
    rules += moe_mapping.router(config, hf=f"{ffn}.router.weight", layers=moe_layers)
    rules += _only(_fused_experts(config, f"{layer}/mlp", f"{ffn}.experts"), moe_layers)
    rules += moe_mapping.shared_experts(config, hf=f"{ffn}.shared_expert", layers=moe_layers)
  return rules


_PER_EXPERT = re.compile(r"(.*\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight")


class FusedExpertsView(moe_mapping.TensorView):
  """A view in which per-expert tensors (`*.experts.<j>.{gate,up,down}_proj.weight`, one nn.Linear each, as
  quantized Llama 4 checkpoints store them) appear as Llama 4's fused `*.experts.gate_up_proj` and
  `*.experts.down_proj`; other tensors are unchanged (the inverse of moe_mapping.PerExpertView)."""

  def __init__(self, reader):
    super().__init__(reader)
    groups: dict[str, dict[tuple[str, int], str]] = {}
    for name in reader.names():
      match = _PER_EXPERT.fullmatch(name)
      if match is None:
        self.tensors[name] = reader.tensors[name]
      else:
        groups.setdefault(match.group(1), {})[(match.group(3), int(match.group(2)))] = name
    for prefix, parts in groups.items():
      experts = sorted({j for _, j in parts})
      if experts != list(range(len(experts))) or len(parts) != 3 * len(experts):
        raise weight_mapping.UnsupportedCheckpointError(f"{prefix}: per-expert tensors are incomplete")
      first = reader.tensors[parts[("gate_proj", 0)]]
      mlp, embed = first.shape
      n = len(experts)
      by_part = {p: [parts[(p, j)] for j in experts] for p in ("gate_proj", "up_proj", "down_proj")}
      fused = {  # name -> (per-expert names of each part, concatenated on the last axis; the fused shape)
          f"{prefix}.gate_up_proj": ([by_part["gate_proj"], by_part["up_proj"]], (n, embed, 2 * mlp)),
          f"{prefix}.down_proj": ([by_part["down_proj"]], (n, mlp, embed)),
      }
      for name, (names, shape) in fused.items():
        self.tensors[name] = moe_mapping.TensorInfo(shape, first.dtype)
        self._virtual[name] = lambda names=names: self._fuse(names)

  def _fuse(self, names: list[list[str]]) -> np.ndarray:
    parts = [np.stack([self.reader.read(n).T for n in per_part]) for per_part in names]
    return np.concatenate(parts, axis=-1)


TINY = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=32,
    intermediate_size_mlp=96,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    num_local_experts=4,
    num_experts_per_tok=1,
    interleave_moe_layer_step=2,
    no_rope_layer_interval=3,
    attention_chunk_size=8,
    use_qk_norm=True,
    attn_temperature_tuning=True,
    floor_scale=4,
    attn_scale=0.5,
    rms_norm_eps=1e-5,
    max_position_embeddings=128,
    rope_parameters={
        "rope_type": "llama3",
        "rope_theta": 10000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
    },
    bos_token_id=0,
    eos_token_id=0,
    pad_token_id=0,
)

SPEC = FamilySpec(
    name="llama4",
    hf=HFMapping(
        ("Llama4ForCausalLM", "Llama4ForConditionalGeneration"),
        "llama4_text",
        config_from_hf,
        hf_config,
        hf_weights,
        defaults=HF_DEFAULTS,
        tensor_name=hf_tensor_name,
        reader=FusedExpertsView,
    ),
    tiny_hf_configs={"llama4": TINY},
)
