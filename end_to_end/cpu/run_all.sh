#!/usr/bin/env bash
# Runs every CPU end-to-end journey; each script prints what it checked and exits non-zero on failure.
set -uo pipefail
cd "$(dirname "$0")"
status=0
for script in *.sh; do
  [ "$script" = "run_all.sh" ] && continue
  echo "=================== $script"
  SECONDS=0
  if bash "$script"; then echo "=== $script passed in ${SECONDS}s"; else echo "=== $script FAILED after ${SECONDS}s"; status=1; fi
done
exit $status
