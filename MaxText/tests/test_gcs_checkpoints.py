"""Checkpoints on gs:// (a local fake-gcs-server): save, GC, resume, unfinished steps, checkpoint_path, errors.

Runs only inside a private network namespace (the `gcs` fixture skips elsewhere):
    unshare -n bash -c 'ip link set lo up; python3 -m pytest -q -n 0 MaxText/tests/test_gcs_checkpoints.py'
"""

import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from MaxText import api, checkpointing, pyconfig, storage, train
from MaxText.config_schema import ConfigError
from MaxText.inference import loading
from MaxText.tests import test_train, xla_test_flags

REPO = pathlib.Path(__file__).resolve().parents[2]

TINY = [*test_train.TINY, "per_device_batch_size=1", "learning_rate_schedule_steps=5"]


def config_for(base, *args):
  return pyconfig.initialize(["", "base.yml", f"base_output_directory={base}", *TINY, *args])


def losses(history):
  return np.array([h["learning/loss"] for h in history])


def steps_in(gcs, prefix):
  return sorted(
      {int(n[len(prefix) :].split("/")[0]) for n in gcs.list("bucket", prefix) if n[len(prefix) :][:1].isdigit()}
  )


def test_train_resume_unfinished_step_and_gc_on_gcs(gcs, tmp_path, caplog):
  """Train 2 steps to gs://, drop step 2's commit marker (a save killed mid-write), resume to 4.

  The unfinished step is neither 'newest' nor loaded: the run resumes from step 1 with the losses of a straight
  local run, re-saves step 2, and garbage collection keeps the newest 2 committed steps. Then a damaged step 4 is
  skipped with a warning: the run resumes from step 3.
  """
  straight = losses(train.train(config_for(tmp_path, "run_name=straight", "steps=5", "enable_checkpointing=false")))
  common = ["run_name=r", "checkpoint_period=1", "max_num_checkpoints_to_keep=2", "async_checkpointing=true"]
  first = losses(train.train(config_for("gs://bucket/runs", *common, "steps=2")))
  np.testing.assert_allclose(first, straight[:2], rtol=1e-6)
  assert steps_in(gcs, "runs/r/checkpoints/") == [1, 2]
  assert "runs/r/config.yml" in gcs.list("bucket", "runs/r/")
  marker = f"runs/r/checkpoints/2/{checkpointing.COMMIT_MARKER}"
  assert marker in gcs.list("bucket", "runs/r/checkpoints/2/")
  storage.as_path(f"gs://bucket/{marker}").unlink()
  assert checkpointing.committed_steps("gs://bucket/runs/r/checkpoints") == [1]
  assert loading.latest_checkpoint("gs://bucket/runs/r/checkpoints") == "gs://bucket/runs/r/checkpoints/1"
  resumed = losses(train.train(config_for("gs://bucket/runs", *common, "steps=4")))
  np.testing.assert_allclose(resumed, straight[1:4], rtol=1e-6)  # from step 1, not the unfinished 2
  assert steps_in(gcs, "runs/r/checkpoints/") == [3, 4]
  assert checkpointing.committed_steps("gs://bucket/runs/r/checkpoints") == [4, 3]
  for name in gcs.list("bucket", "runs/r/checkpoints/4/items/"):  # a damaged newest step: skipped with a warning
    storage.as_path(f"gs://bucket/{name}").write_bytes(b"garbage")
  with caplog.at_level("WARNING"):
    last = losses(train.train(config_for("gs://bucket/runs", *common, "steps=5")))
  assert any("could not be restored" in r.message and "falling back to step 3" in r.message for r in caplog.records)
  np.testing.assert_allclose(last, straight[3:], rtol=1e-6)


