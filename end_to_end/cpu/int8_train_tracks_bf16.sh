#!/usr/bin/env bash
# int8 training (quantization=int8: int8 weights and activations in the attention/MLP matmuls, straight-through
# gradients) tracks bf16 training: same model, data and seed on the quickstart corpus; final losses within 3%
# after 200 steps.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-$(mktemp -d)}
export JAX_PLATFORMS=cpu
COMMON=(MaxText/configs/base.yml model_name=tests/tiny-llama vocab_size=4096 max_target_length=64
  per_device_batch_size=4 steps=200 dtype=bfloat16 enable_checkpointing=false base_output_directory="$OUT"
  log_config=false enable_tensorboard=false)

for quant in none int8; do
  echo "== 200 steps, dtype=bfloat16, quantization=$quant"
  q=$([ "$quant" = none ] && echo "" || echo "$quant")
  SECONDS=0
  python3 -m MaxText.train "${COMMON[@]}" run_name="$quant" quantization="$q" metrics_file="$OUT/$quant.jsonl" \
    > "$OUT/$quant.log" 2>&1 || { tail -20 "$OUT/$quant.log"; exit 1; }
  echo "   ${SECONDS}s; last line: $(grep 'completed step' "$OUT/$quant.log" | tail -1)"
done

python3 - "$OUT/none.jsonl" "$OUT/int8.jsonl" <<'PYEOF'
import json, sys
def losses(path):
  with open(path, encoding="utf-8") as f:
    return {r["step"]: r["learning/loss"] for r in map(json.loads, f) if "learning/loss" in r}
ref, got = losses(sys.argv[1]), losses(sys.argv[2])
last = max(ref)
if last != max(got) or last < 199:
  sys.exit(f"FAIL: runs ended at steps {last} and {max(got)}, expected 199")
rel = abs(got[last] - ref[last]) / ref[last]
curve = max(abs(got[s] - ref[s]) / ref[s] for s in ref if s in got)
print(f"final loss bf16 {ref[last]:.4f}, int8 {got[last]:.4f}: relative difference {rel:.2%} (limit 3%);"
      f" largest per-step difference over the curve {curve:.2%}")
sys.exit(0 if rel <= 0.03 else 1)
PYEOF
echo "PASS: int8 training tracks bf16 ($OUT)"
