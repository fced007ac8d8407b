#!/usr/bin/env bash
# Supervised fine-tuning: a tiny Hugging Face Llama (random weights, built locally) -> to_maxtext -> SFT on a generated
# chat set (loss on assistant turns only, default chat template with the SentencePiece tokenizer) until it answers in
# the set's format -> MaxText.serve answers /v1/chat/completions in that format and stops by itself.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-$(mktemp -d)}
export JAX_PLATFORMS=cpu

echo "== build a tiny LlamaForCausalLM with transformers and a chat set"
python3 - "$OUT" <<'PYEOF'
import json, random, sys
import torch
import transformers
out = sys.argv[1]
torch.manual_seed(0)
config = transformers.LlamaConfig(vocab_size=4096, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                  rms_norm_eps=1e-5, tie_word_embeddings=False)
transformers.LlamaForCausalLM(config).save_pretrained(f"{out}/hf", safe_serialization=True)
# Every answer is "Answer: <the word the user asked about>."; a system prompt now and then.
words = "list dict tuple string number file module class method function object value".split()
rng = random.Random(0)
with open(f"{out}/chat.jsonl", "w") as f:
  for _ in range(512):
    word = rng.choice(words)
    messages = [{"role": "system", "content": "Reply briefly."}] if rng.random() < 0.3 else []
    messages += [{"role": "user", "content": f"Which word is this: {word}?"},
                 {"role": "assistant", "content": f"Answer: {word}."}]
    f.write(json.dumps({"messages": messages}) + "\n")
PYEOF

echo "== to_maxtext"
python3 -m MaxText.utils.ckpt_conversion.to_maxtext hf_model_path="$OUT/hf" output_directory="$OUT/mt" \
  > "$OUT/convert.log" 2>&1 || { tail -20 "$OUT/convert.log"; exit 1; }

echo "== python3 -m MaxText.train OUT/mt/model.yml load_parameters_path=OUT/mt/params use_sft=true ..."
ARGS=(tokenizer_path=assets/tokenizer_pydoc_4k.model run_name=sft base_output_directory="$OUT/runs")
python3 -m MaxText.train "$OUT/mt/model.yml" "${ARGS[@]}" load_parameters_path="$OUT/mt/params" use_sft=true \
  grain_train_files="$OUT/chat.jsonl" grain_eval_files="" train_data_columns='[messages]' max_target_length=64 \
  per_device_batch_size=8 steps=200 learning_rate=3e-3 warmup_steps_fraction=0.05 checkpoint_period=200 \
  metrics_file="$OUT/metrics.jsonl" > "$OUT/train.log" 2>&1 || { tail -20 "$OUT/train.log"; exit 1; }
python3 - "$OUT/metrics.jsonl" <<'PYEOF'
import json, sys
records = [r for r in map(json.loads, open(sys.argv[1])) if "learning/loss" in r]
first, last = records[0], records[-1]
print(f"loss {first['learning/loss']:.2f} -> {last['learning/loss']:.3f} over {len(records)} steps;"
      f" {int(first['learning/total_weights'])} target tokens per step (assistant turns only)")
sys.exit(0 if last["learning/loss"] < 0.2 else "FAIL: the SFT loss did not fall below 0.2")
PYEOF

echo "== python3 -m MaxText.serve OUT/mt/model.yml run_name=sft ... ; POST /v1/chat/completions"
PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
python3 -m MaxText.serve "$OUT/mt/model.yml" "${ARGS[@]}" max_target_length=64 max_prefill_predict_length=32 \
  per_device_batch_size=4 port="$PORT" > "$OUT/serve.log" 2>&1 &
server=$!
trap 'kill "$server" 2>/dev/null || true' EXIT
python3 end_to_end/cpu/wait_for_server.py "$PORT" "$server"
python3 - "$PORT" <<'PYEOF'
import json, sys, urllib.request
base = f"http://127.0.0.1:{sys.argv[1]}"
good = 0
for word in ("tuple", "module", "method"):
  body = {"messages": [{"role": "user", "content": f"Which word is this: {word}?"}], "max_tokens": 16,
          "temperature": 0}
  req = urllib.request.Request(f"{base}/v1/chat/completions", json.dumps(body).encode(),
                               {"Content-Type": "application/json"})
  choice = json.load(urllib.request.urlopen(req, timeout=300))["choices"][0]
  text = choice["message"]["content"]
  print(f"{word}: {text!r} ({choice['finish_reason']})")
  good += text.strip() == f"Answer: {word}." and choice["finish_reason"] == "stop"
print("OK" if good == 3 else "FAIL: expected every reply to be 'Answer: <word>.' ending with the eos token")
sys.exit(0 if good == 3 else 1)
PYEOF
echo "PASS: HF tiny model -> convert -> SFT -> serve chat ($OUT)"
