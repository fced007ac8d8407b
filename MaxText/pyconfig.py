"""Builds the one frozen Config every MaxText entry point runs from.

Merge order, later wins: the yml named by argv[1] (after its `base_config:` parents) <
configs/models/<model_name>.yml < M_<KEY> environment variables < key=value arguments (and keyword overrides
from Python). Two phases: `resolve` merges and coerces the values by their declarations (MaxText/config/) without
touching JAX; `build` derives what depends on the devices (hardware, batch, mesh, backend ops), runs every
cross-key check (MaxText/config/checks.py) and freezes the Config. `initialize` is both, with no side effects;
entry points start through MaxText/startup.py, which puts the process set-up (host memory, jax.distributed)
between the phases. `python3 -m MaxText.pyconfig CONFIG key=value ...` prints the result and exits.
"""

import copy
import datetime
import difflib
import logging
import math
import os
import pathlib
import sys
import types
from typing import Any, Optional, Sequence

import jax.numpy as jnp
import yaml

from MaxText import distributed
from MaxText.config import DERIVED, SCHEMA, SECRETS, checks
from MaxText.config.declare import ConfigError
from MaxText.layers import ops  # what `auto` means per backend; imports no JAX

logger = logging.getLogger("MaxText")

PACKAGE_DIR = pathlib.Path(__file__).resolve().parent
CONFIGS_DIR = PACKAGE_DIR / "configs"
MODELS_DIR = CONFIGS_DIR / "models"
ENV_PREFIX = "M_"


def _copy_if_mutable(value: Any) -> Any:
  return copy.deepcopy(value) if isinstance(value, (list, dict)) else value


class Config:
  """Read-only attribute view of the resolved configuration.

  List values are handed out as copies, so code that edits what it read cannot change the config others see.
  """

  __slots__ = ("_values",)

  def __init__(self, values: dict[str, Any]):
    object.__setattr__(self, "_values", types.MappingProxyType(copy.deepcopy(dict(values))))

  def __getattr__(self, name: str) -> Any:
    try:
      return _copy_if_mutable(self._values[name])
    except KeyError:
      raise AttributeError(f"Config has no key {name!r}{_did_you_mean(name, self._values)}") from None

  def __setattr__(self, name, value):
    raise AttributeError(f"Config is read-only (tried to set {name!r})")

  def __delattr__(self, name):
    raise AttributeError(f"Config is read-only (tried to delete {name!r})")

  def __contains__(self, name: str) -> bool:
    return name in self._values

  def get(self, name: str) -> Any:
    """Like getattr(config, name): only declared keys (a default would hide a misspelt one)."""
    return getattr(self, name)

  def keys(self):
    return self._values.keys()

  def to_dict(self) -> dict[str, Any]:
    """Plain python values (dtypes as their names), suitable for yaml/json; secrets (serve_api_key) redacted."""
    plain = lambda k, v: "<redacted>" if k in SECRETS and v else v.name if isinstance(v, jnp.dtype) else v
    return {k: _copy_if_mutable(plain(k, v)) for k, v in self._values.items()}

  def to_yaml(self) -> str:
    return yaml.safe_dump(self.to_dict(), sort_keys=True, default_flow_style=None, width=120)

  def __repr__(self):
    return f"Config(run_name={self._values.get('run_name')!r}, model_name={self._values.get('model_name')!r})"


def _did_you_mean(key: str, candidates) -> str:
  close = difflib.get_close_matches(key, list(candidates), n=3, cutoff=0.6)
  return f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""


def _unknown_key(key: str, where: str) -> ConfigError:
  if key in DERIVED:
    return ConfigError(f"{key}: is derived ({DERIVED[key].doc}), not set; in {where}")
  return ConfigError(f"{key}: unknown key in {where}{_did_you_mean(key, SCHEMA)}")


