"""The rule toolkit every family's Hugging Face mapping is written with (families: MaxText/models/, each a spec).

A Rule ties MaxText params to Hugging Face tensors with two transforms. Rule paths are MaxText params in the
unscanned layout, '/'-joined ("decoder/layers/{i}/mlp/wo/kernel"); "{i}" marks a rule applied once per decoder
layer (or per layer in its `layers`), with the same "{i}" in its Hugging Face names. Transforms only transpose,
reshape, split, stack and concatenate, so HF -> MaxText -> HF reproduces every tensor bit for bit.
HFConfig reads a config.json in either transformers spelling (4.x and 5.x).
"""

import dataclasses
import math
from typing import Any, Callable, Sequence

import numpy as np

Shape = int | Sequence[int]
Arrays = list[np.ndarray]


class UnsupportedCheckpointError(ValueError):
  """A checkpoint or config this converter cannot represent; the message says what and what is supported."""


@dataclasses.dataclass(frozen=True)
class Rule:
  """One group of MaxText params <-> Hugging Face tensors that convert together (usually one each)."""

  maxtext: tuple[str, ...]
  hf: tuple[str, ...]
  hf_shapes: tuple[tuple[int, ...], ...]
  to_maxtext: Callable[[Arrays], Arrays]
  to_hf: Callable[[Arrays], Arrays]
  layers: tuple[int, ...] | None = None  # a per-layer rule's layers (None: every layer), e.g. only the MoE layers

  @property
  def per_layer(self) -> bool:
    return any("{i}" in p for p in self.maxtext)

  def layer_indices(self, num_layers: int) -> Sequence[int]:
    """The layers a per-layer rule applies to."""
    return range(num_layers) if self.layers is None else self.layers

  def maxtext_paths(self, layer: int | None = None) -> list[tuple[str | int, ...]]:
    """Param paths as tuples; the layer index is an int key, as in the unscanned params tree."""
    out = []
    for path in self.maxtext:
      parts = path.split("/")
      out.append(tuple(layer if p == "{i}" else p for p in parts))
    return out

  def hf_names(self, layer: int | None = None) -> list[str]:
    return [name.replace("{i}", str(layer)) for name in self.hf]


def _shape(x: Shape) -> tuple[int, ...]:
  return (x,) if isinstance(x, int) else tuple(x)


def identity(maxtext: str, hf: str, shape: Shape) -> Rule:
  return Rule((maxtext,), (hf,), (_shape(shape),), lambda a: [a[0]], lambda a: [a[0]])


def vector(maxtext: str, hf: str, shape: Shape) -> Rule:
  """A flat HF vector (a bias) <-> a MaxText array of `shape` (e.g. [heads, head_dim])."""
  shape = _shape(shape)
  n = math.prod(shape)
  return Rule((maxtext,), (hf,), ((n,),), lambda a: [a[0].reshape(shape)], lambda a: [a[0].reshape(n)])


def linear(maxtext: str, hf: str, in_shape: Shape, out_shape: Shape) -> Rule:
  """torch nn.Linear weight [out, in] <-> MaxText kernel [*in_shape, *out_shape]."""
  in_shape, out_shape = _shape(in_shape), _shape(out_shape)
  n_in, n_out = math.prod(in_shape), math.prod(out_shape)
  return Rule(
      (maxtext,),
      (hf,),
      ((n_out, n_in),),
      lambda a: [a[0].T.reshape(in_shape + out_shape)],
      lambda a: [a[0].reshape(n_in, n_out).T],
  )


def conv1d(maxtext: str, hf: str, in_shape: Shape, out_shape: Shape) -> Rule:
  """GPT-2's Conv1D weight [in, out] <-> MaxText kernel [*in_shape, *out_shape]."""
  in_shape, out_shape = _shape(in_shape), _shape(out_shape)
  n_in, n_out = math.prod(in_shape), math.prod(out_shape)
  return Rule(
      (maxtext,),
      (hf,),
      ((n_in, n_out),),
      lambda a: [a[0].reshape(in_shape + out_shape)],
      lambda a: [a[0].reshape(n_in, n_out)],
  )


