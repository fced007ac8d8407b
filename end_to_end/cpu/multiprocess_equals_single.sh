#!/usr/bin/env bash
# 2 processes x 4 CPU devices (jax.distributed over loopback, gloo) train exactly like 1 process x 8 devices.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-$(mktemp -d)}
COMMON=(MaxText/configs/base.yml model_name=tests/tiny-llama vocab_size=4096 max_target_length=64
  max_prefill_predict_length=16 per_device_batch_size=1 steps=10 enable_checkpointing=false
  base_output_directory="$OUT" log_config=false enable_tensorboard=false)

echo "== 1 process x 8 devices"
JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=8 \
  python3 -m MaxText.train "${COMMON[@]}" run_name=one metrics_file="$OUT/one.jsonl" > "$OUT/one.log" 2>&1
echo "== 2 processes x 4 devices"
python3 -m MaxText.launch_local num_processes=2 devices_per_process=4 -- \
  train "${COMMON[@]}" run_name=two metrics_file="$OUT/two.jsonl" > "$OUT/two.log" 2>&1
python3 end_to_end/cpu/compare_losses.py "$OUT/one.jsonl" "$OUT/two.jsonl" --min_steps 10
echo "PASS: 2-process training equals 1-process training ($OUT)"
