#!/usr/bin/env bash
# Installs MaxText's pinned requirements into the current Python. Idempotent: a second run only checks.
#   bash setup.sh            runtime requirements (DEVICE=cpu|gpu|tpu picks the jax build; default cpu)
#   bash setup.sh test       also the test/lint extras (pytest, pylint, pyink, torch CPU, transformers)
set -euo pipefail
cd "$(dirname "$0")"
DEVICE=${DEVICE:-cpu}
PY=${PYTHON:-python3}
pip_install() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }

# Fast path: everything pinned is already installed at the right version.
satisfied() {
  "$PY" - "$@" <<'PYEOF'
import sys
from importlib import metadata
ok = True
for path in sys.argv[1:]:
  for line in open(path):
    line = line.split("#")[0].strip()
    if not line or line.startswith("-"):
      continue
    name, _, version = line.partition("==")
    name = name.split("[")[0]  # extras: lm_eval[api] is the lm_eval distribution
    try:
      ok &= metadata.version(name) == version
    except metadata.PackageNotFoundError:
      ok = False
sys.exit(0 if ok else 1)
PYEOF
}

files=(requirements.txt)
[ "${1:-}" = "test" ] && files+=(requirements-test.txt)

if satisfied "${files[@]}" && { [ "${1:-}" != "test" ] || "$PY" -c "import torch" 2>/dev/null; }; then
  echo "setup.sh: requirements already satisfied"
else
  pip_install -r requirements.txt
  case "$DEVICE" in
    cpu) ;;
    gpu) pip_install "jax[cuda12]==$(grep '^jax==' requirements.txt | cut -d= -f3)" ;;
    tpu) pip_install "jax[tpu]==$(grep '^jax==' requirements.txt | cut -d= -f3)" ;;
    *) echo "setup.sh: DEVICE must be cpu, gpu or tpu (got $DEVICE)" >&2; exit 2 ;;
  esac
  if [ "${1:-}" = "test" ]; then
    # The CPU build of torch first, so transformers does not pull a multi-GB CUDA build.
    "$PY" -c "import torch" 2>/dev/null || pip_install "torch==2.13.0"
    pip_install -r requirements-test.txt
  fi
fi
# Make `import MaxText` work from anywhere (editable install, no dependency resolution).
"$PY" -c "import MaxText" 2>/dev/null || pip_install --no-deps --no-build-isolation -e .
echo "setup.sh: done"