def norm(config, maxtext: str, hf: str, dim: int) -> list[Rule]:
  """A norm's weight (and bias, for LayerNorm)."""
  rules = [identity(f"{maxtext}/scale", f"{hf}.weight", dim)]
  if config.normalization_type == "layernorm":
    rules.append(identity(f"{maxtext}/bias", f"{hf}.bias", dim))
  return rules


# ---------------------------------------------------------------- the naming most families share (Llama's)


def attention(
    config, maxtext: str = "decoder/layers/{i}/self_attention", hf: str = "model.layers.{i}.self_attn"
) -> list[Rule]:
  """q/k/v/o projections (+ biases with use_bias, + q_norm/k_norm with use_qk_norm) in Llama's names."""
  e, hq, hkv, d = config.emb_dim, config.num_query_heads, config.num_kv_heads, config.head_dim
  rules = [
      linear(f"{maxtext}/query/kernel", f"{hf}.q_proj.weight", e, (hq, d)),
      linear(f"{maxtext}/key/kernel", f"{hf}.k_proj.weight", e, (hkv, d)),
      linear(f"{maxtext}/value/kernel", f"{hf}.v_proj.weight", e, (hkv, d)),
      linear(f"{maxtext}/out/kernel", f"{hf}.o_proj.weight", (hq, d), e),
  ]
  if config.use_bias:
    rules += [
        vector(f"{maxtext}/query/bias", f"{hf}.q_proj.bias", (hq, d)),
        vector(f"{maxtext}/key/bias", f"{hf}.k_proj.bias", (hkv, d)),
        vector(f"{maxtext}/value/bias", f"{hf}.v_proj.bias", (hkv, d)),
        vector(f"{maxtext}/out/bias", f"{hf}.o_proj.bias", e),
    ]
  if config.use_qk_norm:
    rules += [
        identity(f"{maxtext}/query_norm/scale", f"{hf}.q_norm.weight", d),
        identity(f"{maxtext}/key_norm/scale", f"{hf}.k_norm.weight", d),
    ]
  return rules


def gated_mlp(config, maxtext: str = "decoder/layers/{i}/mlp", hf: str = "model.layers.{i}.mlp") -> list[Rule]:
  """gate/up/down projections: MaxText wi_0 (activated), wi_1 (linear), wo."""
  e, m = config.emb_dim, config.mlp_dim
  rules = [
      linear(f"{maxtext}/wi_0/kernel", f"{hf}.gate_proj.weight", e, m),
      linear(f"{maxtext}/wi_1/kernel", f"{hf}.up_proj.weight", e, m),
      linear(f"{maxtext}/wo/kernel", f"{hf}.down_proj.weight", m, e),
  ]
  if config.use_bias:
    rules += [
        identity(f"{maxtext}/wi_0/bias", f"{hf}.gate_proj.bias", m),
        identity(f"{maxtext}/wi_1/bias", f"{hf}.up_proj.bias", m),
        identity(f"{maxtext}/wo/bias", f"{hf}.down_proj.bias", e),
    ]
  return rules


def embeddings_and_head(config, hf: str = "model") -> list[Rule]:
  """Token embedding, final norm and (untied) output head."""
  rules = [identity("token_embedder/embedding", f"{hf}.embed_tokens.weight", (config.vocab_size, config.emb_dim))]
  rules += norm(config, "decoder_norm", f"{hf}.norm", config.emb_dim)
  if not config.logits_via_embedding:
    rules.append(linear("logits_dense/kernel", "lm_head.weight", config.emb_dim, config.vocab_size))
  return rules


# ---------------------------------------------------------------- config.json


