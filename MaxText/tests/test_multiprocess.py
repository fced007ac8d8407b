"""Scale and reliability: multi-process runs over loopback, preemption, kill -9, and fault messages."""

import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from MaxText import pyconfig, train
from MaxText.config_schema import ConfigError
from MaxText.tests import xla_test_flags
from MaxText.tests.test_train import REPO, TINY, losses, make_config, read_jsonl

# Real text through the grain pipeline (the quickstart corpus and tokenizer).
GRAIN = ["dataset_type=grain", "vocab_size=4096", "max_target_length=64", "max_prefill_predict_length=16"]


def _env(devices: int) -> dict:
  return xla_test_flags.cpu_env(devices)


def _train_cmd(tmp_path, *args):
  return [
      sys.executable,
      "-u",
      "-m",
      "MaxText.train",
      "MaxText/configs/base.yml",
      f"base_output_directory={tmp_path}",
      *TINY,
      *args,
  ]


def _train_two_processes(tmp_path, *args):
  """MaxText.train as 2 local processes x 4 CPU devices (launch_local); fails the test if it fails."""
  cmd = [sys.executable, "-m", "MaxText.launch_local", "num_processes=2", "devices_per_process=4", "--"]
  cmd += _train_cmd(tmp_path, *args)[3:]  # drop "python -u -m"
  proc = subprocess.run(cmd, cwd=REPO, env=_env(4), capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def test_two_processes_match_one_process_on_grain_data(tmp_path):
  common = [*GRAIN, "steps=10", "per_device_batch_size=1", "enable_checkpointing=false"]
  reference = losses(train.train(make_config(tmp_path, "run_name=one", *common)))
  metrics_file = tmp_path / "two.jsonl"
  proc = _train_two_processes(tmp_path, "run_name=two", *common, f"metrics_file={metrics_file}")
  two = np.array([r["learning/loss"] for r in read_jsonl(metrics_file)])
  assert len(two) == 10  # only process 0 writes metrics
  np.testing.assert_allclose(two, reference, rtol=1e-5, atol=1e-5)
  assert "[p1] completed step" not in proc.stdout and "[p0] completed step: 9," in proc.stdout


def test_kill_9_then_resume_equals_straight_run(tmp_path):
  common = ["per_device_batch_size=1", "steps=30", "checkpoint_period=1", "learning_rate_schedule_steps=30"]
  straight = losses(train.train(make_config(tmp_path, "run_name=straight", *common, "enable_checkpointing=false")))
  ckpt = tmp_path / "killed" / "checkpoints"
  proc = subprocess.Popen(  # pylint: disable=consider-using-with
      _train_cmd(tmp_path, "run_name=killed", *common),
      cwd=REPO,
      env=_env(8),
      stdout=subprocess.DEVNULL,
      stderr=subprocess.DEVNULL,
  )
  # Kill while a save is in flight if one is seen (a temporary directory), else soon after the first commit.
  deadline = time.monotonic() + 300
  while time.monotonic() < deadline and proc.poll() is None:
    names = os.listdir(ckpt) if ckpt.exists() else []
    if any("tmp" in n for n in names) and any(n.isdigit() and int(n) >= 3 for n in names):
      break
    time.sleep(0.005)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  committed = sorted(int(n) for n in os.listdir(ckpt) if n.isdigit())
  assert committed and committed[-1] < 30, "the run finished before it could be killed"
  resumed = losses(train.train(make_config(tmp_path, "run_name=killed", *common)))
  start = 30 - len(resumed)
  assert start == committed[-1]
  np.testing.assert_allclose(resumed, straight[start:], rtol=1e-5)


def test_sigterm_saves_and_exits_zero_then_resumes(tmp_path):
  args = ["run_name=term", "per_device_batch_size=1", "steps=100000", "checkpoint_period=100000"]
  proc = subprocess.Popen(  # pylint: disable=consider-using-with
      _train_cmd(tmp_path, *args), cwd=REPO, env=_env(8), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
  )
  for line in proc.stdout:
    if line.startswith("completed step: 5,"):
      break
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-2000:]
  assert "Stopped by SIGTERM after step" in err and "Run again with run_name=term to resume" in err
  saved = [int(n) for n in os.listdir(tmp_path / "term" / "checkpoints") if n.isdigit()]
  assert len(saved) == 1 and saved[0] > 5
  history = train.train(make_config(tmp_path, *args[:-2], f"steps={saved[0] + 2}"))
  assert [h["step"] for h in history] == [saved[0], saved[0] + 1]


def test_process_that_never_joins_times_out_clearly():
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
  cmd = [
      sys.executable,
      "-m",
      "MaxText.pyconfig",
      "MaxText/configs/base.yml",
      f"coordinator_address=127.0.0.1:{port}",
      "num_processes=2",
      "process_id=0",
      "jax_distributed_initialization_timeout=3",
  ]
  proc = subprocess.run(cmd, cwd=REPO, env=_env(1), capture_output=True, text=True, timeout=120, check=False)
  assert proc.returncode == 1
  assert f"ERROR: jax.distributed: not all 2 processes joined 127.0.0.1:{port} within 3 s" in proc.stderr
  assert "Check failure stack trace" not in proc.stderr


def test_full_output_directory_is_reported_before_training(tmp_path, monkeypatch):
  config = make_config(tmp_path, "run_name=full", "per_device_batch_size=1")
  os.makedirs(config.run_dir)
  monkeypatch.setattr(train.shutil, "disk_usage", lambda _: type("U", (), {"free": 1024})())
  with pytest.raises(ConfigError, match="base_output_directory: .* GiB free, but one checkpoint"):
    train.train(config)
  assert not pathlib.Path(config.checkpoint_dir).exists()


def test_launch_local_rejects_bad_options():
  proc = subprocess.run(
      [sys.executable, "-m", "MaxText.launch_local", "num_procs=2", "--", "train", "base.yml"],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=60,
      check=False,
  )
  assert proc.returncode == 2 and "unknown launcher option 'num_procs=2'" in proc.stderr


def test_config_keys_start_multiprocess_only_when_asked():
  # One process (the default) never calls jax.distributed; pyconfig still reports the single process.
  config = pyconfig.initialize(["", "base.yml", *TINY])
  assert config.process_count == 1 and config.process_index == 0


def test_two_process_checkpoint_resumes_on_one_process(tmp_path):
  """Elastic restart: a run checkpointed by 2 processes continues on 1 with the same data and losses."""
  common = [*GRAIN, "per_device_batch_size=1", "learning_rate_schedule_steps=8", "checkpoint_period=4"]
  straight = losses(train.train(make_config(tmp_path, "run_name=straight", "steps=8", *common)))
  _train_two_processes(tmp_path, "run_name=elastic", "steps=4", *common)
  resumed = losses(train.train(make_config(tmp_path, "run_name=elastic", "steps=8", *common)))
  assert len(resumed) == 4
  np.testing.assert_allclose(resumed, straight[4:], rtol=1e-5)
