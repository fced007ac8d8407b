"""Ahead-of-time decode compile: the compiled steps hold the KV cache the config describes, sharded as the engine
shards it, without allocating weights; with libtpu, the same for real TPU slices."""

import os
import subprocess
import sys

import jax
import pytest

from MaxText import decode_compile, pyconfig, topology
from MaxText.tests.model_test_utils import make_config

# tests/tiny-llama: 2 layers, 2 kv heads of 16 dims; float32 activations (the cache dtype).
LAYERS, KV_HEADS, HEAD_DIM, F32 = 2, 2, 16, 4


def _config(**kw):
  return make_config(max_target_length=64, max_prefill_predict_length=16, **kw)


def analytic_kv_bytes(slots: int, length: int, bytes_per_value: float, shards: int) -> float:
  """Keys + values of every layer: batch x layers x kv_heads x head_dim x length x 2 x dtype bytes / sharding."""
  return slots * LAYERS * KV_HEADS * HEAD_DIM * length * 2 * bytes_per_value / shards


@pytest.mark.parametrize("quantize", [False, True])
def test_generate_holds_the_analytic_kv_cache_and_grows_with_batch(quantize):
  results = {}
  for batch in (1, 2):
    config = _config(per_device_batch_size=batch, ici_fsdp_parallelism=8, quantize_kvcache=quantize)
    results[batch] = decode_compile.compile_decode(config, programs=("generate",))
  for batch, result in results.items():
    slots = batch * 8
    assert result.engine.dims.num_slots == slots
    cache = result.cache_bytes_by_kind()
    # The slots shard over fsdp's 8 devices; int8 values carry a float32 scale per token and head.
    assert cache["kv"] == analytic_kv_bytes(slots, 64, 1 if quantize else F32, 8)
    assert cache["scales"] == (analytic_kv_bytes(slots, 64, F32 / HEAD_DIM, 8) if quantize else 0)
    mem = result.compiled["generate"].memory_analysis()
    # The compiled step's arguments are exactly the sharded params and decode state (cache, tokens, positions...).
    want = decode_compile.per_device_bytes(result.params) + decode_compile.per_device_bytes(result.state)
    assert mem.argument_size_in_bytes == want
  grown = decode_compile.per_device_bytes(results[2].state) - decode_compile.per_device_bytes(results[1].state)
  kv_growth = analytic_kv_bytes(8, 64, 1 if quantize else F32, 8) * (1 + (F32 / HEAD_DIM if quantize else 0))
  assert grown >= kv_growth
  args = [r.compiled["generate"].memory_analysis().argument_size_in_bytes for r in (results[1], results[2])]
  assert args[1] - args[0] == grown


@pytest.mark.parametrize("kernel", ["jax", "mirror"])
def test_paged_cache_is_the_configured_page_pool(kernel):
  config = _config(
      per_device_batch_size=1,
      attention="paged",
      pagedattn_num_pages=32,
      pagedattn_tokens_per_page=8,
      paged_attention_kernel=kernel,
  )
  result = decode_compile.compile_decode(config, programs=("generate",))
  # Pages [kv_heads, pages, tokens_per_page, head_dim] per layer, keys and values; the mesh has no tensor axis, so
  # every device holds the whole pool. The mirror kernel adds a contiguous copy of each slot [slots, kv_heads,
  # max_target_length, head_dim], sharded like a contiguous cache: one slot per device here.
  pool = LAYERS * KV_HEADS * 32 * 8 * HEAD_DIM * 2 * F32
  rows = analytic_kv_bytes(1, config.max_target_length, F32, 1)
  assert result.engine.dims.num_slots == jax.device_count()
  assert result.cache_bytes_by_kind()["kv"] == pool + (rows if kernel == "mirror" else 0)
  mem = result.compiled["generate"].memory_analysis()
  want = decode_compile.per_device_bytes(result.params) + decode_compile.per_device_bytes(result.state)
  assert mem.argument_size_in_bytes == want


TPU_TINY = (
    "base_emb_dim=128",
    "base_num_query_heads=4",
    "base_num_kv_heads=4",
    "head_dim=32",
    "base_mlp_dim=256",
    "base_num_decoder_layers=2",
    "vocab_size=512",
    "max_target_length=128",
    "max_prefill_predict_length=32",
    "per_device_batch_size=2",
)


@pytest.mark.parametrize("name,attention", [("v5e-8", "dot_product"), ("v4-8", "paged")])
def test_tpu_slice_compiles_prefill_insert_and_generate(name, attention, capsys):
  pytest.importorskip("libtpu")
  argv = ["", str(pyconfig.CONFIGS_DIR / "base.yml"), f"compile_topology={name}", f"attention={attention}", *TPU_TINY]
  config = pyconfig.initialize(argv)
  result = decode_compile.compile_decode(config)
  out = decode_compile.report(config, result)
  chips = topology.lookup(name).chips
  assert result.engine.dims.num_slots == 2 * chips
  assert {d.platform for d in result.engine.mesh.devices.flat} == {"tpu"}
  if attention != "paged":  # the slots shard over the chips (fsdp)
    assert out["kv_cache_bytes_per_device"]["kv"] == 2 * chips * 2 * 4 * 32 * 128 * 2 * F32 / chips
  for program in decode_compile.PROGRAMS:
    assert out[program]["hbm_gib"] == topology.lookup(name).generation.hbm_bytes / 2**30
    assert out[program]["fits"]
  printed = capsys.readouterr().out
  assert "KV cache per device" in printed and "generate: memory per device" in printed


def test_tpu_cli_exits_0_and_reports():
  pytest.importorskip("libtpu")
  cmd = [sys.executable, "-m", "MaxText.decode_compile", "MaxText/configs/base.yml", "compile_topology=v5e-8"]
  # This test process already holds libtpu (the tests above), and libtpu locks itself to one process per host.
  env = dict(os.environ, JAX_PLATFORMS="cpu", ALLOW_MULTIPLE_LIBTPU_LOAD="1")
  done = subprocess.run([*cmd, *TPU_TINY], capture_output=True, text=True, env=env, timeout=300, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "of 16.0 GiB HBM: fits" in done.stdout and "KV cache per device" in done.stdout