class HFConfig:
  """A config.json as read: its values over a family's defaults (for keys it leaves out), and RoPE in either spelling.

  transformers 4.x writes `rope_theta` and `rope_scaling` ({"type" or "rope_type", "factor", ...}); 5.x writes
  `rope_parameters` with `rope_theta` inside, nested by layer type where layers differ (Gemma 3).
  """

  def __init__(self, data: dict[str, Any], defaults: dict[str, Any] | None = None):
    self.data = dict(data)
    self.defaults = dict(defaults or {})

  def get(self, key: str, default: Any = None) -> Any:
    """The value in config.json (an explicit null stays None), else the family default, else `default`."""
    if key in self.data:
      return self.data[key]
    return self.defaults.get(key, default)

  def require(self, key: str) -> Any:
    value = self.get(key)
    if value is None:
      raise UnsupportedCheckpointError(f"config.json has no {key!r}")
    return value

  def rope(self, layer_type: str | None = None, theta_key: str = "rope_theta", scaled: bool = True) -> dict[str, Any]:
    """RoPE settings {rope_type, rope_theta, factor, ...} (of `layer_type`'s layers when they differ by type).

    4.x spelling: the base is `theta_key` (e.g. Gemma 3's `rope_local_base_freq`), scaling from `rope_scaling` when
    `scaled`. The base falls back to the family default of `theta_key`.
    """
    params = self.data.get("rope_parameters")
    if params:
      if layer_type is not None and isinstance(params.get(layer_type), dict):
        params = params[layer_type]
      params = dict(params)
    else:
      params = dict(self.data.get("rope_scaling") or {}) if scaled else {}
    params["rope_type"] = params.get("rope_type") or params.pop("type", None) or "default"
    params.pop("type", None)
    if params.get("rope_theta") is None:
      params["rope_theta"] = self.get(theta_key) or 10_000.0
    return params


def rope_keys(params: dict[str, Any], max_position_embeddings: int | None = None) -> dict[str, Any]:
  """MaxText rope_* keys for one RoPE settings dict (see HFConfig.rope)."""
  kind = params["rope_type"]
  if params.get("partial_rotary_factor", 1.0) != 1.0:
    raise UnsupportedCheckpointError(f"partial_rotary_factor={params['partial_rotary_factor']} is not supported")
  keys: dict[str, Any] = {"rope_max_timescale": float(params["rope_theta"])}
  if kind == "default":
    keys["rope_type"] = "default"
  elif kind == "linear":
    keys.update(rope_type="linear", rope_scaling_factor=float(params["factor"]))
  elif kind == "llama3":
    original = params.get("original_max_position_embeddings") or max_position_embeddings
    keys.update(
        rope_type="llama3.1",
        rope_scaling_factor=float(params["factor"]),
        rope_low_freq_factor=float(params["low_freq_factor"]),
        rope_high_freq_factor=float(params["high_freq_factor"]),
        rope_original_max_position_embeddings=int(original),
    )
  elif kind == "yarn":
    keys.update(_yarn_keys(params, max_position_embeddings))
  else:
    raise UnsupportedCheckpointError(f"rope_type {kind!r} is not supported (supported: default, linear, llama3, yarn)")
  return keys


def _yarn_keys(params: dict[str, Any], max_position_embeddings: int | None) -> dict[str, Any]:
  """MaxText keys for a yarn rope dict, read as transformers reads it (factor defaults to max / original length)."""
  original = params.get("original_max_position_embeddings") or max_position_embeddings
  if original is None:
    raise UnsupportedCheckpointError("rope_type yarn needs original_max_position_embeddings")
  if params.get("attention_factor") is not None:
    raise UnsupportedCheckpointError("yarn attention_factor is not supported (MaxText derives it from the mscales)")
  if params.get("truncate", True) is False:
    raise UnsupportedCheckpointError("yarn truncate=false is not supported")
  factor = params.get("factor") or (max_position_embeddings / original)
  return dict(
      rope_type="yarn",
      rope_scaling_factor=float(factor),
      rope_original_max_position_embeddings=int(original),
      rope_yarn_beta_fast=float(params.get("beta_fast") or 32.0),
      rope_yarn_beta_slow=float(params.get("beta_slow") or 1.0),
      rope_yarn_mscale=float(params.get("mscale") or 0.0),
      rope_yarn_mscale_all_dim=float(params.get("mscale_all_dim") or 0.0),
  )


