#!/usr/bin/env bash
# Everything on gs:// against a local GCS emulator (fake-gcs-server): data + tokenizer uploaded; a run trains from
# them and writes checkpoints, TensorBoard and config.yml to the bucket; kill -9, resume = a straight run; decode and
# api.load read checkpoint_path=gs://; HF -> MaxText conversion to gs:// decodes; a 2-process run checkpoints to gs://
# and resumes. Only STORAGE_EMULATOR_HOST is set: MaxText/storage.py derives every client's settings from it.
# Needs a private network namespace: as root it re-runs itself in one (unshare -n, loopback up); else it fails.
set -euo pipefail
SELF=$(realpath "$0")
cd "$(dirname "$0")/../.."
OUT=${OUT:-$(mktemp -d)}
# This journey checks storage, not speed: its many short runs are mostly XLA compiles, which LLVM's backend
# optimizations slow down (the unit tests compile the same way, MaxText/tests/xla_test_flags.py).
export JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
if ! python3 -c "from MaxText.tests import gcs_emulator as g; import sys; sys.exit(0 if g.isolated() else 1)"; then
  if [ "$(id -u)" = 0 ] && unshare -n true 2>/dev/null; then  # as root: re-run itself in a private namespace
    exec unshare -n bash -c 'ip link set lo up && exec bash "$0"' "$SELF"
  fi
  echo "FAIL: needs a private network namespace: as root, unshare -n bash -c 'ip link set lo up; bash $SELF'"; exit 1
fi

