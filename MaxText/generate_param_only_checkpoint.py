"""Exports params only, for decode and fine-tuning: `python3 -m MaxText.generate_param_only_checkpoint CONFIG ...`.

Reads the latest committed checkpoint of `run_name` (or `load_full_state_path` / `load_parameters_path`) and
writes {"params": ...} to `param_checkpoint_output_path` (default {run_dir}/params) in the config's
`weight_dtype` and layer layout (`scan_layers`), whatever the source's were.
"""

import logging
import sys
from typing import Sequence

import jax

from MaxText import checkpointing, pyconfig, sharding, startup, train
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


def export(config) -> str:
  mesh = sharding.create_mesh(config)
  setup = train.TrainSetup(config, mesh)
  src = source_path(config)
  params = checkpointing.load_params(src, setup.abstract_state["params"], setup.param_shardings, config.param_scan_axis)
  out = config.param_checkpoint_output_path or f"{config.run_dir}/params"
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
