"""Every script in benchmarks/ still imports: no test runs them, so a renamed module or function in MaxText would
otherwise surface only when someone times something (or, for gpu_check.py's sections, on a borrowed GPU)."""

import pathlib
import subprocess
import sys

from MaxText.tests import xla_test_flags

REPO = pathlib.Path(__file__).resolve().parents[2]
SCRIPTS = sorted((REPO / "benchmarks").glob("*.py"))

# Imports each script by path under its own name (so its `__main__` block does not run), the way
# `PYTHONPATH=. python3 benchmarks/NAME.py` finds its imports (the repo root, and the script's folder first).
IMPORT_ALL = """
import importlib.util, sys, traceback
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/benchmarks"]
failed = []
for path in sys.argv[2:]:
  name = "benchmark_script_" + path.rsplit("/", 1)[1][:-3]
  try:
    spec = importlib.util.spec_from_file_location(name, path)
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
  except BaseException:  # SystemExit too: a script must not exit on import
    failed.append(path)
    traceback.print_exc()
print("FAILED:", failed)
sys.exit(1 if failed else 0)
"""


def test_every_benchmark_script_imports():
  assert len(SCRIPTS) >= 10, SCRIPTS
  proc = subprocess.run(
      [sys.executable, "-c", IMPORT_ALL, str(REPO), *map(str, SCRIPTS)],
      cwd=REPO,
      env=xla_test_flags.cpu_env(1),
      capture_output=True,
      text=True,
      timeout=600,
      check=False,
  )
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
  assert "FAILED: []" in proc.stdout
