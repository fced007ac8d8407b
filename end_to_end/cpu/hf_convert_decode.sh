#!/usr/bin/env bash
# A tiny Hugging Face Llama (random weights, built locally) -> to_maxtext -> decode -> logit check against transformers.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-$(mktemp -d)}
export JAX_PLATFORMS=cpu

echo "== build a tiny LlamaForCausalLM with transformers"
python3 - "$OUT/hf" <<'PYEOF'
import sys
import torch
import transformers
torch.manual_seed(0)
config = transformers.LlamaConfig(vocab_size=4096, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                  rms_norm_eps=1e-5, tie_word_embeddings=False)
model = transformers.LlamaForCausalLM(config)
with torch.no_grad():  # non-trivial norms, so a mapping that drops them cannot pass
  for name, p in model.named_parameters():
    if "norm" in name:
      p.uniform_(0.5, 1.5)
model.save_pretrained(sys.argv[1], safe_serialization=True)
print(f"saved {sum(p.numel() for p in model.parameters()):,} parameters to {sys.argv[1]}")
PYEOF

echo "== to_maxtext"
python3 -m MaxText.utils.ckpt_conversion.to_maxtext hf_model_path="$OUT/hf" output_directory="$OUT/mt" scan_layers=true \
  > "$OUT/convert.log" 2>&1 || { tail -20 "$OUT/convert.log"; exit 1; }
ls "$OUT/mt"

echo "== decode the converted checkpoint"
python3 -m MaxText.decode "$OUT/mt/model.yml" load_parameters_path="$OUT/mt/params" \
  tokenizer_path=assets/tokenizer_pydoc_4k.model max_target_length=64 max_prefill_predict_length=16 \
  prompt="The for statement" > "$OUT/decode.out" 2> "$OUT/decode.log" || { tail -20 "$OUT/decode.log"; exit 1; }
grep -q "^Input \`The for statement\` -> " "$OUT/decode.out" && echo "decode produced output for the prompt"

echo "== logits against transformers"
python3 -m MaxText.tests.forward_pass_logit_checker "$OUT/mt/model.yml" load_parameters_path="$OUT/mt/params" \
  dtype=float32 max_target_length=64 max_prefill_predict_length=16 --hf_model_path="$OUT/hf"
echo "PASS: HF tiny model -> convert -> decode -> logit check ($OUT)"
