"""Train loop behaviour: sharding invariance, accumulation, resume, checkpoints, metrics, NaN handling."""

import json
import os
import pathlib
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from MaxText import checkpointing, metrics, pyconfig, sharding, train, training
from MaxText.tests import xla_test_flags

REPO = pathlib.Path(__file__).resolve().parents[2]

# A small llama-style model on learnable synthetic data; f32 so sharded and unsharded runs agree tightly.
TINY = [
    "model_name=tests/tiny-llama",
    "dataset_type=synthetic",
    "max_target_length=32",
    "max_prefill_predict_length=16",
    "vocab_size=256",
    "log_config=false",
    "enable_tensorboard=false",
    "learning_rate=3e-3",
    "warmup_steps_fraction=0.0",
]


def make_config(tmp_path, *args, **kw):
  return pyconfig.initialize(["", "base.yml", f"base_output_directory={tmp_path}", *TINY, *args], **kw)


def losses(history):
  return np.array([h["learning/loss"] for h in history])


def run_subprocess(args, devices, tmp_path):
  env = xla_test_flags.cpu_env(devices)
  cmd = [
      sys.executable,
      "-m",
      "MaxText.train",
      "MaxText/configs/base.yml",
      f"base_output_directory={tmp_path}",
      *TINY,
      *args,
  ]
  return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False)


def read_jsonl(path):
  return [json.loads(line) for line in pathlib.Path(path).read_text(encoding="utf-8").splitlines()]


