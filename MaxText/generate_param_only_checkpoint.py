"""Exports params only, for decode and fine-tuning: `python3 -m MaxText.generate_param_only_checkpoint CONFIG ...`.

Reads the latest committed checkpoint of `run_name` (or `load_full_state_path` / `load_parameters_path`) and
writes {"params": ...} to `param_checkpoint_output_path` (default {run_dir}/params) in the config's
`weight_dtype` and layer layout (`scan_layers`), whatever the source's were.

With `lora_rank` > 0 it merges: the base (`load_parameters_path`) plus the run's adapters (its newest checkpoint, or
`checkpoint_path`) become plain weights W + (lora_alpha / lora_rank) A.B that any config without LoRA loads.
"""

import logging
import sys
from typing import Sequence

import jax

from MaxText import checkpointing, lora, pyconfig, sharding, startup, training
from MaxText.inference import loading
from MaxText.config_schema import ConfigError

logger = logging.getLogger("MaxText")


def source_path(config) -> str:
  if config.load_full_state_path or config.load_parameters_path:
    return config.load_full_state_path or config.load_parameters_path
  manager = checkpointing.create_manager(config)
  step = manager.latest_step() if manager is not None else None
  if manager is not None:
    manager.close()
  if step is None:
    raise ConfigError(f"run_name: no committed checkpoint in {config.checkpoint_dir} (or set load_full_state_path)")
  return f"{config.checkpoint_dir}/{step}"


def merged_lora_params(config):
  """A LoRA config's base + adapters folded into plain params (see inference/loading.py for the sources)."""
  mesh = sharding.create_mesh(config)
  _, _, abstract, shardings = training.build_model_skeleton(config, mesh)
  params = loading.load_params(config, abstract, shardings)
  return lora.merge(params, lora.scale(config), config.param_scan_axis)


def export(config, out: str = "") -> str:
  out = out or config.param_checkpoint_output_path or f"{config.run_dir}/params"
  if config.lora_rank > 0:
    params, src = merged_lora_params(config), "base + LoRA adapters"
  else:
    mesh = sharding.create_mesh(config)
    setup = training.TrainSetup(config, mesh)
    src = source_path(config)
    params = checkpointing.load_params(src, setup.abstract_state["params"], setup.param_shardings, config.param_scan_axis)
  checkpointing.save_params(out, params)
  count = sum(x.size for x in jax.tree.leaves(params))
  logger.info(
      "Wrote %s params (%s, %s) from %s to %s",
      f"{count:,}",
      config.weight_dtype.name,
      "scanned" if config.scan_layers else "unscanned",
      src,
      out,
  )
  return out


def main(argv: Sequence[str]):
  logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr, force=True)
  logging.getLogger("absl").setLevel(logging.WARNING)
  config = startup.start(argv, "generate_param_only_checkpoint")
  try:
    print(export(config))
  except (ConfigError, FileNotFoundError, ValueError) as e:
    pyconfig.exit_with_config_error(e)


if __name__ == "__main__":
  main(sys.argv)
