"""Test session setup: 8 simulated CPU devices, so sharding tests run anywhere."""

import os

from MaxText.tests import xla_test_flags

if xla_test_flags.FLAGS not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {xla_test_flags.FLAGS}".strip()

import jax  # pylint: disable=wrong-import-position,wrong-import-order

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_platforms", "cpu")


import gc  # pylint: disable=wrong-import-position,wrong-import-order

import pytest  # pylint: disable=wrong-import-position,wrong-import-order


@pytest.fixture(autouse=True, scope="module")
def _release_executables():
  """Frees each test module's compiled executables when it ends. XLA:CPU maps every kernel of an executable on its
  own (about 900 memory maps for a 300-op function; test_serving's executables held 10529 maps at its end, 837
  after this), so a test worker that keeps every module's executables nears vm.max_map_count (65530 by default):
  the likely cause of workers that died inside a compile late in the suite (SIGSEGV, SIGABRT in test_serving)."""
  yield
  jax.clear_caches()
  gc.collect()


@pytest.fixture
def gcs():
  """A GCS emulator with bucket "bucket" and STORAGE_EMULATOR_HOST set (MaxText/tests/gcs_emulator.py).

  Skips outside a private network namespace (`unshare -n`), where a client could reach the real internet.
  """
  from MaxText.tests import gcs_emulator  # pylint: disable=import-outside-toplevel

  with gcs_emulator.running(("bucket",)) as emu:
    yield emu
