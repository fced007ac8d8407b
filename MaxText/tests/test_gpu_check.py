"""The GPU run's one script stays runnable: a session that borrows a GPU has minutes of device time, so the script and
everything it starts must not first fail on an import, a renamed module or a flag this jax no longer knows.

benchmarks/gpu_check.sh has a smoke mode (GPU_CHECK_SMOKE=1: every section at tiny sizes on the CPU), and XLA parses
the GPU flags of configs/gpu/xla_flags.sh on any backend, aborting the process on one it does not know."""

import os
import pathlib
import re
import shlex
import subprocess
import sys

import pytest

from MaxText.tests import xla_test_flags

REPO = pathlib.Path(__file__).resolve().parents[2]
CHECK_JAX = "import jax; jax.devices()"


def _with_gpu_flags(extra_flags: str = "") -> subprocess.CompletedProcess:
  """A CPU jax start-up with XLA_FLAGS from configs/gpu/xla_flags.sh (plus `extra_flags`)."""
  script = f'source configs/gpu/xla_flags.sh && export XLA_FLAGS="$XLA_FLAGS {extra_flags}" && '
  script += f"{shlex.quote(sys.executable)} -c {shlex.quote(CHECK_JAX)}"
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"
  return subprocess.run(
      ["bash", "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False
  )


def test_gpu_xla_flags_are_known_to_this_jax():
  known = _with_gpu_flags()
  assert known.returncode == 0, known.stderr[-2000:]
  # The same start-up fails on a flag XLA does not know: what a renamed or removed flag would do on the GPU.
  unknown = _with_gpu_flags("--xla_gpu_flag_that_does_not_exist=true")
  assert unknown.returncode != 0
  assert "xla_gpu_flag_that_does_not_exist" in unknown.stderr


def _table_rows(out: str) -> list[list[str]]:
  # Four columns; a check's name may itself hold a "|" (|out - ref|), its value, target and status do not.
  rows = [line.strip()[1:-1].rsplit("|", 3) for line in out.splitlines() if line.startswith("| ")]
  return [[cell.strip() for cell in row] for row in rows]


def test_gpu_check_smoke_runs_every_section(tmp_path):
  env = xla_test_flags.cpu_env(1, GPU_CHECK_SMOKE="1", GPU_CHECK_LOG=str(tmp_path / "gpu_check.log"))
  proc = subprocess.run(
      ["bash", "benchmarks/gpu_check.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=900, check=False
  )
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  rows = _table_rows(proc.stdout)
  names = [row[0] for row in rows]
  # A section that crashed or timed out is one row, "| NAME: FAILED (exit N, see LOG) | | | MISS |".
  assert not [row for row in rows if row[3] == "MISS" or "FAILED" in row[0]], proc.stdout[-3000:]
  for section in ("attention", "train", "decode"):
    assert any(name.startswith(section) for name in names), f"no {section} rows in:\n{proc.stdout}"
  # The checks that have a target pass at tiny sizes too (numerics of cuDNN's fallback against the reference).
  assert all(row[3] == "ok" for row in rows if row[0].startswith("attention:") and row[2]), proc.stdout
  # Throughputs are numbers, so the table the GPU run records is complete.
  for row in rows:
    if "tokens/s" in row[0]:
      assert float(row[1]) > 0, row


def _requested_commands() -> list[str]:
  text = (REPO / "benchmarks" / "gpu_check_requests.md").read_text(encoding="utf-8")
  blocks = re.findall(r"^```sh\n(.*?)^```", text, flags=re.S | re.M)
  return [line for block in blocks for line in block.splitlines() if line.strip() and not line.startswith("#")]


@pytest.mark.parametrize("command", _requested_commands())
def test_requested_gpu_commands_import_and_parse(command):
  """Each command the GPU run executes after its checks starts: its script imports and its arguments parse."""
  args = shlex.split(command)
  assert args[0] == "python3" and args[1].endswith(".py"), command
  env = xla_test_flags.cpu_env(1, PYTHONPATH=str(REPO))
  # --help after the arguments: argparse converts the ones before it (a bad value fails) and exits 0.
  proc = subprocess.run(
      [sys.executable, *args[1:], "--help"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "usage:" in proc.stdout
