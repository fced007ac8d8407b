"""Hugging Face weight-mapping pieces for mixture-of-experts families (layers/moe.py's MoeBlock).

Expert weights appear in checkpoints in two layouts:
  per-expert  `<experts>.{j}.<gate>.weight` [mlp, embed], `<up>` [mlp, embed], `<down>` [embed, mlp] (one nn.Linear
              per expert: transformers 4.x, and what 5.x `save_pretrained` writes for Mixtral and Qwen3-MoE)
  fused       `<experts>.gate_up_proj` [E, 2 * mlp, embed] (gate rows first) and `<experts>.down_proj` [E, embed, mlp]
              (transformers 5.x modules' own parameters, e.g. a state_dict saved directly)
Rules are written for the per-expert layout; `PerExpertView` shows a fused checkpoint as per-expert tensors, so one
set of rules reads both (a family opts in with `hf_reader = moe_mapping.PerExpertView`).
MoeBlock params: mlp/gate/kernel [embed, E], mlp/gate/bias [E] (routed_bias), mlp/wi_0, wi_1 [E, embed, mlp] (gate,
up), mlp/wo [E, mlp, embed], mlp/shared_experts/{wi_0,wi_1,wo}/kernel (a dense MlpBlock).
"""

import dataclasses
import re
from typing import Sequence

import numpy as np

from MaxText.layers.moe import moe_layer_flags
from MaxText.utils.ckpt_conversion import weight_mapping
from MaxText.utils.ckpt_conversion.weight_mapping import Rule

EXPERT_NAMES = ("gate_proj", "up_proj", "down_proj")  # the per-expert names PerExpertView produces
_MOE = "decoder/layers/{i}/mlp"


def moe_layers(config) -> tuple[int, ...]:
  """Indices of the decoder layers that are MoE (moe.moe_layer_flags)."""
  return tuple(i for i, moe in enumerate(moe_layer_flags(config)) if moe)


def dense_layers(config) -> tuple[int, ...]:
  return tuple(i for i, moe in enumerate(moe_layer_flags(config)) if not moe)


def router(config, *, maxtext: str = f"{_MOE}/gate/kernel", hf: str, layers: Sequence[int]) -> list[Rule]:
  """Router weight [E, embed] (an nn.Linear) <-> gate/kernel [embed, E]."""
  rule = weight_mapping.linear(maxtext, hf, config.emb_dim, config.num_experts)
  return [dataclasses.replace(rule, layers=tuple(layers))]


def router_bias(config, *, maxtext: str = f"{_MOE}/gate/bias", hf: str, layers: Sequence[int]) -> list[Rule]:
  """Selection-only routing bias [E] (DeepSeek V3's e_score_correction_bias) <-> gate/bias."""
  rule = weight_mapping.identity(maxtext, hf, config.num_experts)
  return [dataclasses.replace(rule, layers=tuple(layers))]


def _stacked_linear(maxtext: str, names: list[str], n_in: int, n_out: int, layers) -> Rule:
  """E nn.Linear weights [out, in] <-> one kernel [E, in, out]."""
  return Rule(
      (maxtext,),
      tuple(names),
      ((n_out, n_in),) * len(names),
      lambda a: [np.stack([w.T for w in a])],
      lambda a: [np.ascontiguousarray(w.T) for w in a[0]],
      tuple(layers),
  )


def experts(
    config,
    *,
    maxtext: str = _MOE,
    hf: str,
    names: Sequence[str] = EXPERT_NAMES,
    layers: Sequence[int],
) -> list[Rule]:
  """Per-expert `{hf}.{j}.{name}.weight` tensors (names: gate, up, down) <-> wi_0, wi_1, wo stacked over experts."""
  e, m, n = config.emb_dim, config.moe_mlp_dim, config.num_experts
  gate, up, down = names

  def per_expert(name):
    return [f"{hf}.{j}.{name}.weight" for j in range(n)]

  return [
      _stacked_linear(f"{maxtext}/wi_0", per_expert(gate), e, m, layers),
      _stacked_linear(f"{maxtext}/wi_1", per_expert(up), e, m, layers),
      _stacked_linear(f"{maxtext}/wo", per_expert(down), m, e, layers),
  ]


