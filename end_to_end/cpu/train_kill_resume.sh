#!/usr/bin/env bash
# Train -> kill -9 mid-run -> resume with the same run_name: the resumed losses equal an uninterrupted run's.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-$(mktemp -d)}
export JAX_PLATFORMS=cpu
COMMON=(MaxText/configs/base.yml model_name=tests/tiny-llama vocab_size=4096 max_target_length=64
  max_prefill_predict_length=16 per_device_batch_size=2 steps=40 learning_rate_schedule_steps=40
  checkpoint_period=5 base_output_directory="$OUT" log_config=false enable_tensorboard=false)

echo "== uninterrupted run"
python3 -m MaxText.train "${COMMON[@]}" run_name=straight enable_checkpointing=false metrics_file="$OUT/straight.jsonl" > "$OUT/straight.log" 2>&1

echo "== run killed with SIGKILL once a checkpoint past step 10 is committed"
python3 -m MaxText.train "${COMMON[@]}" run_name=killed > "$OUT/killed.log" 2>&1 &
pid=$!
for _ in $(seq 1 3000); do
  if ls "$OUT/killed/checkpoints" 2>/dev/null | grep -qE '^(1[0-9]|[2-9][0-9])$'; then break; fi
  kill -0 "$pid" 2>/dev/null || break
  sleep 0.05
done
kill -9 "$pid" 2>/dev/null || { echo "FAIL: the run ended before it could be killed"; exit 1; }
wait "$pid" 2>/dev/null || true
echo "committed checkpoints after the kill: $(ls "$OUT/killed/checkpoints" | grep -E '^[0-9]+$' | sort -n | tr '\n' ' ')"

echo "== resumed run"
python3 -m MaxText.train "${COMMON[@]}" run_name=killed metrics_file="$OUT/resumed.jsonl" 2>&1 | grep -E "Resuming|Restored" || true
python3 end_to_end/cpu/compare_losses.py "$OUT/straight.jsonl" "$OUT/resumed.jsonl" --min_steps 10
echo "PASS: train -> kill -9 -> resume matches the uninterrupted run ($OUT)"
