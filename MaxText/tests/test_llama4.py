"""Llama 4 (text) beyond the parity of test_families.py: chunked attention, its KV-cache decode and packing, its
checkpoint spellings and published configs.

The tiny model (the `llama4` variant of models/llama4.py: MoE and dense layers, RoPE layers with 8-token attention
chunks and L2 QK norm, NoPE layers with temperature tuning, Llama 3.1 RoPE scaling) is the shared converted
checkpoint of model_test_utils; its sequences are 28 tokens, several chunks long.
"""

import json

import numpy as np
import pytest
import yaml
from flax import nnx

from MaxText import pyconfig
from MaxText.tests import forward_pass_logit_checker as checker
from MaxText.tests import model_test_utils as mtu
from MaxText.utils.ckpt_conversion import to_huggingface, to_maxtext, weight_mapping

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

SEQ = mtu.REFERENCE_SEQ  # three and a half 8-token chunks


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  return mtu.converted(tmp_path_factory, mtu.variant("llama4"))


def test_autoselected_attention_matches_transformers(converted):
  """Unscanned (static layer kinds): autoselected attention runs JAX's fused kernel on NoPE layers and falls back
  to the masked reference on chunked ones (test_families.py checks the dot_product path)."""
  model = checker.load_model(converted.config(False, attention="autoselected"))
  result = checker.compare(checker.maxtext_logits(model, converted.tokens), converted.hf_logits)
  assert result.kl.max() <= 1e-5 and result.max_abs_diff <= 1e-3, checker.report(result, 5)
  assert result.top1_agreement == 1.0


def test_cached_decode_equals_full_forward(converted):
  """Prefill 5 tokens, then one token at a time across chunk boundaries: each step's logits equal the full forward's
  (so also transformers'). The scanned stack, so layer kinds come from traced indices; the engine's unrolled decode
  of tests/tiny-llama4 is covered in test_decode.py."""
  model = checker.load_model(converted.config(True, remat_policy="none"))  # no backward pass here
  tokens = converted.tokens
  full = checker.maxtext_logits(model, tokens)
  model.init_cache(2, SEQ)
  step = nnx.jit(lambda m, t, p, mode: m(t, p, model_mode=mode), static_argnums=3)
  prompt = 5
  out = step(model, tokens[:, :prompt], np.broadcast_to(np.arange(prompt, dtype=np.int32), (2, prompt)), "prefill")
  np.testing.assert_allclose(out, full[:, :prompt], atol=1e-4, rtol=0)
  for i in range(prompt, SEQ):
    out = step(model, tokens[:, i : i + 1], np.full((2, 1), i, np.int32), "autoregressive")
    np.testing.assert_allclose(out[:, 0], full[:, i], atol=1e-4, rtol=0, err_msg=f"token {i}")
  np.testing.assert_allclose(full, converted.hf_logits, atol=1e-3, rtol=0)


def test_per_expert_checkpoint_converts_like_fused(converted, tmp_path):
  """Experts stored one nn.Linear each (experts.<j>.{gate,up,down}_proj.weight) give the same params."""
  tensors = mtu.read_safetensors(converted.hf_dir)
  for name in [n for n in tensors if n.endswith("experts.gate_up_proj")]:
    prefix = name[: -len("gate_up_proj")]
    gate_up = tensors.pop(name)  # [E, embed, 2 * mlp], gate first
    mlp = gate_up.shape[-1] // 2
    gate, up = gate_up[..., :mlp], gate_up[..., mlp:]
    down = tensors.pop(prefix + "down_proj")  # [E, mlp, embed]
    for j in range(gate.shape[0]):
      tensors[f"{prefix}{j}.gate_proj.weight"] = np.ascontiguousarray(gate[j].T)
      tensors[f"{prefix}{j}.up_proj.weight"] = np.ascontiguousarray(up[j].T)
      tensors[f"{prefix}{j}.down_proj.weight"] = np.ascontiguousarray(down[j].T)
  config_json = json.loads((converted.hf_dir / "config.json").read_text())
  mtu.write_checkpoint(tmp_path / "per_expert", config_json, tensors)
  mtu.assert_converts_like(converted, tmp_path / "per_expert", tmp_path / "mt")


def test_multimodal_checkpoint_converts_its_text_model(converted, tmp_path):
  """Llama4ForConditionalGeneration (the published checkpoints): text_config and language_model tensors; vision
  tensors skipped."""
  mtu.write_multimodal_checkpoint(
      converted,
      tmp_path / "mm",
      "Llama4ForConditionalGeneration",
      lambda name: f"language_model.{name}",
      ["vision_model.patch_embedding.linear.weight", "multi_modal_projector.linear_1.weight"],
  )
  mtu.assert_converts_like(converted, tmp_path / "mm", tmp_path / "mt")