def _resolve_config_path(path: str, relative_to=None):
  if "://" in path or (relative_to is not None and not isinstance(relative_to, pathlib.Path)):
    # A config in a bucket (gs://...), or a parent named by one: read through etils.epath (gcsfs/fsspec).
    from etils import epath  # pylint: disable=import-outside-toplevel

    remote = epath.Path(path) if "://" in path or relative_to is None else epath.Path(relative_to) / path
    try:
      if remote.is_file():
        return remote
    except Exception as e:  # pylint: disable=broad-exception-caught  # fsspec/gcsfs raise their own kinds
      raise ConfigError(f"config file {path!r}: cannot read {remote}: {e}") from None
    if "://" in path:
      raise ConfigError(f"config file {path!r} not found")
  candidates = [pathlib.Path(path)]
  if relative_to is not None:
    candidates.insert(0, relative_to / path)
  candidates += [CONFIGS_DIR / path, PACKAGE_DIR.parent / path]  # bare names; repo-relative paths from anywhere
  for candidate in candidates:
    if candidate.is_file():
      return candidate.resolve()
  raise ConfigError(f"config file {path!r} not found (looked in: {', '.join(str(c) for c in candidates)})")


def _read_yaml(path) -> dict[str, Any]:
  try:
    with path.open(encoding="utf-8") as f:
      data = yaml.safe_load(f)
  except yaml.YAMLError as e:
    raise ConfigError(f"config file {path}: not valid YAML: {e}") from None
  if data is None:
    return {}
  if not isinstance(data, dict):
    raise ConfigError(f"config file {path}: expected a mapping of key: value at the top level")
  return data


def _load_yaml_chain(path, seen: tuple = ()) -> dict[str, Any]:
  """Reads a yml and its `base_config:` ancestors; the child's keys win."""
  if path in seen:
    raise ConfigError(f"base_config: cycle through {path}")
  data = _read_yaml(path)
  parent = data.pop("base_config", None)
  merged = {}
  if parent:
    merged = _load_yaml_chain(_resolve_config_path(str(parent), path.parent), seen + (path,))
  for key in data:
    if key not in SCHEMA:
      raise _unknown_key(key, str(path))
  merged.update(data)
  return merged


def available_models() -> list[str]:
  return sorted(str(p.relative_to(MODELS_DIR).with_suffix("")) for p in MODELS_DIR.rglob("*.yml"))


def _parse_cli_value(key: str, text: str) -> Any:
  field = SCHEMA[key]
  if field.kind is str:
    return None if field.nullable and text in ("null", "None") else text
  try:
    return yaml.safe_load(text)
  except yaml.YAMLError:
    raise ConfigError(f"{key}: cannot parse {text!r} as {field.describe()}") from None


def _collect_overrides(args: Sequence[str], environ) -> tuple[dict, dict]:
  env = {}
  for name, text in environ.items():
    if not name.startswith(ENV_PREFIX):
      continue
    key = name[len(ENV_PREFIX) :].lower()
    if key not in SCHEMA:
      raise _unknown_key(key, f"environment variable {name}")
    env[key] = _parse_cli_value(key, text)
  cli = {}
  for arg in args:
    if "=" not in arg:
      raise ConfigError(f"argument {arg!r}: expected key=value")
    key, text = arg.split("=", 1)
    key = key.strip().lstrip("-")
    if key not in SCHEMA:
      raise _unknown_key(key, "command-line arguments")
    cli[key] = _parse_cli_value(key, text)
  return env, cli


def _model_yml(model_name: str) -> dict[str, Any]:
  if model_name == "default":
    return {}
  known = available_models()
  if model_name not in known:
    raise ConfigError(f"model_name: unknown model {model_name!r}; available: {', '.join(['default', *known])}")
  path = MODELS_DIR / f"{model_name}.yml"
  data = _read_yaml(path)
  for key in data:
    if key not in SCHEMA:
      raise _unknown_key(key, str(path))
  return data


def _scales(global_parameter_scale: int) -> tuple[int, int, int, int]:
  """Splits a power-of-two scale into emb, heads, mlp and layer multipliers, as upstream MaxText does.

  Each doubling goes to heads and mlp first, then emb, then layers, cycling, so a scale names the same
  model sizes it does in upstream MaxText recipes.
  """
  log = int(math.log2(global_parameter_scale))
  if 2**log != global_parameter_scale:
    raise ConfigError(f"global_parameter_scale: {global_parameter_scale} is not a power of two")
  base, rem = divmod(log, 3)
  heads = 2 ** (base + (rem > 0))
  emb = 2 ** (base + (rem > 1))
  return emb, heads, heads, 2**base


