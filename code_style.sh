#!/usr/bin/env bash
# Formats the Python sources with pyink (Google style, 2-space indent); --check only reports.
set -euo pipefail
cd "$(dirname "$0")"
if [ "${1:-}" = "--check" ]; then
  python3 -m pyink --check --diff MaxText benchmarks
else
  python3 -m pyink MaxText benchmarks
fi
