"""Test session setup: 8 simulated CPU devices, so sharding tests run anywhere."""

import os

# XLA:CPU aborts the process when a collective's devices do not all reach it within its timeout. On the 2-core CI
# machine two pytest workers plus the multi-process tests' children run 8+ device threads per process, so a device
# thread can be starved long enough to trip it (a CI train step died once with a silent SIGABRT, the abort this
# watchdog raises); allow 15 minutes.
_TIMEOUTS = "--xla_cpu_collective_call_terminate_timeout_seconds=900 --xla_cpu_collective_timeout_seconds=900"
if "collective_call_terminate_timeout" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_TIMEOUTS}".strip()

import jax  # pylint: disable=wrong-import-position

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_platforms", "cpu")


import pytest  # pylint: disable=wrong-import-position,wrong-import-order


@pytest.fixture
def gcs():
  """A GCS emulator with bucket "bucket" and STORAGE_EMULATOR_HOST set (MaxText/tests/gcs_emulator.py).

  Skips outside a private network namespace (`unshare -n`), where a client could reach the real internet.
  """
  from MaxText.tests import gcs_emulator  # pylint: disable=import-outside-toplevel

  with gcs_emulator.running(("bucket",)) as emu:
    yield emu