def _fill_parallelism(values: dict, prefix: str, total: int, what: str) -> list[int]:
  keys = [f"{prefix}_{a}_parallelism" for a in values["mesh_axes"]]
  degrees = [values[k] for k in keys]
  for k, d in zip(keys, degrees):
    if d == 0:
      raise ConfigError(f"{k}: 0 is not a parallelism degree (use a positive degree, or -1 to fill)")
  fill = [k for k, d in zip(keys, degrees) if d == -1]
  if len(fill) > 1:
    raise ConfigError(f"{', '.join(fill)}: at most one {prefix}_* parallelism may be -1")
  known = math.prod(d for d in degrees if d != -1)
  if fill:
    if total % known:
      others = ", ".join(f"{k}={d}" for k, d in zip(keys, degrees) if d not in (1, -1))
      raise ConfigError(
          f"{others}: {fill[0]}=-1 cannot fill, {total} {what} is not divisible by the product ({known}) of the"
          " other degrees"
      )
    degrees[keys.index(fill[0])] = total // known
  if math.prod(degrees) != total:
    given = ", ".join(f"{k}={d}" for k, d in zip(keys, degrees) if d != 1)
    raise ConfigError(
        f"{prefix}_*_parallelism: product of ({given or 'all 1'}) is {math.prod(degrees)}, but there are {total} {what}"
    )
  return degrees


