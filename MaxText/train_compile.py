"""Compiles the train step ahead of time, without allocating the model, and reports its per-device cost.

  python3 -m MaxText.train_compile MaxText/configs/base.yml model_name=llama3-8b per_device_batch_size=1 ...

Uses the same config, mesh, shardings and step function as MaxText.train, but only abstract inputs
(shapes, dtypes, shardings), so a model far larger than this machine's memory still compiles. Prints memory per
device (arguments, outputs, temporaries) and the analytic TFLOPs per step, so an OOM shows up before a launch.
"""

import logging
import sys
from typing import Sequence

import jax
import jax.numpy as jnp

from MaxText import metrics, sharding, startup, train

logger = logging.getLogger("MaxText")

_BATCH_KEYS = ("inputs", "inputs_position", "inputs_segmentation", "targets", "targets_position", "targets_segmentation")


def compile_train_step(config):
  """(compiled step, TrainSetup) for abstract inputs on the config's mesh."""
  mesh = sharding.create_mesh(config)
  setup = train.TrainSetup(config, mesh)
  shape = (config.global_batch_size_to_load, config.max_target_length)
  batch = {k: jax.ShapeDtypeStruct(shape, jnp.int32) for k in _BATCH_KEYS}
  state = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), setup.abstract_state, setup.state_shardings
  )
  with sharding.use_mesh(mesh, config.logical_axis_rules):
    step, _, _ = train.compile_train_step(setup, batch)
    return step.lower(state, batch).compile(), setup


def report(config, compiled, setup) -> dict:
  mem = compiled.memory_analysis()
  total, weights, attention = metrics.training_tflops_per_device(config)
  gib = 2**30
  out = {
      "parameters": setup.num_params,
      "tflops_per_device_per_step": total,
      "argument_gib": mem.argument_size_in_bytes / gib,
      "output_gib": mem.output_size_in_bytes / gib,
      "temp_gib": mem.temp_size_in_bytes / gib,
      "alias_gib": mem.alias_size_in_bytes / gib,
  }
  # Donated state is aliased: it is counted once, in the arguments.
  out["total_gib"] = out["argument_gib"] + out["output_gib"] + out["temp_gib"] - out["alias_gib"]
  print(f"model {config.model_name}: {setup.num_params:,} parameters on {config.num_devices} {config.hardware} devices")
  print(f"TFLOPs per step per device: {total:.4f} (weight matmuls {weights:.4f}, attention {attention:.4f})")
  print(
      f"memory per device: arguments {out['argument_gib']:.3f} GiB, outputs {out['output_gib']:.3f} GiB,"
      f" temporaries {out['temp_gib']:.3f} GiB, aliased {out['alias_gib']:.3f} GiB -> about {out['total_gib']:.3f} GiB"
  )
  return out


def main(argv: Sequence[str]):
  logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr, force=True)
  config = startup.start(argv, "train_compile")
  compiled, setup = compile_train_step(config)
  report(config, compiled, setup)


if __name__ == "__main__":
  main(sys.argv)