def test_sharded_runs_match_single_device(tmp_path):
  """1 device vs 8 devices with fsdp=8 and with data=2, fsdp=2, tensor=2: same losses (f32)."""
  ref_file = tmp_path / "one_device.jsonl"
  proc = run_subprocess(
      ["run_name=one", "steps=5", "per_device_batch_size=8", "enable_checkpointing=false", f"metrics_file={ref_file}"],
      1,
      tmp_path,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  reference = np.array([r["learning/loss"] for r in read_jsonl(ref_file)])
  assert len(reference) == 5
  for mesh_args in (
      ["ici_fsdp_parallelism=8"],
      ["ici_data_parallelism=2", "ici_fsdp_parallelism=2", "ici_tensor_parallelism=2"],
  ):
    config = make_config(tmp_path, "steps=5", "per_device_batch_size=1", "enable_checkpointing=false", *mesh_args)
    np.testing.assert_allclose(losses(train.train(config)), reference, rtol=1e-5)


def test_scan_and_unrolled_train_identically(tmp_path):
  common = ["steps=3", "per_device_batch_size=1", "enable_checkpointing=false"]
  scanned = losses(train.train(make_config(tmp_path, *common, "scan_layers=true")))
  unrolled = losses(train.train(make_config(tmp_path, *common, "scan_layers=false")))
  np.testing.assert_allclose(scanned, unrolled, rtol=1e-5)


def test_gradient_accumulation_equals_large_batch(tmp_path):
  common = ["steps=3", "enable_checkpointing=false"]
  big = losses(train.train(make_config(tmp_path, *common, "per_device_batch_size=4")))
  accumulated = losses(
      train.train(make_config(tmp_path, *common, "per_device_batch_size=1", "gradient_accumulation_steps=4"))
  )
  np.testing.assert_allclose(accumulated, big, rtol=1e-5)


def test_resume_equals_straight_run(tmp_path):
  common = ["per_device_batch_size=1", "learning_rate_schedule_steps=8", "checkpoint_period=4"]
  straight = losses(train.train(make_config(tmp_path, "run_name=straight", "steps=8", *common)))
  first = losses(train.train(make_config(tmp_path, "run_name=resumed", "steps=4", *common)))
  second = losses(train.train(make_config(tmp_path, "run_name=resumed", "steps=8", *common)))
  assert len(first) == 4 and len(second) == 4  # the second run starts at step 4
  np.testing.assert_allclose(np.concatenate([first, second]), straight, rtol=1e-5)
  assert sorted(os.listdir(tmp_path / "resumed" / "checkpoints")) == ["4", "8"]


def test_fixed_batch_overfits(tmp_path):
  config = make_config(tmp_path, "per_device_batch_size=1", "steps=60", "learning_rate=1e-2", "lr_schedule_type=constant")
  mesh = sharding.create_mesh(config)
  setup = training.TrainSetup(config, mesh)
  rng = np.random.default_rng(0)
  tokens = rng.integers(1, config.vocab_size, size=(8, 33))
  ones = np.ones((8, 32), np.int32)
  pos = np.broadcast_to(np.arange(32, dtype=np.int32), (8, 32))
  batch = {
      "inputs": tokens[:, :-1].astype(np.int32),
      "targets": tokens[:, 1:].astype(np.int32),
      "inputs_position": pos,
      "targets_position": pos,
      "inputs_segmentation": ones,
      "targets_segmentation": ones,
  }
  with sharding.use_mesh(mesh, config.logical_axis_rules):
    step, _, data_shardings = training.compile_train_step(setup, batch)
    batch = {k: jax.device_put(v, data_shardings[k]) for k, v in batch.items()}
    state = setup.init_state()
    losses_seen = []
    for _ in range(config.steps):
      state, m = step(state, batch)
      # Fetched every step, as the train loop does. Dispatching all 60 steps unfetched deadlocked XLA:CPU about one
      # run in ten: a device's 33rd queued step blocked a launch thread on its in-flight limit (32) while the other
      # threads sat in that device's pending all-gather.
      losses_seen.append(float(m["learning/loss"]))
  assert losses_seen[0] > 5.0
  assert losses_seen[-1] < 0.5


def test_params_are_sharded_by_the_rules(tmp_path):
  config = make_config(tmp_path, "ici_fsdp_parallelism=4", "ici_tensor_parallelism=2", "per_device_batch_size=1")
  mesh = sharding.create_mesh(config)
  setup = training.TrainSetup(config, mesh)
  state = setup.init_state()
  flat = {
      "/".join(str(getattr(k, "key", k)) for k in path): leaf
      for path, leaf in jax.tree_util.tree_flatten_with_path(state["params"])[0]
  }
  sharded = {name: leaf.sharding.spec for name, leaf in flat.items()}
  # Every matrix is split over fsdp (embed axis) and most over tensor as well.
  matrices = {n: s for n, s in sharded.items() if "kernel" in n or "embedding" in n}
  assert matrices and all("fsdp" in jax.tree.leaves(tuple(s)) for s in matrices.values()), sharded
  assert any("tensor" in jax.tree.leaves(tuple(s)) for s in matrices.values()), sharded
  for name, leaf in flat.items():
    expected = setup.param_shardings
    for part in name.split("/"):
      expected = expected[part]
    assert leaf.sharding.spec == expected.spec, name
    # Each device really holds only its shard.
    shard_size = leaf.addressable_shards[0].data.size
    assert shard_size * np.prod([mesh.shape[a] for a in jax.tree.leaves(tuple(leaf.sharding.spec))]) == leaf.size


def test_tflops_formula_matches_hand_count(tmp_path):
  config = make_config(
      tmp_path,
      "base_emb_dim=64",
      "base_mlp_dim=128",
      "base_num_query_heads=4",
      "base_num_kv_heads=2",
      "head_dim=16",
      "base_num_decoder_layers=2",
      "vocab_size=100",
      "per_device_batch_size=1",
      "max_target_length=32",
  )
  tokens = 8 * 32  # 8 devices x 1 sequence x 32 tokens
  per_layer = (
      2 * tokens * 64 * 128 * 3  # gated MLP: two input projections + output
      + 2 * tokens * 64 * (4 + 2 + 2) * 16  # q, k, v projections
      + 2 * tokens * 4 * 16 * 64  # output projection
  )
  hand_weights = 3 * (2 * per_layer + 2 * tokens * 64 * 100) / 1e12 / 8
  hand_attention = 3 * 2 * (2 * 2 * tokens * 32 * 4 * 16) / 2 / 1e12 / 8  # 2 layers x (QK^T + AV), causal half
  total, weights, attention = metrics.training_tflops_per_device(config)
  assert weights == pytest.approx(hand_weights)
  assert attention == pytest.approx(hand_attention)
  assert total == pytest.approx(hand_weights + hand_attention)


def test_corrupt_latest_checkpoint_falls_back(tmp_path, caplog):
  common = [
      "run_name=c",
      "per_device_batch_size=1",
      "checkpoint_period=2",
      "learning_rate_schedule_steps=6",
      "async_checkpointing=false",
  ]
  train.train(make_config(tmp_path, "steps=4", *common))
  ckpt = tmp_path / "c" / "checkpoints"
  assert sorted(os.listdir(ckpt)) == ["2", "4"]
  for f in (ckpt / "4" / "items").rglob("*"):
    if f.is_file():
      f.write_bytes(b"garbage")
  with caplog.at_level("WARNING"):
    history = train.train(make_config(tmp_path, "steps=6", *common))
  assert [h["step"] for h in history] == [2, 3, 4, 5]
  assert any("could not be restored" in r.message and "falling back to step 2" in r.message for r in caplog.records)


def test_nan_loss_stops_and_keeps_checkpoints(tmp_path):
  args = ["run_name=nan", "per_device_batch_size=1", "gradient_clipping_threshold=0", "checkpoint_period=1"]
  train.train(make_config(tmp_path, *args, "steps=2"))
  # Resume the run with a learning rate that overflows the parameters at once.
  proc = run_subprocess([*args, "steps=6", "learning_rate=1e30"], 8, tmp_path)
  assert proc.returncode == 3
  assert re.search(
      r"ERROR: (loss is (nan|inf) at step|parameters became non-finite in step) 2\b", proc.stderr
  ), proc.stderr[-2000:]
  assert sorted(int(s) for s in os.listdir(tmp_path / "nan" / "checkpoints") if s.isdigit()) == [1, 2]
  # What was written is still a valid, finite checkpoint.
  config = make_config(tmp_path, *args)
  setup = training.TrainSetup(config, sharding.create_mesh(config))
  manager = checkpointing.create_manager(config)
  state, step = checkpointing.restore_latest(manager, setup.abstract_state, setup.state_shardings)
  manager.close()
  assert step == 2
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state["params"]))


