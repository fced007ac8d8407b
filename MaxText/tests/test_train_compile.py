"""Ahead-of-time compile: reports without allocating, its numbers describe the real sharded step, and TPU slices
compile on this CPU host with the real TPU compiler (libtpu; the TPU tests need it installed, as CI does)."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from MaxText import aot_report, metrics, pyconfig, topology, train, train_compile, training
from MaxText.config.declare import ConfigError
from MaxText.tests.test_train import REPO, losses, make_config

needs_libtpu = pytest.mark.skipif(not topology.libtpu_installed(), reason="libtpu (TPU compiler) not installed")
# A 4-layer model big enough that sharding shows in the numbers, small enough to compile for TPU in seconds.
SMALL = [
    "base_emb_dim=256",
    "base_num_query_heads=4",
    "base_num_kv_heads=4",
    "base_mlp_dim=1024",
    "base_num_decoder_layers=4",
    "max_target_length=256",
    "vocab_size=1024",
]


def test_aot_compile_reports_sharded_memory_and_flops(tmp_path, capsys):
  config = make_config(tmp_path, "per_device_batch_size=1", "ici_fsdp_parallelism=8")
  compiled, setup = train_compile.compile_train_step(config)
  out = train_compile.report(config, compiled, setup)
  # With fsdp=8 each device holds about an eighth of the train state (plus the batch and small replicated leaves).
  assert setup.state_bytes / 8 <= out["argument_gib"] * 2**30 < setup.state_bytes / 2
  assert out["tflops_per_device_per_step"] == pytest.approx(metrics.training_tflops_per_device(config)[0])
  assert "memory per device" in capsys.readouterr().out


def test_serialized_step_trains_like_a_fresh_compile(tmp_path):
  """compiled_trainstep_file: train_compile writes the step, train loads it and gets the losses of a normal run."""
  common = ["steps=3", "per_device_batch_size=1", "enable_checkpointing=false"]
  path = str(tmp_path / "step.pkl")
  compiled, _ = train_compile.compile_train_step(make_config(tmp_path, *common))
  training.save_compiled_step(compiled, path)
  reference = losses(train.train(make_config(tmp_path, *common, "run_name=fresh")))
  loaded = losses(train.train(make_config(tmp_path, *common, "run_name=loaded", f"compiled_trainstep_file={path}")))
  np.testing.assert_array_equal(loaded, reference)
  # A step compiled for another model is refused by name, not run on the wrong arrays.
  other, _ = train_compile.compile_train_step(make_config(tmp_path, *common, "base_num_decoder_layers=3"))
  training.save_compiled_step(other, path)
  with pytest.raises(ConfigError, match="compiled_trainstep_file: .* another model"):
    train.train(make_config(tmp_path, *common, "run_name=wrong", f"compiled_trainstep_file={path}"))


def test_unknown_topology_lists_valid_names(tmp_path):
  with pytest.raises(ConfigError, match=r"compile_topology: unknown TPU slice 'v5e-3'.*v5e-\{1,4,8,16,32,64,128,256\}"):
    make_config(tmp_path, "compile_topology=v5e-3")


def test_compile_topology_without_libtpu_says_how_to_install(tmp_path, monkeypatch):
  monkeypatch.setattr(topology, "libtpu_installed", lambda: False)
  with pytest.raises(ConfigError, match=r"compile_topology: .*libtpu.*DEVICE=tpu bash setup.sh"):
    make_config(tmp_path, "compile_topology=v5e-8")


def test_slice_names_match_the_chips_they_sell():
  """v4/v5p names count TensorCores (2 per chip), v5e/v6e chips; shapes multiply out to the chip count."""
  for name, chips, shape in (
      ("v4-8", 4, (2, 2, 1)),
      ("v5p-1024", 512, (8, 8, 8)),
      ("v5p-17920", 8960, (16, 20, 28)),
      ("v5e-256", 256, (16, 16)),
      ("v6e-64", 64, (8, 8)),
  ):
    s = topology.lookup(name)
    assert (s.chips, s.shape) == (chips, shape), name
  assert topology.lookup("v5litepod-16") == topology.lookup("v5e-16")


def test_collectives_are_counted_per_loop_trip():
  """Hand-written HLO: an all-gather in a 6-trip loop body and an all-reduce in the entry."""
  hlo = """HloModule m

%body (p: (s32[], f32[64])) -> (s32[], f32[64]) {
  %ag = f32[64]{0} all-gather(f32[16]{0} %x), replica_groups={{0,1,2,3}}, dimensions={0}
}

%cond (p: (s32[], f32[64])) -> pred[] {
  %c = s32[] constant(6)
  %i = s32[] get-tuple-element(%p), index=0
  ROOT %lt = pred[] compare(%i, %c), direction=LT
}

