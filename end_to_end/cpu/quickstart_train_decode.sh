#!/usr/bin/env bash
# The README quickstart: train the default model on the embedded English corpus, decode from its checkpoint, then
# serve it and ask for one completion over HTTP on 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-$(mktemp -d)}
export JAX_PLATFORMS=cpu

echo "== python3 -m MaxText.train MaxText/configs/base.yml run_name=quickstart"
SECONDS=0
python3 -m MaxText.train MaxText/configs/base.yml run_name=quickstart base_output_directory="$OUT" \
  metrics_file="$OUT/metrics.jsonl" > "$OUT/train.log" 2>&1 || { tail -20 "$OUT/train.log"; exit 1; }
echo "trained in ${SECONDS}s"

echo "== python3 -m MaxText.decode MaxText/configs/base.yml run_name=quickstart prompt=..."
python3 -m MaxText.decode MaxText/configs/base.yml run_name=quickstart base_output_directory="$OUT" \
  prompt="The for statement" > "$OUT/decode.out" 2> "$OUT/decode.log" || { tail -20 "$OUT/decode.log"; exit 1; }
head -c 400 "$OUT/decode.out"; echo

python3 - "$OUT/metrics.jsonl" "$OUT/decode.out" <<'PYEOF'
import json, re, sys
losses = [r["learning/loss"] for r in map(json.loads, open(sys.argv[1])) if "learning/loss" in r]
first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
text = open(sys.argv[2]).read()
output = text.split("->", 1)[1] if "->" in text else ""
words = re.findall(r"\b[a-z]{3,}\b", output.lower())
print(f"loss: first 10 steps {first:.2f} -> last 10 steps {last:.2f}; decoded {len(words)} words of 3+ letters, {len(set(words))} distinct")
ok = last < first - 3.0 and len(words) >= 20 and len(set(words)) >= 5
print("OK" if ok else "FAIL: expected a falling loss (by > 3 nats) and English words in the decoded text")
sys.exit(0 if ok else 1)
PYEOF
echo "== python3 -m MaxText.serve MaxText/configs/base.yml run_name=quickstart per_device_batch_size=8 port=..."
PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
python3 -m MaxText.serve MaxText/configs/base.yml run_name=quickstart base_output_directory="$OUT" \
  per_device_batch_size=8 port="$PORT" > "$OUT/serve.log" 2>&1 &
server=$!
trap 'kill "$server" 2>/dev/null || true' EXIT
python3 end_to_end/cpu/wait_for_server.py "$PORT" "$server"
python3 - "$PORT" <<'PYEOF'
import json, sys, urllib.request
base = f"http://127.0.0.1:{sys.argv[1]}"
body = json.dumps({"prompt": "The for", "max_tokens": 16}).encode()
req = urllib.request.Request(f"{base}/v1/completions", body, {"Content-Type": "application/json"})
reply = json.load(urllib.request.urlopen(req, timeout=300))
text, usage = reply["choices"][0]["text"], reply["usage"]
print(f"completion: {text!r}; usage {usage}")
ok = 1 <= usage["completion_tokens"] <= 16 and reply["choices"][0]["finish_reason"] in ("length", "stop")
print("OK" if ok else "FAIL: expected 1 to 16 completion tokens and a finish reason")
sys.exit(0 if ok else 1)
PYEOF
echo "PASS: quickstart train -> decode -> serve ($OUT)"