def test_metrics_file_tensorboard_and_eval(tmp_path):
  metrics_file = tmp_path / "m.jsonl"
  config = make_config(
      tmp_path,
      "run_name=m",
      "steps=4",
      "per_device_batch_size=1",
      "eval_interval=2",
      "eval_steps=2",
      "enable_tensorboard=true",
      f"metrics_file={metrics_file}",
      "enable_checkpointing=false",
  )
  train.train(config)
  records = read_jsonl(metrics_file)
  steps = [r for r in records if "learning/loss" in r]
  assert [r["step"] for r in steps] == [0, 1, 2, 3]
  for key in (
      "learning/loss",
      "learning/grad_norm",
      "learning/current_learning_rate",
      "perf/step_time_seconds",
      "perf/per_device_tflops_per_sec",
      "perf/per_device_tokens_per_sec",
  ):
    assert all(np.isfinite(r[key]) for r in steps), key
  evals = [r for r in records if "eval/loss" in r]
  assert [r["step"] for r in evals] == [2, 4]
  assert list((tmp_path / "m" / "tensorboard").glob("events.out.tfevents.*"))
  assert (tmp_path / "m" / "config.yml").is_file()
  assert read_jsonl(tmp_path / "m" / "metrics" / "metrics.jsonl") == records


def test_load_parameters_path_starts_fresh_from_params(tmp_path):
  common = ["per_device_batch_size=1", "learning_rate_schedule_steps=4"]
  train.train(make_config(tmp_path, "run_name=src", "steps=2", "checkpoint_period=2", *common))
  history = train.train(
      make_config(
          tmp_path,
          "run_name=dst",
          "steps=1",
          f"load_parameters_path={tmp_path}/src/checkpoints/2",
          "enable_checkpointing=false",
          *common,
      )
  )
  fresh = train.train(make_config(tmp_path, "run_name=fresh", "steps=1", "enable_checkpointing=false", *common))
  assert history[0]["step"] == 0
  assert history[0]["learning/loss"] < fresh[0]["learning/loss"]  # it started from trained weights