def test_packed_documents_chunk_from_their_own_start(converted):
  """With packing, a document's chunks start at its first token: its logits equal those of the document alone
  (row 0: documents of 11 and 17 tokens; row 1: the second document alone, then padding)."""
  first, second = 11, SEQ - 11
  doc = converted.tokens[0, first:]
  tokens = np.stack([converted.tokens[0], np.concatenate([doc, np.zeros(first, np.int32)])])
  segments = np.array([[1] * first + [2] * second, [1] * second + [0] * first], np.int32)
  positions = np.array([list(range(first)) + list(range(second)), list(range(SEQ))], np.int32)
  logits = np.asarray(mtu.forward(checker.load_model(converted.config(True)), tokens, positions, segments))
  np.testing.assert_allclose(logits[0, first:], logits[1, :second], atol=1e-4, rtol=0)


# Text configs of the published checkpoints as transformers 4.51 wrote them (Scout: the text_config of
# meta-llama/Llama-4-Scout-17B-16E; Maverick: keys it leaves to Llama4TextConfig's defaults left out).
HUB_CONFIGS = {
    "llama4-17b-16e": {
        "architectures": ["Llama4ForConditionalGeneration"],
        "model_type": "llama4",
        "text_config": {
            "attention_bias": False,
            "attention_chunk_size": 8192,
            "attn_scale": 0.1,
            "attn_temperature_tuning": 4,
            "floor_scale": 8192,
            "head_dim": 128,
            "hidden_act": "silu",
            "hidden_size": 5120,
            "interleave_moe_layer_step": 1,
            "intermediate_size": 8192,
            "intermediate_size_mlp": 16384,
            "max_position_embeddings": 10485760,
            "model_type": "llama4_text",
            "moe_layers": list(range(48)),
            "no_rope_layers": [0 if (i + 1) % 4 == 0 else 1 for i in range(48)],
            "num_attention_heads": 40,
            "num_experts_per_tok": 1,
            "num_hidden_layers": 48,
            "num_key_value_heads": 8,
            "num_local_experts": 16,
            "rms_norm_eps": 1e-05,
            "rope_scaling": {
                "factor": 8.0,
                "high_freq_factor": 4.0,
                "low_freq_factor": 1.0,
                "original_max_position_embeddings": 8192,
                "rope_type": "llama3",
            },
            "rope_theta": 500000.0,
            "use_qk_norm": True,
            "vocab_size": 202048,
        },
    },
    "llama4-17b-128e": {
        "architectures": ["Llama4ForConditionalGeneration"],
        "model_type": "llama4",
        "text_config": {
            "attention_bias": False,
            "attention_chunk_size": 8192,
            "head_dim": 128,
            "hidden_act": "silu",
            "hidden_size": 5120,
            "interleave_moe_layer_step": 2,
            "intermediate_size": 8192,
            "intermediate_size_mlp": 16384,
            "max_position_embeddings": 1048576,
            "model_type": "llama4_text",
            "num_attention_heads": 40,
            "num_experts_per_tok": 1,
            "num_hidden_layers": 48,
            "num_key_value_heads": 8,
            "num_local_experts": 128,
            "rms_norm_eps": 1e-05,
            "rope_scaling": None,
            "rope_theta": 500000.0,
            "use_qk_norm": False,
            "vocab_size": 202048,
        },
    },
}


@pytest.mark.parametrize("name", sorted(HUB_CONFIGS))
def test_published_configs_are_the_model_ymls(name):
  _, keys = to_maxtext.model_keys(HUB_CONFIGS[name])
  config = mtu.make_config(model_name=name)
  for key, value in keys.items():
    assert config.get(key) == value, key
  with open(pyconfig.CONFIGS_DIR / "models" / f"{name}.yml", encoding="utf-8") as f:
    assert yaml.safe_load(f)["decoder_block"] == "llama4"


def test_inexpressible_configs_are_refused():
  """Settings transformers' Llama 4 has no field for are refused by to_huggingface, naming the key."""
  config = mtu.config_of(model_name="tests/tiny-llama4", routed_scaling_factor=2.0)
  with pytest.raises(weight_mapping.UnsupportedCheckpointError, match="routed_scaling_factor"):
    to_huggingface.hf_config_json(config)
  bad = {**mtu.variant("llama4").hf_config(), "num_experts_per_tok": 2}
  with pytest.raises(weight_mapping.UnsupportedCheckpointError, match="num_experts_per_tok"):
    to_maxtext.model_keys(bad)
