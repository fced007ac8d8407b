#!/usr/bin/env bash
# Runs every CPU end-to-end journey, JOURNEY_JOBS (default 2) at a time, longest first: much of each journey is
# single-threaded XLA compilation and process start-up, so two at a time keep both cores of a small machine busy.
# Each journey's output is kept and printed whole when it ends; the exit status is non-zero if any journey failed.
set -uo pipefail
cd "$(dirname "$0")"
logs=$(mktemp -d)
trap 'rm -rf "$logs"' EXIT
# Longest first (measured), then any journey not listed.
order=(quickstart_train_decode.sh gcs_train_resume_decode.sh sft_chat_serve.sh int8_train_tracks_bf16.sh)
for script in *.sh; do
  [[ "$script" = run_all.sh || " ${order[*]} " = *" $script "* ]] || order+=("$script")
done
journey() {
  SECONDS=0
  if bash "$1" > "$logs/$1.log" 2>&1; then echo "=== $1 passed in ${SECONDS}s" >> "$logs/$1.log"; return 0; fi
  echo "=== $1 FAILED after ${SECONDS}s" >> "$logs/$1.log"
  return 1
}
declare -A pid_of
status=0
for script in "${order[@]}"; do
  while [ "$(jobs -rp | wc -l)" -ge "${JOURNEY_JOBS:-2}" ]; do wait -n || true; done
  echo "--- started $script"  # a journey's own output comes when it ends; this shows what was running
  journey "$script" &
  pid_of[$script]=$!
done
for script in "${order[@]}"; do
  wait "${pid_of[$script]}" || status=1
  echo "=================== $script"
  cat "$logs/$script.log"
done
exit $status
