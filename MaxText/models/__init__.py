"""The model families: one module each, declaring one FamilySpec (models/spec.py); this is the one registry.

pyconfig (decoder_block, family config checks), the decoder stack (the block's wiring) and both Hugging Face
converters (architectures, config.json, weights) find a family here and nowhere else. A new family is a module
with a SPEC plus its ymls under configs/models/, and one line below; the parity tests pick it up from the registry.
"""

from MaxText.config_schema import ConfigError
from MaxText.models import deepseek, gemma, gemma2, gemma3, gpt3, llama, llama4, mistral, mixtral, qwen3, qwen3_moe
from MaxText.models.spec import FamilySpec
from MaxText.utils.ckpt_conversion.weight_mapping import UnsupportedCheckpointError

FAMILIES: dict[str, FamilySpec] = {
    m.SPEC.name: m.SPEC
    for m in (llama, mistral, gemma, gemma2, gemma3, qwen3, gpt3, mixtral, qwen3_moe, llama4, deepseek)
}


def get(decoder_block: str) -> FamilySpec:
  """The family that `decoder_block` names; ConfigError (listing the families) for an unknown name."""
  if decoder_block not in FAMILIES:
    raise ConfigError(f"decoder_block: unknown family {decoder_block!r}; available: {sorted(FAMILIES)}")
  return FAMILIES[decoder_block]


def supported_architectures() -> list[str]:
  return sorted(a for spec in FAMILIES.values() for a in spec.hf_architectures)


def for_architecture(architecture: str) -> FamilySpec:
  for spec in FAMILIES.values():
    if architecture in spec.hf_architectures:
      return spec
  raise UnsupportedCheckpointError(
      f"architecture {architecture!r} is not supported; supported: {', '.join(supported_architectures())}"
  )


def validate_config(values: dict):
  """Config-time checks of the family a config names (ConfigError naming the key)."""
  spec = get(values["decoder_block"])
  if spec.check_config is not None:
    spec.check_config(values)


def tiny_hf_config(spec: FamilySpec, variant: str) -> dict:
  """A test variant's config.json dict with `architectures` and `model_type` (the family's first unless set)."""
  fields = dict(spec.tiny_hf_configs[variant])
  fields.setdefault("architectures", [spec.hf_architectures[0]])
  fields.setdefault("model_type", spec.hf_model_type)
  return fields
