"""What a model family declares: its decoder layer and everything the Hugging Face converters need.

A family is one module in MaxText/models/ that defines `SPEC = FamilySpec(...)` and is listed once in
MaxText/models/__init__.py. Shared code (pyconfig, the decoder stack, both converters, the parity tests) reads a
family only through its spec.
"""

import dataclasses
from typing import Any, Callable, Mapping, Optional

from MaxText.layers import blocks

HFConfig = Any  # weight_mapping.HFConfig (not imported here, so that building a model never imports converters)


@dataclasses.dataclass(frozen=True)
class HFMapping:
  """How a family reads and writes Hugging Face checkpoints.

  architectures   config.json `architectures` names it reads; the first is the one it writes
  model_type      the `model_type` it writes
  config_from_hf  (HFConfig) -> MaxText model keys for a checkpoint's config.json
  config_to_hf    (config) -> config.json fields (to_huggingface adds architectures, model_type, dtype)
  weights         (config) -> every parameter as weight_mapping.Rule's between MaxText paths and HF tensors
  defaults        transformers' config defaults for fields a config.json may leave out
  architecture_for  optional (config) -> (architecture, model_type), for families that write several (DeepSeek)
  tensor_name     optional (name) -> the name in the family's spelling, None to skip the tensor
  reader          optional (reader) -> a view of the checkpoint's tensors (e.g. fused experts shown per expert)
  """

  architectures: tuple[str, ...]
  model_type: str
  config_from_hf: Callable[[HFConfig], dict]
  config_to_hf: Callable[[Any], dict]
  weights: Callable[[Any], list]
  defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  architecture_for: Optional[Callable[[Any], tuple[str, str]]] = None
  tensor_name: Optional[Callable[[str], Optional[str]]] = None
  reader: Optional[Callable[[Any], Any]] = None


@dataclasses.dataclass(frozen=True)
class FamilySpec:
  """One model family.

  name             the `decoder_block` value that selects the family
  hf               its Hugging Face mapping (None: the family does not convert)
  block            the shared pre-norm block's wiring (norm names, post-norms); see layers/blocks.py
  check_config     optional (values: dict) -> None, raising ConfigError for settings the family cannot build
  tiny_hf_configs  test models: variant name -> a small transformers config.json dict (`architectures` and
                   `model_type` default to the family's first), with settings that exercise the family's
                   differences (windows, soft caps, MoE, biases); the parity tests build and check every one
  """

  name: str
  hf: Optional[HFMapping] = None
  block: blocks.BlockSpec = blocks.BlockSpec()
  check_config: Optional[Callable[[dict], None]] = None
  tiny_hf_configs: Mapping[str, dict] = dataclasses.field(default_factory=dict)

  @property
  def converts(self) -> bool:
    """Whether the family has a Hugging Face mapping."""
    return self.hf is not None

  @property
  def hf_architectures(self) -> tuple[str, ...]:
    return self.hf.architectures if self.hf else ()

  @property
  def hf_model_type(self) -> str:
    return self.hf.model_type if self.hf else ""

  def architecture_for(self, config) -> tuple[str, str]:
    """(architecture, model_type) a config is written as."""
    if self.hf.architecture_for is not None:
      return self.hf.architecture_for(config)
    return self.hf.architectures[0], self.hf.model_type

  def tensor_name(self, name: str) -> Optional[str]:
    """A checkpoint tensor's name in the family's spelling, or None for tensors that hold no parameters."""
    if name.endswith("rotary_emb.inv_freq"):  # a buffer older checkpoints saved
      return None
    return self.hf.tensor_name(name) if self.hf.tensor_name is not None else name

  def reader(self, reader):
    return self.hf.reader(reader) if self.hf.reader is not None else reader