def test_cli_step_line_and_bad_output_dir(tmp_path):
  proc = run_subprocess(["run_name=cli", "steps=2", "per_device_batch_size=1", "enable_checkpointing=false"], 8, tmp_path)
  assert proc.returncode == 0, proc.stderr[-2000:]
  lines = [l for l in proc.stdout.splitlines() if l.startswith("completed step:")]
  assert len(lines) == 2
  fields = [f.split(":")[0].strip() for f in lines[0].split(",")]
  assert fields[:6] == ["completed step", "seconds", "TFLOP/s/device", "Tokens/s/device", "total_weights", "loss"]
  blocker = tmp_path / "file"
  blocker.write_text("not a directory")
  proc = run_subprocess([f"base_output_directory={blocker}", "run_name=x", "steps=1"], 8, tmp_path)
  assert proc.returncode == 2
  assert "CONFIG ERROR: base_output_directory" in proc.stderr and "Traceback" not in proc.stderr


def test_param_only_export_roundtrips_layouts_and_dtype(tmp_path):
  from MaxText import generate_param_only_checkpoint  # pylint: disable=import-outside-toplevel

  common = ["per_device_batch_size=1", "learning_rate_schedule_steps=4"]
  train.train(make_config(tmp_path, "run_name=exp", "steps=2", "checkpoint_period=2", *common))
  out = generate_param_only_checkpoint.export(
      make_config(
          tmp_path,
          "run_name=exp",
          "scan_layers=false",
          "weight_dtype=bfloat16",
          f"param_checkpoint_output_path={tmp_path}/p",
          *common,
      )
  )
  assert checkpointing.layers_are_unscanned(checkpointing.stored_params_tree(out))
  # The unscanned bf16 export loads into a scanned f32 model and matches the run's own params to bf16 precision.
  config = make_config(tmp_path, "run_name=exp", *common)
  setup = training.TrainSetup(config, sharding.create_mesh(config))
  exported = checkpointing.load_params(out, setup.abstract_state["params"], setup.param_shardings)
  original = checkpointing.load_params(
      f"{tmp_path}/exp/checkpoints/2", setup.abstract_state["params"], setup.param_shardings
  )
  for a, b in zip(jax.tree.leaves(exported), jax.tree.leaves(original)):
    assert a.dtype == b.dtype == np.float32
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-2, atol=1e-2)


def test_profiler_writes_an_xplane_trace(tmp_path):
  config = make_config(
      tmp_path,
      "run_name=prof",
      "steps=5",
      "per_device_batch_size=1",
      "profiler=xplane",
      "profiler_steps=2",
      "enable_checkpointing=false",
  )
  train.train(config)
  assert list((tmp_path / "prof" / "profile").rglob("*.xplane.pb"))


def test_relative_output_directory_checkpoints_and_resumes(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  args = ["", "base.yml", "base_output_directory=outputs", "run_name=rel", *TINY, "per_device_batch_size=1"]
  args.append("checkpoint_period=2")
  config = pyconfig.initialize([*args, "steps=2"])
  assert config.checkpoint_dir == str(tmp_path / "outputs" / "rel" / "checkpoints")
  train.train(config)
  assert os.listdir(tmp_path / "outputs" / "rel" / "checkpoints") == ["2"]
  history = train.train(pyconfig.initialize([*args, "steps=3"]))
  assert [h["step"] for h in history] == [2]
