"""Compiles the train step ahead of time, without allocating the model, and reports its per-device cost.

  python3 -m MaxText.train_compile MaxText/configs/base.yml model_name=llama3-8b per_device_batch_size=1 ...

Uses the same config, mesh, shardings and step function as MaxText.train, but only abstract inputs
(shapes, dtypes, shardings), so a model far larger than this machine's memory still compiles. Prints memory per
device (arguments, outputs, temporaries) and the analytic TFLOPs per step, so an OOM shows up before a launch.
"""

import logging
import sys
import time
from typing import Sequence

import jax
import jax.numpy as jnp

from MaxText import aot_report, metrics, sharding, startup, topology, training
from MaxText.layers import decoders, pipeline

logger = logging.getLogger("MaxText")

_BATCH_KEYS = ("inputs", "inputs_position", "inputs_segmentation", "targets", "targets_position", "targets_segmentation")


def target_devices(config):
  """The devices to compile for: compile_topology's TPU slice(s), else the local ones."""
  if config.compile_topology:
    return topology.devices(config.compile_topology, config.compile_topology_num_slices)
  return None


def compile_train_step(config):
  """(compiled step, TrainSetup) for abstract inputs on the config's mesh."""
  mesh = sharding.create_mesh(config, target_devices(config))
  setup = training.TrainSetup(config, mesh)
  shape = (config.global_batch_size_to_load, config.max_target_length)
  batch = {k: jax.ShapeDtypeStruct(shape, jnp.int32) for k in _BATCH_KEYS}
  state = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), setup.abstract_state, setup.state_shardings
  )
  abstract = lambda tree, shardings: jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings
  )
  # LoRA's frozen base or DPO's reference model: an argument of the step, held like the params.
  frozen = (abstract(setup.abstract_frozen, setup.frozen_shardings),) if setup.has_frozen else ()
  with sharding.use_mesh(mesh, config.logical_axis_rules):
    step, _, _ = training.compile_train_step(setup, batch)
    return step.lower(state, batch, *frozen).compile(), setup


def report(config, compiled, setup) -> dict:
  """Prints and returns the per-device cost of the compiled step: memory (against the chip's HBM on a TPU slice),
  analytic and compiler FLOPs, and the bytes each collective kind moves (MaxText/aot_report.py)."""
  target = topology.target(config)
  mem = aot_report.memory(compiled, target.generation.hbm_bytes if target else None)
  total, weights, attention = metrics.training_tflops_per_device(config)
  flops = aot_report.compiler_flops(compiled)
  collectives = aot_report.collective_bytes(compiled.as_text(), config.num_devices)
  out = {
      "parameters": setup.num_params + setup.num_frozen,
      "trained_parameters": setup.num_params,
      "tflops_per_device_per_step": total,
      "compiler_tflops_per_device_per_step": None if flops is None else flops / 1e12,
      "collectives": collectives,
      **mem,
  }
  where = f"{config.num_devices} {config.hardware} devices"
  if target:
    slices = config.compile_topology_num_slices
    where = (
        f"{slices} x {target.name} ({target.topology_name}, {config.num_devices} chips)"
        if slices > 1
        else (f"{target.name} ({target.topology_name}, {config.num_devices} chips)")
    )
  mesh = ", ".join(f"{a}={n}" for a, n in zip(config.mesh_axes, config.ici_parallelism) if n > 1) or "one device"
  dcn = ", ".join(f"{a}={n}" for a, n in zip(config.mesh_axes, config.dcn_parallelism) if n > 1)
  trained = f" ({setup.num_params:,} trained: LoRA adapters)" if setup.lora else ""
  print(f"model {config.model_name}: {setup.num_params + setup.num_frozen:,} parameters{trained} on {where}")
  print(f"mesh: ici {mesh}" + (f"; dcn {dcn}" if dcn else ""))
  schedule = decoders.pipeline_schedule(config)
  if schedule is not None:
    print(pipeline.describe(schedule, config.micro_batch_size_to_train_on))
  compiler = "n/a" if flops is None else f"{flops / 1e12:.4f}"
  print(
      f"TFLOPs per step per device: {total:.4f} (weight matmuls {weights:.4f}, attention {attention:.4f});"
      f" compiler's count {compiler} (its cost model counts each loop body, e.g. the scanned layers, once)"
  )
  print(aot_report.memory_line(mem))
  print(aot_report.collectives_line(collectives))
  return out


def main(argv: Sequence[str]):
  logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr, force=True)
  config = startup.start(argv, "train_compile")
  start = time.perf_counter()
  try:
    compiled, setup = compile_train_step(config)
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    # The TPU compiler refuses a program whose buffers exceed HBM: that is this tool's answer, not a crash.
    print(f"DOES NOT FIT: {str(e).splitlines()[0]}")
    print("try: remat_policy=full, a smaller per_device_batch_size, more fsdp/tensor/expert sharding, or more chips")
    sys.exit(1)
  seconds = time.perf_counter() - start
  report(config, compiled, setup)
  print(f"compile time: {seconds:.1f} s")
  if config.compiled_trainstep_file:
    training.save_compiled_step(compiled, config.compiled_trainstep_file)
    print(f"compiled train step written to {config.compiled_trainstep_file}")


if __name__ == "__main__":
  main(sys.argv)
