"""Command-line plumbing the conversion tools share: their own key=value arguments beside config overrides."""

import difflib
import logging
import sys
from typing import Callable, Sequence

from MaxText import pyconfig, storage
from MaxText.config_schema import SCHEMA, ConfigError
from MaxText.utils.ckpt_conversion.weight_mapping import UnsupportedCheckpointError


def split_args(args: Sequence[str], tool_keys: Sequence[str]) -> tuple[dict[str, str], list[str]]:
  """(the tool's own arguments, config overrides) from `key=value` / `--key=value` arguments.

  A key that is neither is a ConfigError whose did-you-mean covers both kinds, so `output_directroy=` and `stepz=`
  get the same treatment as in every other entry point.
  """
  own, overrides = {}, []
  for arg in args:
    if "=" not in arg:
      raise ConfigError(f"argument {arg!r}: expected key=value")
    key, value = arg.split("=", 1)
    key = key.strip().lstrip("-")
    if key in tool_keys:
      own[key] = value
    elif key in SCHEMA:
      overrides.append(f"{key}={value}")
    else:
      close = difflib.get_close_matches(key, [*tool_keys, *SCHEMA], n=3, cutoff=0.6)
      hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
      raise ConfigError(f"{key}: unknown key in command-line arguments{hint}")
  return own, overrides


def require(own: dict[str, str], key: str, usage: str) -> str:
  if not own.get(key):
    raise ConfigError(f"{key}: required; usage: {usage}")
  return own[key]


def run(main: Callable[[], None]):
  """Runs a tool: config errors exit 2 (one line, no traceback), unsupported or missing checkpoints exit 1."""
  logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
  storage.configure()  # STORAGE_EMULATOR_HOST alone points every storage client at an emulator, as in startup.start
  try:
    main()
  except ConfigError as e:
    pyconfig.exit_with_config_error(e)
  except (UnsupportedCheckpointError, FileNotFoundError, FileExistsError) as e:
    print(f"ERROR: {e}", file=sys.stderr)
    sys.exit(1)