PORT=$(python3 -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
python3 -m MaxText.tests.gcs_emulator --port "$PORT" --buckets e2e > "$OUT/emulator.log" 2>&1 &
EMU=$!
trap 'kill "$EMU" 2>/dev/null || true' EXIT
for _ in $(seq 1 200); do grep -q ready "$OUT/emulator.log" && break; sleep 0.05; done
export STORAGE_EMULATOR_HOST=http://127.0.0.1:$PORT
URL=$STORAGE_EMULATOR_HOST/storage/v1/b/e2e/o
objects() { curl -sf "$URL?prefix=$1" | python3 -c "import json, sys; print('\n'.join(o['name'] for o in json.load(sys.stdin).get('items', [])))"; }
committed() {  # no python here: it is polled while a run trains
  curl -sf "$URL?prefix=$1" | { grep -oE "\"$1[0-9]+/commit_success.txt\"" || true; } | sed -E 's|.*/([0-9]+)/commit.*|\1|' \
    | sort -nu | tr '\n' ' '
}

echo "== upload data, tokenizer and a tiny Hugging Face Llama (random weights, built locally)"
python3 - "$OUT/hf" <<'PYEOF'
import pathlib, sys
import torch, transformers
from MaxText import storage
from MaxText.input_pipeline import quickstart_data
storage.configure()
quickstart_data.build()  # the training data, generated from installed packages' docstrings (kept if present)
torch.manual_seed(0)
config = transformers.LlamaConfig(vocab_size=4096, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                  tie_word_embeddings=False)
transformers.LlamaForCausalLM(config).save_pretrained(sys.argv[1], safe_serialization=True)
files = [("assets/data/pydoc_train.jsonl", "gs://e2e/data/pydoc_train.jsonl"),
         ("assets/tokenizer_pydoc_4k.model", "gs://e2e/tokenizers/pydoc_4k.model")]
files += [(str(f), f"gs://e2e/hf/{f.name}") for f in pathlib.Path(sys.argv[1]).iterdir()]
for local, remote in files:
  storage.as_path(remote).write_bytes(pathlib.Path(local).read_bytes())
  print(local, "->", remote)
PYEOF

COMMON=(MaxText/configs/base.yml model_name=tests/tiny-llama vocab_size=4096 max_target_length=64
  max_prefill_predict_length=16 per_device_batch_size=1 steps=40 learning_rate_schedule_steps=40 checkpoint_period=5
  grain_train_files=gs://e2e/data/pydoc_train.jsonl tokenizer_path=gs://e2e/tokenizers/pydoc_4k.model
  base_output_directory=gs://e2e/runs log_config=false log_period=5)

echo "== an uninterrupted run (gs:// data, no checkpoints), beside a run to gs://e2e/runs/killed that is killed with"
echo "   SIGKILL once a checkpoint past step 10 is committed"
python3 -m MaxText.train "${COMMON[@]}" run_name=straight enable_checkpointing=false enable_tensorboard=false \
  metrics_file="$OUT/straight.jsonl" > "$OUT/straight.log" 2>&1 &
straight=$!
python3 -m MaxText.train "${COMMON[@]}" run_name=killed > "$OUT/killed.log" 2>&1 &
pid=$!
for _ in $(seq 1 3000); do
  steps=$(committed runs/killed/checkpoints/ || true)
  if grep -qE '(^| )(1[0-9]|[2-9][0-9]) ' <<< "$steps"; then break; fi
  kill -0 "$pid" 2>/dev/null || break
  sleep 0.05
done
kill -9 "$pid" 2>/dev/null || { echo "FAIL: the run ended before it could be killed"; tail -5 "$OUT/killed.log"; exit 1; }
wait "$pid" 2>/dev/null || true
wait "$straight" || { tail -20 "$OUT/straight.log"; exit 1; }
echo "committed steps after the kill: $(committed runs/killed/checkpoints/)"
echo "step directories after the kill: $(objects runs/killed/checkpoints/ | cut -d/ -f4 | sort -nu | tr '\n' ' ')"

echo "== resumed run"
python3 -m MaxText.train "${COMMON[@]}" run_name=killed metrics_file="$OUT/resumed.jsonl" > "$OUT/resumed.log" 2>&1 \
  || { tail -20 "$OUT/resumed.log"; exit 1; }
grep -E "Resuming|falling back|unfinished" "$OUT/resumed.log" || true
python3 end_to_end/cpu/compare_losses.py "$OUT/straight.jsonl" "$OUT/resumed.jsonl" --min_steps 10
echo "committed steps at the end (max_num_checkpoints_to_keep=3): $(committed runs/killed/checkpoints/)"
RUN_OBJECTS=$(objects runs/killed/)
grep -q "^runs/killed/config.yml$" <<< "$RUN_OBJECTS" || { echo "FAIL: no config.yml in gs://e2e/runs/killed"; exit 1; }
TB=$(grep -c "^runs/killed/tensorboard/.*tfevents" <<< "$RUN_OBJECTS" || true)
[ "$TB" -gt 0 ] || { echo "FAIL: no TensorBoard events on gs://"; exit 1; }
echo "config.yml and $TB TensorBoard event files in gs://e2e/runs/killed"

echo "== decode and api.load with checkpoint_path=gs://e2e/runs/killed/checkpoints"
DECODE=(MaxText/configs/base.yml model_name=tests/tiny-llama vocab_size=4096 max_target_length=64
  max_prefill_predict_length=16 per_device_batch_size=1 tokenizer_path=gs://e2e/tokenizers/pydoc_4k.model
  checkpoint_path=gs://e2e/runs/killed/checkpoints)
echo "   and, beside it, HF -> MaxText conversion: gs://e2e/hf -> gs://e2e/converted"
python3 -m MaxText.decode "${DECODE[@]}" prompt="The for statement" > "$OUT/decode.out" 2> "$OUT/decode.log" &
decode=$!
python3 -m MaxText.utils.ckpt_conversion.to_maxtext hf_model_path=gs://e2e/hf output_directory=gs://e2e/converted \
  scan_layers=true > "$OUT/convert.log" 2>&1 || { tail -20 "$OUT/convert.log"; exit 1; }
wait "$decode" || { tail -20 "$OUT/decode.log"; exit 1; }
grep "^Input \`The for statement\` -> " "$OUT/decode.out" | head -c 300; echo
grep -q "^converted/params/commit_success.txt$" <<< "$(objects converted/)" || { echo "FAIL: no committed params"; exit 1; }
curl -sf "$URL/$(python3 -c 'import urllib.parse; print(urllib.parse.quote("converted/model.yml", safe=""))')?alt=media" \
  > "$OUT/model.yml"  # pyconfig reads config files from local disk

echo "== api.load: the trained run (checkpoint_path=gs://.../checkpoints) and the converted params decode"
python3 - "$OUT/model.yml" "${DECODE[@]:1}" <<'PYEOF'
import sys
from MaxText import api
keys = dict(a.split("=", 1) for a in sys.argv[2:])
trained = api.load("MaxText/configs/base.yml", **keys)
tok = trained.tokenizer
ids = [tok.bos_id] + tok.encode("The for statement")
print(f"api.load(run checkpoints): {tok.decode(trained.generate([ids], max_new_tokens=8)[0])!r}")
keys = {k: v for k, v in keys.items() if k not in ("model_name", "vocab_size")}
converted = api.load(sys.argv[1], **(keys | {"checkpoint_path": "gs://e2e/converted/params"}))
out = converted.generate([ids], max_new_tokens=8, stop_on_eos=False)
assert len(out[0]) == 8, out
print(f"api.load(converted): {len(out[0])} new tokens from gs://e2e/converted/params")
PYEOF

echo "== 2 processes x 4 devices: train to step 20 on gs://, then resume to 40"
MP=("${COMMON[@]}" run_name=mp enable_tensorboard=false)
python3 -m MaxText.launch_local num_processes=2 devices_per_process=4 -- train "${MP[@]}" steps=20 \
  metrics_file="$OUT/mp1.jsonl" > "$OUT/mp1.log" 2>&1 || { tail -20 "$OUT/mp1.log"; exit 1; }
echo "committed steps: $(committed runs/mp/checkpoints/)"
python3 -m MaxText.launch_local num_processes=2 devices_per_process=4 -- train "${MP[@]}" \
  metrics_file="$OUT/mp2.jsonl" > "$OUT/mp2.log" 2>&1 || { tail -20 "$OUT/mp2.log"; exit 1; }
grep -q "Resuming run mp from step 20" "$OUT/mp2.log" || { echo "FAIL: the 2-process run did not resume from 20"; exit 1; }
cat "$OUT/mp1.jsonl" "$OUT/mp2.jsonl" > "$OUT/mp.jsonl"
python3 end_to_end/cpu/compare_losses.py "$OUT/straight.jsonl" "$OUT/mp.jsonl" --min_steps 40
echo "PASS: gs:// train -> kill -9 -> resume, decode, api.load, HF conversion, 2-process resume ($OUT)"