ENTRY %main (a: f32[1024]) -> f32[1024] {
  %w = (s32[], f32[64]) while(%t), condition=%cond, body=%body
  ROOT %ar = f32[1024]{0} all-reduce(%a), replica_groups=[2,4]<=[8], to_apply=%add
}
"""
  out = aot_report.collective_bytes(hlo, 8)
  assert out["all-gather"] == {"bytes": 6 * 64 * 4 * 3 / 4, "ops": 6}
  assert out["all-reduce"] == {"bytes": 2 * 1024 * 4 * 3 / 4, "ops": 1}


def _tpu_config(tmp_path, *args):
  return make_config(tmp_path, *SMALL, "compile_topology=v5e-8", *args)


@needs_libtpu
def test_tpu_all_gather_bytes_match_the_program():
  """Independent reference: replicating an array sharded 8 ways, 5 times in a scan, all-gathers 5 x 7/8 of it."""
  devices = topology.devices("v5e-8")
  mesh = jax.sharding.Mesh(np.array(devices), ("x",))
  replicated = NamedSharding(mesh, P())

  def f(xs):
    def body(carry, x):
      return carry + jnp.sum(jax.lax.with_sharding_constraint(x, replicated) ** 2), None

    return jax.lax.scan(body, 0.0, xs)[0]

  arg = jax.ShapeDtypeStruct((5, 8192), jnp.float32, sharding=NamedSharding(mesh, P(None, "x")))
  compiled = jax.jit(f).lower(arg).compile()
  gathered = aot_report.collective_bytes(compiled.as_text(), 8)["all-gather"]["bytes"]
  assert gathered == pytest.approx(5 * 8192 * 4 * 7 / 8)


@needs_libtpu
def test_tpu_compile_memory_follows_batch_remat_and_sharding(tmp_path):
  """On v5e-8: fsdp=8 shards the state 8 ways (replicated weights would not); temporaries grow with the batch
  and shrink with remat_policy=full; the report names the chip's 16 GiB HBM."""
  runs = {}
  for name, args in {
      "b1": ["per_device_batch_size=1", "remat_policy=full", "max_target_length=512"],
      "b4": ["per_device_batch_size=4", "remat_policy=full", "max_target_length=512"],
      "b4_minimal": ["per_device_batch_size=4", "remat_policy=minimal", "max_target_length=512"],
      "dp": ["per_device_batch_size=1", "remat_policy=full", "ici_fsdp_parallelism=1", "ici_data_parallelism=8"],
  }.items():
    config = _tpu_config(tmp_path, *args)
    compiled, setup = train_compile.compile_train_step(config)
    runs[name] = (train_compile.report(config, compiled, setup), setup)
  b1, setup = runs["b1"]
  assert b1["hbm_gib"] == 16.0 and b1["fits"]
  assert setup.state_bytes / 8 <= b1["argument_gib"] * 2**30 < setup.state_bytes / 4
  assert runs["dp"][0]["argument_gib"] * 2**30 >= setup.state_bytes  # data parallel: every device holds it all
  assert runs["b4"][0]["temp_gib"] > b1["temp_gib"]
  assert runs["b4_minimal"][0]["temp_gib"] > runs["b4"][0]["temp_gib"]
  # FSDP gathers the weights; data parallelism all-reduces the gradients instead.
  assert b1["collectives"]["all-gather"]["bytes"] > 0
  assert runs["dp"][0]["collectives"]["all-reduce"]["bytes"] > b1["collectives"]["all-reduce"]["bytes"]


@needs_libtpu
def test_tpu_cli_multislice_and_v4(tmp_path):
  """The CLI on 2 slices of v5e-8 over DCN (and v4-8's megacore chips) prints the mesh, fit and collectives."""
  env = dict(os.environ, JAX_PLATFORMS="")
  for args, expect in (
      (["compile_topology=v5e-8", "compile_topology_num_slices=2", "dcn_data_parallelism=2"], "dcn data=2"),
      (["compile_topology=v4-8", f"compiled_trainstep_file={tmp_path}/v4.pkl"], "v4-8 (v4:2x2x1, 4 chips)"),
  ):
    proc = subprocess.run(
        [sys.executable, "-m", "MaxText.train_compile", "MaxText/configs/base.yml", f"base_output_directory={tmp_path}"]
        + SMALL
        + ["per_device_batch_size=1", "log_config=false", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert expect in proc.stdout and "HBM: fits" in proc.stdout, proc.stdout
    assert "v5e-8" not in args[0] or "2 x v5e-8 (v5e:2x4, 16 chips)" in proc.stdout
    assert "collectives per device per step: all-gather" in proc.stdout
  # compiled_trainstep_file also serializes a step the TPU compiler built for the slice (loaded on the target).
  assert f"compiled train step written to {tmp_path}/v4.pkl" in proc.stdout
  assert (tmp_path / "v4.pkl").stat().st_size > 0


@needs_libtpu
def test_compile_topology_is_refused_by_train(tmp_path):
  with pytest.raises(ConfigError, match="compile_topology: train runs on this host's devices"):
    pyconfig.initialize(["", "base.yml", f"base_output_directory={tmp_path}", "compile_topology=v5e-8"], program="train")


@needs_libtpu
def test_cpu_fast_path_does_not_depend_on_libtpu(tmp_path):
  """With libtpu installed on a host without TPUs, hardware=auto runs on the CPU with host-memory reuse."""
  code = (
      "import sys; from MaxText import distributed, startup;"
      f" c = startup.start(['', 'MaxText/configs/base.yml', 'base_output_directory={tmp_path}', 'log_config=false'],"
      " 'train'); print(c.hardware, distributed.reuse_host_memory_applied())"
  )
  env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
  proc = subprocess.run(
      [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.split()[-2:] == ["cpu", "True"]
