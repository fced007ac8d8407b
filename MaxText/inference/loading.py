"""Finding and loading the parameters to decode with, with errors that name the cause.

Sources, in order: `checkpoint_path` (a run's checkpoints/ directory, whose newest committed step is used, or one
step / params-only directory), `load_parameters_path`, `load_full_state_path` (a params-only checkpoint or a training
step directory), else the newest committed checkpoint of `run_name`. Any of them may be local or gs://...
Scanned or unscanned layouts load into either.
"""

import logging

import jax

from MaxText import checkpointing, lora, storage
from MaxText.config_schema import ConfigError
from MaxText.layers import pipeline, quantization, scan_layout

logger = logging.getLogger("MaxText")


def latest_checkpoint(checkpoint_dir: str) -> str | None:
  """`{checkpoint_dir}/{step}` of the newest committed step, or None; reads only (creates nothing)."""
  steps = checkpointing.committed_steps(checkpoint_dir)
  return storage.join(checkpoint_dir, str(steps[0])) if steps else None


def checkpoint_path_source(path: str) -> str:
  """The directory `checkpoint_path` names to read (see checkpointing.resolve); ConfigError naming the key."""
  storage.check_readable("checkpoint_path", path)
  try:
    return checkpointing.resolve(path)
  except FileNotFoundError as e:
    raise ConfigError(f"checkpoint_path: {e}") from None


def _readable(key: str, path: str) -> str:
  """`path`, after checking it can be read; ConfigError naming `key` otherwise."""
  if storage.is_remote(path):
    storage.check_readable(key, path)  # names a missing bucket or missing credentials
  elif not storage.exists(path):
    raise ConfigError(f"{key}: no checkpoint at {path}")
  return path


def checkpoint_source(config) -> tuple[str, str]:
  """(config key that names the source, path) of the parameters to load; ConfigError when there are none."""
  if config.checkpoint_path:
    return "checkpoint_path", checkpoint_path_source(config.checkpoint_path)
  for key in ("load_parameters_path", "load_full_state_path"):
    path = getattr(config, key)
    if path:
      return key, _readable(key, path)
  path = latest_checkpoint(config.checkpoint_dir)
  if path is None:
    raise ConfigError(
        f"run_name: no checkpoint found for run {config.run_name!r} in {config.checkpoint_dir}"
        " (set load_parameters_path, or the run_name of a run that saved checkpoints)"
    )
  return "run_name", path


def _shapes(tree) -> dict[str, tuple]:
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join(str(getattr(k, "key", k)) for k in path): tuple(leaf.shape) for path, leaf in flat}


def _as_shapes(tree):
  return jax.tree.map(
      lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), tree, is_leaf=lambda m: hasattr(m, "shape")
  )


def shape_mismatches(path: str, abstract_params, param_scan_axis: int) -> list[str]:
  """Differences between a checkpoint's parameter tree and the config's (compared in the checkpoint's layout)."""
  stored = checkpointing.stored_params_tree(path)
  want = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), abstract_params)
  stored_unscanned, want_unscanned = checkpointing.layers_are_unscanned(stored), checkpointing.layers_are_unscanned(want)
  if stored_unscanned and not want_unscanned:
    want = scan_layout.scanned_to_unscanned(want, param_scan_axis)
  elif want_unscanned and not stored_unscanned:
    stacked = scan_layout.unscanned_to_scanned(want, param_scan_axis)
    if scan_layout.stacks_disagree(stored, stacked):
      stored = scan_layout.scanned_to_unscanned(_as_shapes(stored), param_scan_axis)
    else:
      want = stacked
  have, need = _shapes(stored), _shapes(want)
  # A pipelined run stores a stacked layer axis split as [R, S, Lps]: a reshape, not a mismatch.
  problems = [
      f"{k}: checkpoint {have[k]} vs config {need[k]}"
      for k in sorted(need)
      if k in have
      and have[k] != need[k]
      and not ("decoder/layers" in k and pipeline.relayout_compatible(have[k], need[k]))
  ]
  problems += [f"{k}: missing from the checkpoint" for k in sorted(set(need) - set(have))]
  problems += [f"{k}: in the checkpoint but not in the model" for k in sorted(set(have) - set(need))]
  return problems


