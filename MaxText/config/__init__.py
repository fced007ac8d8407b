"""Every config key, declared once: default, type and range, doc, and whether it describes the architecture.

One module per component holds its keys (`KEYS`, settable; `DERIVED`, computed by pyconfig). MaxText/configs/base.yml
and docs/config_reference.md are generated from them (`python3 -m MaxText.config --write`), the converters'
MODEL_KEYS are the keys marked `model=True`, and layer modules take their lists of names (attention kinds, rope
types, ...) from `choices`.
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
    lora,
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
    lora,
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
SECRETS: frozenset[str] = frozenset(name for name, k in KEYS.items() if k.secret)
MODEL_KEYS: tuple[str, ...] = tuple(name for name, k in KEYS.items() if k.model)
MESH_AXES = mesh.MESH_AXES
BASE_YML = pathlib.Path(__file__).resolve().parent.parent / "configs" / "base.yml"
REFERENCE_MD = pathlib.Path(__file__).resolve().parents[2] / "docs" / "config_reference.md"

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
# range and doc are declared: edit those, then run `python3 -m MaxText.config --write`.
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


def _cell(text: str, code: bool = False) -> str:
  """Text for a markdown table cell: pipes escaped; outside code spans, <placeholders> kept as text, not HTML."""
  text = text.replace("|", "\\|")
  return f"`{text}`" if code else text.replace("<", "&lt;").replace(">", "&gt;")


REFERENCE_HEADER = """\
# Config reference

Every key MaxText reads, by component: its type (with the allowed values or range), its default, and what it does.
GENERATED from the declarations in `MaxText/config/*.py` by `python3 -m MaxText.config --write`; a test fails when
this page is stale.

Values merge in this order, later winning: `MaxText/configs/base.yml` (and the `base_config:` files a config names),
`configs/models/<model_name>.yml`, `M_<KEY>` environment variables, then `key=value` arguments. An unknown key, a
value of the wrong type or out of range, or a contradiction between keys is a `CONFIG ERROR` naming the key (exit 2)
before anything is built.
"""


def render_reference() -> str:
  """docs/config_reference.md: one table per component (key, type, default, doc), then the derived values."""
  lines = [REFERENCE_HEADER.rstrip("\n")]
  for section in SECTIONS:
    lines += ["", f"## {section.TITLE[:1].upper()}{section.TITLE[1:]}", "", "| Key | Type | Default | Description |"]
    lines += ["| --- | --- | --- | --- |"]
    for k in section.KEYS:
      default = _cell(_yaml_scalar(k.default), code=True)
      lines.append(f"| `{k.name}` | {_cell(k.field.describe())} | {default} | {_cell(k.doc)} |")
  lines += [
      "",
      "## Derived values",
      "",
      "Computed by pyconfig from the keys above (setting one is a `CONFIG ERROR`).",
      "",
  ]
  lines += ["| Name | Type | Meaning |", "| --- | --- | --- |"]
  lines += [f"| `{d.name}` | {d.kind.__name__} | {_cell(d.doc)} |" for d in DERIVED.values()]
  return "\n".join(lines) + "\n"


GENERATED = ((BASE_YML, render_base_yml), (REFERENCE_MD, render_reference))


def main(argv: Sequence[str]) -> int:
  """`--write` regenerates base.yml and the config reference; `--check` exits 1 when a checked-in one is stale."""
  if argv[1:] == ["--write"]:
    for path, render in GENERATED:
      path.parent.mkdir(parents=True, exist_ok=True)
      path.write_text(render())
    return 0
  if argv[1:] == ["--check"]:
    stale = [str(path) for path, render in GENERATED if not path.exists() or path.read_text() != render()]
    for path in stale:
      print(f"{path} is stale: run python3 -m MaxText.config --write", file=sys.stderr)
    return 1 if stale else 0
  print("usage: python3 -m MaxText.config --write | --check", file=sys.stderr)
  return 2
