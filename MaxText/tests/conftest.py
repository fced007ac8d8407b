"""Test session setup: 8 simulated CPU devices, so sharding tests run anywhere."""

import os

from MaxText.tests import xla_test_flags

if xla_test_flags.FLAGS not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {xla_test_flags.FLAGS}".strip()

import jax  # pylint: disable=wrong-import-position,wrong-import-order

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
