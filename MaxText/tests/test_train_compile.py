"""Ahead-of-time compile: reports without allocating, and its numbers describe the real sharded step."""

import pytest

from MaxText import metrics, train_compile
from MaxText.tests.test_train import make_config


def test_aot_compile_reports_sharded_memory_and_flops(tmp_path, capsys):
  config = make_config(tmp_path, "per_device_batch_size=1", "ici_fsdp_parallelism=8")
  compiled, setup = train_compile.compile_train_step(config)
  out = train_compile.report(config, compiled, setup)
  # With fsdp=8 each device holds about an eighth of the train state (plus the batch and small replicated leaves).
  assert setup.state_bytes / 8 <= out["argument_gib"] * 2**30 < setup.state_bytes / 2
  assert out["tflops_per_device_per_step"] == pytest.approx(metrics.training_tflops_per_device(config)[0])
  assert "memory per device" in capsys.readouterr().out
