"""Every config key, declared once: default, type and range, doc, and whether it describes the architecture.

One module per component holds its keys (`KEYS`, settable; `DERIVED`, computed by pyconfig). MaxText/configs/base.yml
is generated from them (`python3 -m MaxText.config --write-base-yml`), the converters' MODEL_KEYS are the keys
marked `model=True`, and layer modules take their lists of names (attention kinds, rope types, ...) from `choices`.
Imports neither JAX nor Flax.
"""

import json
import pathlib
import sys
from typing import Any, Sequence

from MaxText.config import (
    aot,
    attention,
    checkpoint,
    data,
    decode,
    mesh,
    metrics,
    model,
    moe,
    numerics,
    pipeline,
    processes,
    run,
    serve,
    training,
)
from MaxText.config.declare import ConfigError, Derived, Field, Key

__all__ = ["ConfigError", "Derived", "Field", "Key", "SECTIONS", "KEYS", "DERIVED", "SCHEMA", "MODEL_KEYS"]

SECTIONS = (
    run,
    model,
    moe,
    attention,
    numerics,
    training,
    metrics,
    checkpoint,
    data,
    decode,
    serve,
    mesh,
    pipeline,
    processes,
    aot,
)
KEYS: dict[str, Key] = {k.name: k for section in SECTIONS for k in section.KEYS}
DERIVED: dict[str, Derived] = {d.name: d for section in SECTIONS for d in getattr(section, "DERIVED", ())}
SCHEMA: dict[str, Field] = {name: k.field for name, k in KEYS.items()}
MODEL_KEYS: tuple[str, ...] = tuple(name for name, k in KEYS.items() if k.model)
MESH_AXES = mesh.MESH_AXES
BASE_YML = pathlib.Path(__file__).resolve().parent.parent / "configs" / "base.yml"

assert not set(KEYS) & set(DERIVED), "a key is declared both settable and derived"


def choices(name: str) -> tuple:
  """The allowed values of a key (the one list of them that layers check against)."""
  return KEYS[name].field.choices


def defaults() -> dict[str, Any]:
  return {name: k.default for name, k in KEYS.items()}


def _yaml_scalar(value: Any) -> str:
  if isinstance(value, float):
    text = repr(value)
    if "e" in text and "." not in text:  # YAML 1.1 reads 1e-05 as a string
      text = text.replace("e", ".0e")
    return text
  return json.dumps(value)  # strings double-quoted, true/false, ints, flow lists


def _yaml_value(value: Any) -> str:
  if isinstance(value, list) and len(value) > 1 and all(isinstance(v, list) for v in value):
    return "[\n" + "".join(f"  {json.dumps(v)},\n" for v in value) + "]"
  return _yaml_scalar(value)


HEADER = """\
# MaxText base config: every key, with its default. GENERATED from MaxText/config/*.py, where each key's type,
# range and doc are declared: edit those, then run `python3 -m MaxText.config --write-base-yml`.
# Merge order: this file (and its base_config: parents) < configs/models/<model_name>.yml < M_<KEY> env < key=value.
"""


def render_base_yml() -> str:
  """base.yml's text: a header per component, then `key: default  # doc` per key; derived values as comments."""
  lines = [HEADER.rstrip("\n")]
  for section in SECTIONS:
    lines += ["", f"# ---------------------------------------------------------------- {section.TITLE}"]
    lines += [f"{k.name}: {_yaml_value(k.default)}  # {k.doc}" for k in section.KEYS]
  lines += [
      "",
      "# ---------------------------------------------------------------- derived (set by pyconfig, not here)",
  ]
  lines += [f"# {d.name} ({d.kind.__name__}): {d.doc}" for d in DERIVED.values()]
  return "\n".join(lines) + "\n"


def main(argv: Sequence[str]) -> int:
  """`--write-base-yml` regenerates base.yml; `--check` exits 1 when the checked-in file is stale."""
  text = render_base_yml()
  if argv[1:] == ["--write-base-yml"]:
    BASE_YML.write_text(text)
    return 0
  if argv[1:] == ["--check"]:
    if BASE_YML.read_text() != text:
      print(f"{BASE_YML} is stale: run python3 -m MaxText.config --write-base-yml", file=sys.stderr)
      return 1
    return 0
  print("usage: python3 -m MaxText.config --write-base-yml | --check", file=sys.stderr)
  return 2
