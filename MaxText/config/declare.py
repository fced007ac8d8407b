"""The declaration of one config key: its type and range (a Field), default, doc and role.

Kept free of JAX and Flax so any module (layers, input pipeline, converters) can import the declarations.
"""

import dataclasses
from typing import Any, Optional

__all__ = [
    "BOOL",
    "ConfigError",
    "DTYPES",
    "Derived",
    "Field",
    "Float",
    "Int",
    "Key",
    "LIST",
    "LIST_OF_STR",
    "NONNEG",
    "PAR",
    "POS",
    "STR",
    "Str",
]


class ConfigError(ValueError):
  """A user-facing configuration error; the CLI prints it as `CONFIG ERROR: ...` and exits 2."""


_KIND_NAMES = {bool: "bool", int: "int", float: "float", str: "string", list: "list"}


@dataclasses.dataclass(frozen=True)
class Field:
  """A key's python type, whether null is allowed, and its allowed values or range."""

  kind: type
  choices: Optional[tuple] = None
  min: Optional[float] = None
  max: Optional[float] = None
  nullable: bool = False
  item: Optional[type] = None  # element type of list keys (None = any yaml value)

  def coerce(self, key: str, value: Any) -> Any:
    """Returns `value` converted to this field's type, or raises ConfigError naming `key`."""
    if value is None:
      if self.nullable:
        return None
      raise ConfigError(f"{key}: null is not allowed, expected {self.describe()}")
    value = self._convert(key, value)
    if self.choices is not None and value not in self.choices:
      raise ConfigError(f"{key}: {value!r} is not one of {list(self.choices)}")
    if self.min is not None and value < self.min:
      raise ConfigError(f"{key}: {value!r} is below the minimum {self.min}")
    if self.max is not None and value > self.max:
      raise ConfigError(f"{key}: {value!r} is above the maximum {self.max}")
    return value

  def _convert(self, key, value):  # pylint: disable=too-many-return-statements
    bad = ConfigError(f"{key}: {value!r} is not a valid {self.describe()}")
    if self.kind is bool:
      if isinstance(value, bool):
        return value
      if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
      raise bad
    if self.kind in (int, float):
      if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise bad
      if isinstance(value, str):
        try:
          value = float(value) if self.kind is float else int(value)
        except ValueError:
          raise bad from None
      if self.kind is float:
        return float(value)
      if isinstance(value, float) and not value.is_integer():
        raise bad
      return int(value)
    if self.kind is str:
      if isinstance(value, (list, dict)):
        raise bad
      return str(value)
    if self.kind is list:
      if isinstance(value, tuple):
        value = list(value)
      if not isinstance(value, list):
        raise bad
      if self.item is not None:
        return [Field(self.item).coerce(f"{key}[{i}]", v) for i, v in enumerate(value)]
      return value
    raise bad

  def describe(self) -> str:
    name = _KIND_NAMES[self.kind]
    if self.item is not None:
      name = f"list of {Field(self.item).describe()}"
    if self.choices is not None:
      name += f" in {list(self.choices)}"
    if self.min is not None or self.max is not None:
      name += f" in [{'-inf' if self.min is None else self.min}, {'inf' if self.max is None else self.max}]"
    return name + (" or null" if self.nullable else "")


@dataclasses.dataclass(frozen=True)
class Key:
  """One settable key: base.yml's line for it is generated from this (default and doc).

  `model` marks an architecture key: a converted checkpoint's model.yml writes every one of them. `secret` marks a
  credential: logged and written configs show it redacted.
  """

  name: str
  default: Any
  field: Field
  doc: str
  model: bool = False
  secret: bool = False
  derived = False

  def __post_init__(self):
    object.__setattr__(self, "default", self.field.coerce(self.name, self.default))


@dataclasses.dataclass(frozen=True)
class Derived:
  """A value pyconfig computes (never set by a user): its python type and what it means."""

  name: str
  kind: Any
  doc: str
  derived = True


def Int(lo: Optional[int] = None, hi: Optional[int] = None, **kw) -> Field:  # pylint: disable=invalid-name
  return Field(int, min=lo, max=hi, **kw)


def Float(lo: Optional[float] = None, hi: Optional[float] = None, **kw) -> Field:  # pylint: disable=invalid-name
  return Field(float, min=lo, max=hi, **kw)


def Str(*choices: str, **kw) -> Field:  # pylint: disable=invalid-name
  return Field(str, choices=tuple(choices) if choices else None, **kw)


BOOL = Field(bool)
STR = Str()
POS = Int(1)
NONNEG = Int(0)
PAR = Int(-1)  # a parallelism degree: -1 fills the remaining devices
LIST = Field(list)
LIST_OF_STR = Field(list, item=str)
DTYPES = ("float32", "bfloat16", "float16")
