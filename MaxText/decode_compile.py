"""Compiles the decode engine's prefill and generate steps ahead of time and reports their per-device cost.

  python3 -m MaxText.decode_compile MaxText/configs/base.yml model_name=llama2-70b compile_topology=v5e-256 \
      per_device_batch_size=4 max_prefill_predict_length=1024 max_target_length=2048 [attention=paged]

Builds the Engine MaxText.decode and MaxText.serve run (the same model, cache layers and shardings; slots =
per_device_batch_size x devices, prompts up to max_prefill_predict_length, a cache of max_target_length tokens per
slot, or pagedattn_* pages with attention=paged) on the mesh of `compile_topology` (the local devices without it),
and lowers its jitted steps for abstract inputs (shapes, dtypes, shardings), so no weight is allocated and a model
far larger than this machine compiles. Prints, per step, the memory per device against the chip's HBM and the
KV-cache bytes each device holds (from the cache arrays' sharded shapes).
"""

import dataclasses
import logging
import sys
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from MaxText import aot_report, sharding, startup, topology, train_compile
from MaxText.inference import engine as engine_lib

logger = logging.getLogger("MaxText")

PROGRAMS = ("prefill", "insert", "generate")


def _abstract(tree, shardings):
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def per_device_bytes(tree) -> int:
  """Bytes one device holds of a tree of sharded ShapeDtypeStructs (the largest shard of each array)."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
    total += int(np.prod(shape, dtype=np.int64)) * jnp.dtype(leaf.dtype).itemsize
  return total


@dataclasses.dataclass
class DecodeCompile:
  """The engine, its abstract params and decode state, and the compiled steps (by name)."""

  engine: engine_lib.Engine
  params: dict
  state: dict
  compiled: dict

  @property
  def cache(self):
    return self.state["cache"]

  def cache_bytes_by_kind(self) -> dict[str, int]:
    """Per-device bytes of the decode state's cache: keys/values (pages, and the mirror kernel's contiguous copy,
    included), int8 scales, and the rest (filled lengths, page tables)."""
    out = {"kv": 0, "scales": 0, "index": 0}
    for path, leaf in jax.tree_util.tree_flatten_with_path(self.cache)[0]:
      name = str(getattr(path[-1], "key", path[-1]))
      # key_scale, key_scale_pages, key_scale_rows (the paged mirror's copy) are scales; the rest holds keys/values.
      kind = "scales" if "_scale" in name else "index" if name in ("lengths", "page_table") else "kv"
      out[kind] += per_device_bytes(leaf)
    return out


def build_engine(config, devices: Optional[Sequence] = None) -> engine_lib.Engine:
  """The serving Engine on the config's mesh over `devices` (compile_topology's, or the local ones)."""
  mesh = sharding.create_mesh(config, devices if devices is not None else train_compile.target_devices(config))
  return engine_lib.Engine(config, mesh)


def _compile(lowered):
  """The compiled step, or the TPU compiler's refusal (it will not compile a step that needs more HBM than the chip
  has) as a string; any other error propagates."""
  try:
    return lowered.compile()
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    return str(e).strip().splitlines()[0]


def compile_decode(config, programs: Sequence[str] = PROGRAMS) -> DecodeCompile:
  """Lowers and compiles the engine's `programs` for abstract params and decode state: prefill and insert of one
  prompt of max_prefill_predict_length tokens (what the scheduler runs per request), and generate, one decode step
  for every slot. A step the TPU compiler refuses for lack of HBM is kept as its error message."""
  engine = build_engine(config)
  # pylint: disable=protected-access  # the engine's own jitted steps, lowered instead of called
  params = _abstract(engine.abstract_params, engine.param_shardings)
  state = _abstract(jax.eval_shape(engine._init_state_impl), engine.state_shardings)
  compiled = {}
  with sharding.use_mesh(engine.mesh, engine.rules):
    settings = engine_lib._settings(None, 1, engine.default_sampling)  # numpy: only shapes and dtypes
    prompt = (
        jax.ShapeDtypeStruct((1, engine.dims.max_prefill_length), jnp.int32),
        jax.ShapeDtypeStruct((1,), jnp.int32),
        jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), settings),
    )
    if "prefill" in programs:
      compiled["prefill"] = _compile(engine._prefill.lower(params, *prompt))
    if "insert" in programs:
      prefix = jax.eval_shape(engine._prefill_impl, params, *prompt)
      compiled["insert"] = _compile(engine._insert.lower(prefix, state, jax.ShapeDtypeStruct((1,), jnp.int32)))
    if "generate" in programs:
      compiled["generate"] = _compile(engine._generate.lower(params, state, steps=1, with_logits=False))
  # pylint: enable=protected-access
  return DecodeCompile(engine, params, state, compiled)


def _size(n: float) -> str:
  return f"{n / aot_report.GIB:.3f} GiB" if n >= aot_report.GIB else f"{n / 2**20:.3f} MiB"


def report(config, result: DecodeCompile) -> dict:
  """Prints and returns, per step, memory per device (GiB) and whether it fits the chip's HBM (a step the compiler
  refused: {"fits": False, "error": message}), with the params and KV-cache bytes per device."""
  target = topology.target(config)
  hbm = target.generation.hbm_bytes if target is not None else None
  dims = result.engine.dims
  cache = result.cache_bytes_by_kind()
  param_bytes = per_device_bytes(result.params)
  if target:
    where = f"{config.compile_topology} ({config.num_devices} TPU devices)"
  else:
    where = f"{config.num_devices} local {config.hardware} device(s)"
  layout = "paged" if result.engine.page_spec else "contiguous" + (", int8" if config.quantize_kvcache else "")
  print(
      f"model {config.model_name}: {_size(param_bytes)} of params per device on {where}; {dims.num_slots} slots,"
      f" prefill {dims.max_prefill_length} tokens, cache of {dims.max_cache_length} tokens per slot ({layout})"
  )
  print(
      f"KV cache per device: {_size(cache['kv'])} keys/values"
      + (f" + {_size(cache['scales'])} int8 scales" if cache["scales"] else "")
      + f" + {_size(cache['index'])} lengths/page tables"
  )
  out = {"param_bytes_per_device": param_bytes, "kv_cache_bytes_per_device": cache}
  for name, compiled in result.compiled.items():
    if isinstance(compiled, str):
      out[name] = {"fits": False, "error": compiled}
      print(f"{name}: DOES NOT FIT: {compiled}")
      continue
    out[name] = aot_report.memory(compiled, hbm)
    print(f"{name}: {aot_report.memory_line(out[name])}")
  return out


def main(argv: Sequence[str]):
  logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr, force=True)
  config = startup.start(argv, "decode_compile")
  out = report(config, compile_decode(config))
  if not all(out[name].get("fits", True) for name in PROGRAMS):
    sys.exit(1)  # a step does not fit the chip's HBM


if __name__ == "__main__":
  main(sys.argv)