def load_params(config, abstract_params, param_shardings):
  """The params pure dict, placed with `param_shardings`; ConfigError for a missing or mismatched checkpoint.

  With `save_quantized_params_path` (and a float checkpoint) the float params are loaded, int8-quantized into the
  layout of `abstract_params` (a model built for a quantized checkpoint) and written there as a params-only checkpoint.
  """
  if config.save_quantized_params_path and not config.checkpoint_is_quantized:
    return _load_and_quantize(config, abstract_params, param_shardings)
  return _load(config, abstract_params, param_shardings)


def _load_and_quantize(config, abstract_params, param_shardings):
  float_abstract = quantization.float_layout(abstract_params, config.weight_dtype)
  float_shardings = quantization.float_layout(param_shardings)
  params = _load(config, float_abstract, float_shardings)
  params = jax.jit(lambda p: quantization.quantize_params(p, abstract_params), out_shardings=param_shardings)(params)
  path = config.save_quantized_params_path
  checkpointing.save_params(path, params)
  logger.info(
      "Saved int8-quantized params to %s (%.1f MB, from %.1f MB)",
      path,
      quantization.param_bytes(params) / 1e6,
      quantization.param_bytes(float_abstract) / 1e6,
  )
  return params


def _load_lora(config, abstract_params, param_shardings):
  """A LoRA config's params: the base from load_parameters_path, the adapters from checkpoint_path or run_name."""
  if not config.load_parameters_path:
    raise ConfigError(
        "load_parameters_path: a LoRA config (lora_rank > 0) loads its frozen base from load_parameters_path and its"
        " adapters from checkpoint_path or the newest checkpoint of run_name"
    )
  base_abstract, _ = lora.split(abstract_params)
  base_shardings, _ = lora.split(param_shardings)
  base_path = _readable("load_parameters_path", config.load_parameters_path)
  base = _load_checked(config, "load_parameters_path", base_path, base_abstract, base_shardings)
  return lora.combine(base, load_adapters(config, abstract_params, param_shardings))


def load_adapters(config, abstract_params, param_shardings):
  """A LoRA config's adapters alone (pure dict) from checkpoint_path or the newest checkpoint of run_name."""
  if config.checkpoint_path:
    key, path = "checkpoint_path", checkpoint_path_source(config.checkpoint_path)
  else:
    key, path = "run_name", latest_checkpoint(config.checkpoint_dir)
    if path is None:
      raise ConfigError(
          f"run_name: no LoRA adapters found for run {config.run_name!r} in {config.checkpoint_dir} (set"
          " checkpoint_path to a checkpoint of the LoRA run)"
      )
  _, adapter_abstract = lora.split(abstract_params)
  _, adapter_shardings = lora.split(param_shardings)
  return _load_checked(config, key, path, adapter_abstract, adapter_shardings)


def _load(config, abstract_params, param_shardings):
  if config.lora_rank > 0:
    return _load_lora(config, abstract_params, param_shardings)
  key, path = checkpoint_source(config)
  return _load_checked(config, key, path, abstract_params, param_shardings)


def _load_checked(config, key: str, path: str, abstract_params, param_shardings):
  """Params from a readable checkpoint `path`; ConfigError naming `key` when it does not match the model."""
  try:
    problems = shape_mismatches(path, abstract_params, config.param_scan_axis)
  except (FileNotFoundError, ValueError) as e:
    raise ConfigError(f"{key}: cannot read a checkpoint at {path}: {e}") from None
  if problems:
    shown = "; ".join(problems[:5]) + (f"; ... ({len(problems)} in all)" if len(problems) > 5 else "")
    if any(quantization.SCALE_NAME in p for p in problems):
      shown += " (int8 checkpoints from save_quantized_params_path load with checkpoint_is_quantized=true)"
    raise ConfigError(f"{key}: the checkpoint at {path} does not match this config's model: {shown}")
  logger.info("Loading parameters from %s", path)
  return checkpointing.load_params(path, abstract_params, param_shardings, config.param_scan_axis)