def hf_rope(config) -> dict[str, Any]:
  """The 5.x `rope_parameters` dict for the config's (global) RoPE."""
  rope_type = config.rope_type
  params: dict[str, Any] = {"rope_theta": float(config.rope_max_timescale)}
  if rope_type == "default":
    params["rope_type"] = "default"
  elif rope_type == "linear":
    params.update(rope_type="linear", factor=config.rope_scaling_factor)
  elif rope_type == "llama3.1":
    params.update(
        rope_type="llama3",
        factor=config.rope_scaling_factor,
        low_freq_factor=config.rope_low_freq_factor,
        high_freq_factor=config.rope_high_freq_factor,
        original_max_position_embeddings=config.rope_original_max_position_embeddings,
    )
  elif rope_type == "yarn":
    params.update(
        rope_type="yarn",
        factor=config.rope_scaling_factor,
        original_max_position_embeddings=config.rope_original_max_position_embeddings,
        beta_fast=config.rope_yarn_beta_fast,
        beta_slow=config.rope_yarn_beta_slow,
    )
    for key, value in (("mscale", config.rope_yarn_mscale), ("mscale_all_dim", config.rope_yarn_mscale_all_dim)):
      if value:  # 0 = unset: transformers then derives the amplitude from the factor alone
        params[key] = value
  else:
    raise UnsupportedCheckpointError(f"rope_type {rope_type!r} has no Hugging Face spelling")
  return params


def legacy_rope(params: dict[str, Any]) -> dict[str, Any]:
  """The 4.x spelling of a rope_parameters dict: `rope_theta` and (when scaled) `rope_scaling`."""
  out: dict[str, Any] = {"rope_theta": params["rope_theta"]}
  if params["rope_type"] != "default":
    out["rope_scaling"] = {k: v for k, v in params.items() if k != "rope_theta"}
  return out


def activation_name(hf_name: str) -> str:
  """A transformers activation name as a MaxText `mlp_activations` entry."""
  names = {
      "silu": "silu",
      "swish": "silu",
      "gelu": "gelu",
      "gelu_pytorch_tanh": "gelu_tanh",
      "gelu_new": "gelu_tanh",
      "gelu_fast": "gelu_tanh",
      "relu": "relu",
      "tanh": "tanh",
      "sigmoid": "sigmoid",
  }
  if hf_name not in names:
    raise UnsupportedCheckpointError(f"activation {hf_name!r} is not supported (supported: {sorted(names)})")
  return names[hf_name]


def hf_activation_name(name: str) -> str:
  return {"gelu_tanh": "gelu_pytorch_tanh"}.get(name, name)


def sliding_window_pattern(layer_types: Sequence[str]) -> int:
  """sliding_window_pattern for a per-layer list of "sliding_attention"/"full_attention" (0: all sliding).

  Raises when the list is not "every Nth layer is full", the only arrangement the shared attention expresses.
  """
  full = [t == "full_attention" for t in layer_types]
  unknown = sorted({t for t in layer_types if t not in ("full_attention", "sliding_attention")})
  if unknown:
    raise UnsupportedCheckpointError(f"layer_types {unknown} are not supported")
  if not any(full):
    return 0
  n = full.index(True) + 1
  if full != [(i + 1) % n == 0 for i in range(len(full))]:
    raise UnsupportedCheckpointError(f"layer_types {list(layer_types)} is not 'every Nth layer global'")
  return n


def layer_types(config) -> list[str]:
  """The per-layer list transformers writes for the config's local/global pattern."""
  kinds = []
  for i in range(config.num_decoder_layers):
    local = config.sliding_window_size > 0 and (
        config.sliding_window_pattern == 0 or (i + 1) % config.sliding_window_pattern != 0
    )
    kinds.append("sliding_attention" if local else "full_attention")
  return kinds