def _derive(values: dict) -> dict:
  """Adds the derived values (and resolves hardware, steps, dtypes, ...); raises ConfigError for bad settings."""
  import jax  # pylint: disable=import-outside-toplevel

  v = dict(values)
  emb_s, heads_s, mlp_s, layer_s = _scales(v["global_parameter_scale"])
  v["emb_dim"] = v["base_emb_dim"] * emb_s
  v["num_query_heads"] = v["base_num_query_heads"] * heads_s
  v["num_kv_heads"] = v["base_num_kv_heads"] * heads_s
  v["mlp_dim"] = v["base_mlp_dim"] * mlp_s
  v["num_decoder_layers"] = v["base_num_decoder_layers"] * layer_s

  # Schedule.
  if v["steps"] == -1 and v["learning_rate_schedule_steps"] == -1:
    raise ConfigError("steps: -1 needs learning_rate_schedule_steps > 0")
  if v["steps"] == 0:
    raise ConfigError("steps: must be positive (or -1 to use learning_rate_schedule_steps)")
  if v["learning_rate_schedule_steps"] == -1:
    v["learning_rate_schedule_steps"] = v["steps"]
  if v["steps"] == -1:
    v["steps"] = v["learning_rate_schedule_steps"]
  if v["learning_rate_schedule_steps"] == 0:
    raise ConfigError("learning_rate_schedule_steps: must be positive (or -1 to follow steps)")
  v["warmup_steps"] = int(v["warmup_steps_fraction"] * v["learning_rate_schedule_steps"])
  if v["lr_schedule_type"] == "wsd" and v["warmup_steps_fraction"] + v["wsd_decay_steps_fraction"] > 1:
    raise ConfigError("wsd_decay_steps_fraction: warmup_steps_fraction + wsd_decay_steps_fraction must not exceed 1")

  # Devices, mesh and batch: the local ones, or those of the TPU slice an ahead-of-time compile targets.
  if v["compile_topology"]:
    _derive_compile_target(v)
  else:
    v["hardware"] = distributed.detect_hardware(v["hardware"])
    v["num_devices"] = jax.device_count()
    v["process_count"] = jax.process_count()
    v["process_index"] = jax.process_index()
  checks.check_mesh_keys(v)
  if v["num_processes"] > 1 and v["process_count"] != v["num_processes"] and not v["skip_jax_distributed_system"]:
    raise ConfigError(
        f"num_processes: {v['num_processes']} asked for, but JAX runs {v['process_count']} process(es); an entry"
        " point starts jax.distributed (MaxText/startup.py), pyconfig.initialize never does"
    )
  if not v["compile_topology"]:
    v["num_slices"] = distributed.num_slices(v["num_slices"])
  if v["num_devices"] % v["num_slices"]:
    raise ConfigError(f"num_slices: {v['num_devices']} devices do not split into {v['num_slices']} slices")
  v["ici_parallelism"] = _fill_parallelism(v, "ici", v["num_devices"] // v["num_slices"], "devices per slice")
  v["dcn_parallelism"] = _fill_parallelism(v, "dcn", v["num_slices"], "slices")
  _resolve_backend_ops(v)
  stage = v["mesh_axes"].index("stage") if "stage" in v["mesh_axes"] else None
  v["pipeline_stages"] = 1 if stage is None else v["ici_parallelism"][stage] * v["dcn_parallelism"][stage]
  v["pipeline_microbatches"] = v["num_pipeline_microbatches"]
  if v["pipeline_microbatches"] == -1:
    v["pipeline_microbatches"] = v["pipeline_stages"]

  micro = v["per_device_batch_size"] * v["num_devices"]
  if abs(micro - round(micro)) < 1e-6:  # 0.7 x 10 devices is 7.000000000000001 in floating point
    micro = round(micro)
  if micro < 1 or not float(micro).is_integer():
    raise ConfigError(
        f"per_device_batch_size: {v['per_device_batch_size']} x {v['num_devices']} devices = {micro} is not a whole"
        " number of sequences >= 1"
    )
  v["micro_batch_size_to_train_on"] = int(micro)
  v["global_batch_size_to_train_on"] = int(micro) * v["gradient_accumulation_steps"]
  v["global_batch_size_to_load"] = v["global_batch_size_to_train_on"]
  if v["global_batch_size_to_load"] % v["process_count"]:
    raise ConfigError(
        f"per_device_batch_size: global batch {v['global_batch_size_to_load']} does not split over"
        f" {v['process_count']} processes"
    )

  # Dtypes.
  v["dtype"] = jnp.dtype(v["dtype"])
  v["weight_dtype"] = jnp.dtype(v["weight_dtype"])
  v["mu_dtype"] = jnp.dtype(v["mu_dtype"]) if v["mu_dtype"] else v["weight_dtype"]

  # Run identity and directories.
  if not v["run_name"]:
    stamp = datetime.datetime.now().strftime("%Y-%m-%d-%H-%M-%S")
    v["run_name"] = f"{v['model_name'].replace('/', '_')}_{stamp}"
  base = v["base_output_directory"].rstrip("/")
  if "://" not in base:  # Orbax needs absolute paths; a relative one means relative to where the run starts
    base = os.path.abspath(base or ".")
  run_dir = f"{base}/{v['run_name']}"
  v["run_dir"] = run_dir
  v["checkpoint_dir"] = f"{run_dir}/checkpoints"
  v["tensorboard_dir"] = f"{run_dir}/tensorboard"
  v["metrics_dir"] = f"{run_dir}/metrics"
  return v


def _derive_compile_target(v: dict):
  """hardware, device and slice counts of `compile_topology` x `compile_topology_num_slices` (one compiling process)."""
  from MaxText import topology  # pylint: disable=import-outside-toplevel

  target = topology.lookup(v["compile_topology"])
  topology.require_libtpu()
  if v["hardware"] not in ("auto", "tpu"):
    raise ConfigError(f"hardware: {v['hardware']!r} contradicts compile_topology={v['compile_topology']} (a TPU slice)")
  slices = v["compile_topology_num_slices"]
  if v["num_slices"] not in (-1, slices):
    raise ConfigError(
        f"num_slices: {v['num_slices']} contradicts compile_topology_num_slices={slices} (leave num_slices at -1)"
    )
  v.update(hardware="tpu", num_devices=target.chips * slices, num_slices=slices, process_count=1, process_index=0)


def _resolve_backend_ops(v: dict):
  """`auto` backend-op keys -> what layers/ops says for the resolved `hardware` (layers read concrete values)."""
  hardware = v["hardware"]
  if v["dense_matmul_backward"] == "auto":
    v["dense_matmul_backward"] = ops.auto_dense_matmul_backward(hardware)
  if v["head_loss"] == "auto":
    v["head_loss"] = ops.auto_head_loss(hardware)
  if v["moe_grouped_matmul"] == "auto":
    v["moe_grouped_matmul"] = ops.auto_grouped_matmul(hardware, megablox_fits=not checks.megablox_misfit(v))
  # Query blocks slice the sequence axis; with it sharded (sequence/context parallelism) that would reshard, so
  # one block then, whatever was asked.
  degrees = [dict(zip(v["mesh_axes"], v[f"{where}_parallelism"])) for where in ("ici", "dcn")]
  sharded = any(d.get(axis, 1) != 1 for d in degrees for axis in ("sequence", "context"))
  if v["attention_causal_blocks"] == 0 or sharded:
    v["attention_causal_blocks"] = ops.auto_causal_blocks(hardware, sharded)


def resolve(argv: Sequence[str], environ=None, **overrides) -> dict[str, Any]:
  """Phase 1: argv = [program, config_path, key=value, ...] merged and coerced; touches no JAX backend.

  Keyword overrides behave like key=value arguments (given last), which is how Python callers and tests set keys.
  Raises ConfigError on bad input.
  """
  environ = os.environ if environ is None else environ
  if len(argv) < 2 or not argv[1]:
    raise ConfigError("no config file given: usage: python3 -m MaxText.<module> MaxText/configs/base.yml key=value ...")
  config_path = _resolve_config_path(argv[1])
  values = {k: None for k in SCHEMA}
  base = _load_yaml_chain(config_path)
  if any(k not in base for k in SCHEMA):
    # A config that does not chain up to base.yml still gets base.yml's defaults for the keys it leaves out.
    base = {**_load_yaml_chain(CONFIGS_DIR / "base.yml"), **base}
  values.update(base)
  env, cli = _collect_overrides(list(argv[2:]), environ)
  for key in overrides:
    if key not in SCHEMA:
      raise _unknown_key(key, "keyword overrides")
  cli.update(overrides)
  user = {**env, **cli}

  model_name = user.get("model_name", values["model_name"])
  model_name = SCHEMA["model_name"].coerce("model_name", model_name)
  model = _model_yml(model_name)
  values.update(model)
  values["model_name"] = model_name
  values.update(user)

  for key, field in SCHEMA.items():
    values[key] = field.coerce(key, values[key])
  logging.getLogger("MaxText").setLevel(values["log_level"])
  # Logged once the level is set (and after coercion, so 4096 vs 4096.0 is not an override).
  for key in user:
    if key in model and model[key] != values[key]:
      logger.info("Overriding model key %s: %r (from %s.yml) -> %r", key, model[key], model_name, values[key])
  values["model_keys"] = sorted(model)
  values["config_path"] = str(config_path)
  return values


def build(values: dict[str, Any], program: Optional[str] = None) -> Config:
  """Phase 2: derives the device-dependent values from `resolve`'s output, checks every key, freezes the Config.

  `program` (an entry point's name, checks.PROGRAMS) adds that entry point's refusals; None for Python callers.
  """
  derived = _derive(values)
  checks.check(derived, program)
  undeclared = set(derived) - set(SCHEMA) - set(DERIVED)
  assert not undeclared, f"derived values without a declaration in MaxText/config/: {sorted(undeclared)}"
  return Config(derived)


def initialize(argv: Sequence[str], environ=None, *, program: Optional[str] = None, **overrides) -> Config:
  """The Config for argv (resolve, then build); raises ConfigError on bad input. No process side effects:
  neither glibc's allocator nor jax.distributed is touched (entry points use MaxText/startup.py for those)."""
  return build(resolve(argv, environ, **overrides), program)


def initialize_or_exit(argv: Sequence[str], **overrides) -> Config:
  """CLI wrapper: a ConfigError becomes one `CONFIG ERROR:` line on stderr and exit code 2."""
  try:
    return initialize(argv, **overrides)
  except ConfigError as e:
    exit_with_config_error(e)


def exit_with_config_error(e: Exception):
  print(f"CONFIG ERROR: {e}", file=sys.stderr)
  sys.exit(2)


def log_config(config: Config):
  if config.log_config:
    logger.info("Resolved config:\n%s", config.to_yaml())


def main(argv: Sequence[str]):
  from MaxText import startup  # pylint: disable=import-outside-toplevel  # startup imports this module

  logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
  config = startup.start(argv)
  print(config.to_yaml(), end="")


if __name__ == "__main__":
  main(sys.argv)