def shared_experts(config, *, maxtext: str = f"{_MOE}/shared_experts", hf: str, layers: Sequence[int]) -> list[Rule]:
  """The shared experts' gated MLP (gate_proj/up_proj/down_proj names) of width shared_experts * moe_mlp_dim."""
  width = config.shared_experts * config.moe_mlp_dim
  e = config.emb_dim
  rules = [
      weight_mapping.linear(f"{maxtext}/wi_0/kernel", f"{hf}.gate_proj.weight", e, width),
      weight_mapping.linear(f"{maxtext}/wi_1/kernel", f"{hf}.up_proj.weight", e, width),
      weight_mapping.linear(f"{maxtext}/wo/kernel", f"{hf}.down_proj.weight", width, e),
  ]
  return [dataclasses.replace(r, layers=tuple(layers)) for r in rules]


def rename_experts(name: str, parent: str, family_parent: str, expert_names: dict[str, str]) -> str:
  """`model.layers.{i}.<parent>.{gate,experts.{j}.<EXPERT_NAMES>}...` in a family's names (others unchanged).

  E.g. Mixtral: parent "mlp" -> "block_sparse_moe", gate_proj/up_proj/down_proj -> w1/w3/w2.
  """
  match = re.fullmatch(rf"(model\.layers\.\d+\.){re.escape(parent)}\.(gate\.weight|experts\.(\d+)\.(\w+)\.weight)", name)
  if match is None:
    return name
  head = f"{match.group(1)}{family_parent}"
  if match.group(3) is None:
    return f"{head}.gate.weight"
  return f"{head}.experts.{match.group(3)}.{expert_names.get(match.group(4), match.group(4))}.weight"


@dataclasses.dataclass(frozen=True)
class TensorInfo:
  shape: tuple[int, ...]
  dtype: np.dtype


class TensorView:
  """A SafetensorsReader-like view (names(), tensors[name].shape/.dtype, read(name)) of a reader's tensors in which
  subclasses replace some tensors by virtual ones: `self.tensors[name] = TensorInfo(...)` and
  `self._virtual[name] = () -> array`."""

  def __init__(self, reader):
    self.reader = reader
    self.tensors: dict[str, TensorInfo] = {}
    self._virtual: dict = {}

  def names(self) -> list[str]:
    return list(self.tensors)

  def read(self, name: str) -> np.ndarray:
    make = self._virtual.get(name)
    return self.reader.read(name) if make is None else make()


class PerExpertView(TensorView):
  """A view in which fused `*.experts.gate_up_proj` / `*.experts.down_proj` tensors appear as
  `*.experts.{j}.gate_proj.weight`, `up_proj`, `down_proj` (other tensors unchanged).

  Each fused tensor is read once per run of reads of its experts (the last one is cached), not once per expert.
  """

  def __init__(self, reader):
    super().__init__(reader)
    self._cache: tuple[str | None, np.ndarray | None] = (None, None)
    for name in reader.names():
      info = reader.tensors[name]
      shape, dtype = tuple(info.shape), info.dtype
      head, _, last = name.rpartition(".")
      if head.endswith("experts") and last in ("gate_up_proj", "down_proj") and len(shape) == 3:
        if last == "gate_up_proj":
          m = shape[1] // 2
          parts = (("gate_proj", slice(0, m)), ("up_proj", slice(m, 2 * m)))
          out_shape = (m, shape[2])
        else:
          parts = (("down_proj", slice(None)),)
          out_shape = shape[1:]
        for j in range(shape[0]):
          for part, rows in parts:
            virtual = f"{head}.{j}.{part}.weight"
            self.tensors[virtual] = TensorInfo(out_shape, dtype)
            self._virtual[virtual] = lambda name=name, j=j, rows=rows: self._expert(name, j, rows)
      else:
        self.tensors[name] = TensorInfo(shape, dtype)

  def _expert(self, fused: str, j: int, rows: slice) -> np.ndarray:
    if self._cache[0] != fused:
      self._cache = (None, None)  # drop the previous fused tensor before reading the next
      self._cache = (fused, self.reader.read(fused))
    return np.ascontiguousarray(self._cache[1][j, rows])