def test_kill_9_during_an_async_save_to_gcs_resumes_like_a_straight_run(gcs, tmp_path):
  """A run saving every step to gs:// is killed with SIGKILL while a step directory has objects but no commit
  marker (an async save in flight); the resumed run starts from the newest committed step, with the losses of a
  straight run, and saves the unfinished step again."""
  common = ["run_name=k", "steps=30", "checkpoint_period=1", "async_checkpointing=true"]
  common += ["learning_rate_schedule_steps=30"]
  straight = losses(train.train(config_for(tmp_path, "run_name=straight", *common[1:], "enable_checkpointing=false")))
  cmd = [sys.executable, "-u", "-m", "MaxText.train", "MaxText/configs/base.yml", "base_output_directory=gs://bucket/r"]
  env = gcs.env(xla_test_flags.cpu_env(8))
  proc = subprocess.Popen(  # pylint: disable=consider-using-with
      [*cmd, *TINY, *common], cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
  )
  prefix = "r/k/checkpoints/"

  def unfinished():
    names = gcs.list("bucket", prefix)
    started = {n[len(prefix) :].split("/")[0] for n in names}
    done = {n[len(prefix) :].split("/")[0] for n in names if n.endswith(f"/{checkpointing.COMMIT_MARKER}")}
    return sorted(int(s) for s in started - done if s.isdigit())

  deadline, seen = time.monotonic() + 600, []
  while time.monotonic() < deadline and proc.poll() is None:
    seen = unfinished()
    if seen and seen[-1] >= 3:
      break
    time.sleep(0.01)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  committed, seen = sorted(checkpointing.committed_steps(f"gs://bucket/{prefix}")), unfinished()
  assert committed and committed[-1] < 30, "the run finished before it could be killed"
  assert seen and seen[-1] > committed[-1], f"not killed during a save: unfinished {seen}, committed {committed}"
  resumed = losses(train.train(config_for("gs://bucket/r", *common)))
  start = 30 - len(resumed)
  assert start == committed[-1]
  np.testing.assert_allclose(resumed, straight[start:], rtol=1e-5)
  assert checkpointing.committed_steps(f"gs://bucket/{prefix}")[0] == 30


@pytest.mark.usefixtures("gcs")
def test_checkpoint_path_reads_gcs_like_local(tmp_path):
  """api.load(checkpoint_path=gs://.../checkpoints) gives the logits of the same checkpoint read locally."""
  train.train(config_for(tmp_path, "run_name=c", "steps=2", "checkpoint_period=2", "async_checkpointing=false"))
  local_dir = tmp_path / "c" / "checkpoints"
  for f in local_dir.rglob("*"):  # upload the run's checkpoints/ as it is (writing gs:// is tested above)
    if f.is_file():
      storage.as_path(f"gs://bucket/runs/c/checkpoints/{f.relative_to(local_dir)}").write_bytes(f.read_bytes())
  storage.as_path(f"gs://bucket/runs/c/checkpoints/2/{checkpointing.COMMIT_MARKER}").write_text("")
  keys = dict(model_name="tests/tiny-llama", vocab_size=256, max_target_length=32, max_prefill_predict_length=16)
  keys |= dict(per_device_batch_size=1, log_config=False)
  ids = np.arange(1, 17, dtype=np.int32)[None]
  local = api.load("base.yml", checkpoint_path=f"{tmp_path}/c/checkpoints/2", **keys).logits(ids)
  remote = api.load("base.yml", checkpoint_path="gs://bucket/runs/c/checkpoints", **keys)
  np.testing.assert_allclose(remote.logits(ids), local, rtol=1e-6, atol=1e-6)
  # train: checkpoint_path names a full train state, so a new run continues from its step 2 (optimizer included)
  hist = train.train(
      config_for(tmp_path, "run_name=from_gcs", "steps=3", "checkpoint_path=gs://bucket/runs/c/checkpoints")
  )
  assert [h["step"] for h in hist] == [2]
  # load_full_state_path names one step directory on gs:// (no newest-step lookup): the same continuation.
  hist = train.train(
      config_for(tmp_path, "run_name=full_gcs", "steps=3", "load_full_state_path=gs://bucket/runs/c/checkpoints/2")
  )
  assert [h["step"] for h in hist] == [2]
  with pytest.raises(ConfigError, match=r"checkpoint_path: bucket gs://nobucket does not exist"):
    api.load("base.yml", checkpoint_path="gs://nobucket/runs/c/checkpoints", **keys)
  with pytest.raises(ConfigError, match=r"checkpoint_path: .*gs://bucket/runs/none.* does not exist"):
    api.load("base.yml", checkpoint_path="gs://bucket/runs/none", **keys)
  with pytest.raises(ConfigError, match=r"checkpoint_path: set either checkpoint_path or load_parameters_path"):
    api.load("base.yml", checkpoint_path="gs://bucket/x", load_parameters_path="gs://bucket/y", **keys)


def test_missing_bucket_is_a_config_error_and_writes_nothing(gcs):
  """train with base_output_directory in a missing bucket: CONFIG ERROR naming key and path, exit 2."""
  cmd = [sys.executable, "-m", "MaxText.train", "MaxText/configs/base.yml", "base_output_directory=gs://nobucket/runs"]
  cmd += ["run_name=m", "steps=1", *TINY]
  env = gcs.env(xla_test_flags.cpu_env(1))
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "CONFIG ERROR: base_output_directory: cannot write to gs://nobucket/runs/m: bucket gs://nobucket" in proc.stderr
  assert gcs.list("bucket") == [] and "compil" not in proc.stderr.lower()
  assert os.environ["STORAGE_EMULATOR_HOST"] == gcs.host
