#!/usr/bin/env bash
# Every GPU-only check and benchmark in one call, for a single H100/H200, in under 8 minutes; installs nothing
# (needs jax[cuda], flax, optax, orbax and this repo's other requirements already present).
#   bash benchmarks/gpu_check.sh                  # on the GPU machine, from the repo root
#   GPU_CHECK_SMOKE=1 bash benchmarks/gpu_check.sh   # same script at tiny sizes on CPU (CI: tests/test_gpu_check.py)
# Sections: cuDNN attention vs dot_product (numerics, kernel actually used, speed); ~1.2B Llama training MFU at
# seq 2048; decode tokens/s at batch 1 and 32 vs the HBM roofline; then the commands other engineers listed in
# benchmarks/gpu_check_requests.md and /work/notes/gpu_check_requests.md (fenced ```sh blocks, one command per
# line). Prints one table at the end.
set -u
cd "$(dirname "$0")/.."
SMOKE="${GPU_CHECK_SMOKE:-0}"
export GPU_CHECK_SMOKE="$SMOKE"
if [[ "$SMOKE" != "1" ]]; then
  # shellcheck source=/dev/null
  source configs/gpu/xla_flags.sh
fi
export PYTHONPATH="${PWD}${PYTHONPATH:+:$PYTHONPATH}"
# Pure-Python wheels shipped in benchmarks/wheels (e.g. qwix, which MaxText imports and GPU images may lack):
# a module that is not importable is unpacked to a temporary directory put on PYTHONPATH; nothing is installed.
WHEELS_DIR="$(mktemp -d)"
for whl in benchmarks/wheels/*.whl; do
  [[ -f "$whl" ]] || continue
  module="$(basename "$whl" | cut -d- -f1)"
  if ! python3 -c "import importlib.util as u, sys; sys.exit(u.find_spec('$module') is None)"; then
    python3 -m zipfile -e "$whl" "$WHEELS_DIR" && PYTHONPATH="${PYTHONPATH}:${WHEELS_DIR}"
  fi
done
missing=$(python3 -c 'import importlib.util as u; print(" ".join(m for m in ("jax", "flax", "optax", "orbax", "qwix", "yaml") if u.find_spec(m) is None))')
if [[ -n "$missing" ]]; then
  echo "gpu_check: missing Python modules: $missing (ship their wheels in benchmarks/wheels)"; exit 1
fi
TABLE="$(mktemp)"
LOG="${GPU_CHECK_LOG:-/tmp/gpu_check.log}"
: > "$LOG"
# Per-section limits (seconds) that add up to under 8 minutes with start-up.
declare -A LIMIT=([attention]=90 [train]=180 [decode]=150)
REQUEST_LIMIT=60
TOTAL_LIMIT=465
start=$(date +%s)

run_section() {
  local name="$1"
  local t0=$(date +%s)
  echo "== $name" | tee -a "$LOG"
  timeout "${LIMIT[$name]}" python3 benchmarks/gpu_check.py "$name" > >(tee -a "$LOG" | grep '^| ' >> "$TABLE") 2>> "$LOG"
  local rc=$?
  if [[ $rc -ne 0 ]]; then
    echo "| $name: FAILED (exit $rc, see $LOG) | | | MISS |" >> "$TABLE"
  fi
  echo "   $name took $(( $(date +%s) - t0 )) s" | tee -a "$LOG"
}

run_section attention
run_section train
run_section decode

# The repo's list, and the shared notes' list when this runs where /work/notes exists; each command runs once.
REQUEST_FILES=()
for f in benchmarks/gpu_check_requests.md /work/notes/gpu_check_requests.md; do
  [[ -f "$f" ]] && REQUEST_FILES+=("$f")
done
if (( ${#REQUEST_FILES[@]} )); then
  # Lines inside ```sh fences are commands; each gets REQUEST_LIMIT seconds and the tail of its output in the log.
  awk '/^```sh/{f=1;next} /^```/{f=0} f && NF && $1 !~ /^#/ && !seen[$0]++' "${REQUEST_FILES[@]}" | while IFS= read -r cmd; do
    echo "== request: $cmd" | tee -a "$LOG"
    if [[ "$SMOKE" == "1" ]]; then
      echo "| request: $cmd | skipped (smoke) | | |" >> "$TABLE"
      continue
    fi
    t0=$(date +%s)
    left=$(( TOTAL_LIMIT - (t0 - start) ))  # the whole script stays under 8 minutes
    if (( left < 10 )); then
      echo "| request: ${cmd:0:60} | skipped (8-minute budget spent) | | MISS |" >> "$TABLE"
      continue
    fi
    timeout "$(( left < REQUEST_LIMIT ? left : REQUEST_LIMIT ))" bash -c "$cmd" >> "$LOG" 2>&1 < /dev/null
    rc=$?
    echo "| request: ${cmd:0:60} | exit $rc in $(( $(date +%s) - t0 )) s | exit 0 | $([[ $rc -eq 0 ]] && echo ok || echo MISS) |" >> "$TABLE"
  done
fi

echo
echo "gpu_check ($( [[ "$SMOKE" == "1" ]] && echo "SMOKE, tiny sizes: numbers are not meaningful" || echo full )):" \
  "$(python3 -c 'import jax; d=jax.devices()[0]; print(d.device_kind, "x", jax.device_count(), "jax", jax.__version__)' 2>/dev/null)"
echo "| check | value | target | status |"
echo "|---|---|---|---|"
cat "$TABLE"
echo "total $(( $(date +%s) - start )) s; full log: $LOG"
rm -rf "$TABLE" "$WHEELS_DIR"
