#!/usr/bin/env bash
# The project's test command: lint (pylint with the repo pylintrc), then the test suite.
set -euo pipefail
cd "$(dirname "$0")"
# pylintrc's jobs=0 reads the CPU count from cgroup v1 cpu.shares (1024 -> 1 process on a 2-core CI machine), so
# the job count comes from the CPUs this process may run on.
python3 -m pylint --rcfile=pylintrc --jobs="$(nproc)" MaxText benchmarks
# Two pytest-xdist workers (PYTEST_WORKERS): most test time is single-threaded XLA compilation, so both cores stay
# busy. As root (CI) the suite runs in a private network namespace with only loopback up, so the cloud-storage tests
# (a GCS emulator on 127.0.0.1) run and no client can reach the metadata server or the internet; elsewhere those
# tests skip, saying why.
pytest=(python3 -m pytest --pyargs MaxText.tests -n "${PYTEST_WORKERS:-2}" --durations=40 "$@")
if [ "$(id -u)" = 0 ] && command -v unshare >/dev/null && unshare -n true 2>/dev/null; then
  exec unshare -n bash -c 'ip link set lo up && exec "$@"' isolated "${pytest[@]}"
fi
exec "${pytest[@]}"
