"""Hugging Face conversion beyond the per-family parity of test_families.py: sharded checkpoints, Gemma 3's multimodal
checkpoint, published config.json files against their ymls, published model sizes, and the converters' and the
logit checker's command lines (errors included).
"""

import json

import numpy as np
import pytest

from MaxText.layers import model_creation
from MaxText.tests import forward_pass_logit_checker as checker
from MaxText.tests import model_test_utils as mtu
from MaxText.tests.model_test_utils import make_config
from MaxText.utils.ckpt_conversion import to_huggingface, to_maxtext, weight_mapping

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  return lambda name: mtu.converted(tmp_path_factory, mtu.variant(name))


def test_sharded_checkpoints_in_and_out(converted, tmp_path):
  """Shards with an index json convert like one file; to_huggingface shards big outputs the same way."""
  c = converted("llama")
  c.hf.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
  assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
  mtu.assert_converts_like(c, tmp_path / "sharded", tmp_path / "mt")
  to_huggingface.convert(c.config(True), str(tmp_path / "back"), max_shard_bytes=50_000)
  index = json.loads((tmp_path / "back" / "model.safetensors.index.json").read_text())
  assert len(set(index["weight_map"].values())) > 1
  original, back = mtu.read_safetensors(c.hf_dir), mtu.read_safetensors(tmp_path / "back")
  assert all(np.array_equal(original[k], back[k]) for k in original) and back.keys() == original.keys()
  transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back")


def test_gemma3_multimodal_checkpoint_converts_its_text_model(converted, tmp_path):
  """Gemma3ForConditionalGeneration (the 4B-27B checkpoints): text_config and language-model tensors; vision skipped."""
  c = converted("gemma3")
  mtu.write_multimodal_checkpoint(
      c,
      tmp_path / "mm",
      "Gemma3ForConditionalGeneration",
      lambda name: f"model.language_model.{name[len('model.'):]}",
      ["model.vision_tower.patch_embedding.weight"],
  )
  mtu.assert_converts_like(c, tmp_path / "mm", tmp_path / "mt")


# config.json of published checkpoints as transformers 4.x wrote them (rope_theta / rope_scaling, Gemma 3's
# rope_local_base_freq and sliding_window_pattern, keys left to the config class defaults), and the yml they are.
HUB_CONFIGS = {
    "llama3.1-8b": {
        "architectures": ["LlamaForCausalLM"],
        "hidden_act": "silu",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "max_position_embeddings": 131072,
        "num_attention_heads": 32,
        "num_hidden_layers": 32,
        "num_key_value_heads": 8,
        "rms_norm_eps": 1e-05,
        "rope_scaling": {
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
        "rope_theta": 500000.0,
        "tie_word_embeddings": False,
        "vocab_size": 128256,
    },
    "mistral-7b": {
        "architectures": ["MistralForCausalLM"],
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_attention_heads": 32,
        "num_hidden_layers": 32,
        "num_key_value_heads": 8,
        "rms_norm_eps": 1e-05,
        "rope_theta": 10000.0,
        "sliding_window": 4096,
        "vocab_size": 32000,
    },
    "gemma-2b": {
        "architectures": ["GemmaForCausalLM"],
        "head_dim": 256,
        "hidden_act": "gelu",
        "hidden_size": 2048,
        "intermediate_size": 16384,
        "num_attention_heads": 8,
        "num_hidden_layers": 18,
        "num_key_value_heads": 1,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": 10000.0,
        "vocab_size": 256000,
    },
    "gemma2-27b": {
        "architectures": ["Gemma2ForCausalLM"],
        "attn_logit_softcapping": 50.0,
        "final_logit_softcapping": 30.0,
        "head_dim": 128,
        "hidden_activation": "gelu_pytorch_tanh",
        "hidden_size": 4608,
        "intermediate_size": 36864,
        "num_attention_heads": 32,
        "num_hidden_layers": 46,
        "num_key_value_heads": 16,
        "query_pre_attn_scalar": 144,
        "rms_norm_eps": 1e-06,
        "rope_theta": 10000.0,
        "sliding_window": 4096,
        "vocab_size": 256000,
    },
    "gemma3-1b": {
        "architectures": ["Gemma3ForCausalLM"],
        "attn_logit_softcapping": None,
        "final_logit_softcapping": None,
        "head_dim": 256,
        "hidden_size": 1152,
        "intermediate_size": 6912,
        "num_attention_heads": 4,
        "num_hidden_layers": 26,
        "num_key_value_heads": 1,
        "query_pre_attn_scalar": 256,
        "rope_local_base_freq": 10000,
        "rope_scaling": None,
        "rope_theta": 1000000,
        "sliding_window": 512,
        "sliding_window_pattern": 6,
        "vocab_size": 262144,
    },
    "gemma3-4b": {
        "architectures": ["Gemma3ForConditionalGeneration"],
        "text_config": {
            "hidden_size": 2560,
            "intermediate_size": 10240,
            "model_type": "gemma3_text",
            "num_hidden_layers": 34,
            "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
            "sliding_window": 1024,
        },
    },
    "mixtral-8x7b": {
        "architectures": ["MixtralForCausalLM"],
        "hidden_act": "silu",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "max_position_embeddings": 32768,
        "num_attention_heads": 32,
        "num_experts_per_tok": 2,
        "num_hidden_layers": 32,
        "num_key_value_heads": 8,
        "num_local_experts": 8,
        "rms_norm_eps": 1e-05,
        "rope_theta": 1000000.0,
        "router_aux_loss_coef": 0.02,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "vocab_size": 32000,
    },
    "qwen3-30b-a3b": {
        "architectures": ["Qwen3MoeForCausalLM"],
        "attention_bias": False,
        "decoder_sparse_step": 1,
        "head_dim": 128,
        "hidden_act": "silu",
        "hidden_size": 2048,
        "intermediate_size": 6144,
        "max_position_embeddings": 40960,
        "mlp_only_layers": [],
        "moe_intermediate_size": 768,
        "norm_topk_prob": True,
        "num_attention_heads": 32,
        "num_experts": 128,
        "num_experts_per_tok": 8,
        "num_hidden_layers": 48,
        "num_key_value_heads": 4,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": 1000000.0,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "use_sliding_window": False,
        "vocab_size": 151936,
    },
    "qwen3-8b": {
        "architectures": ["Qwen3ForCausalLM"],
        "attention_bias": False,
        "head_dim": 128,
        "hidden_act": "silu",
        "hidden_size": 4096,
        "intermediate_size": 12288,
        "num_attention_heads": 32,
        "num_hidden_layers": 36,
        "num_key_value_heads": 8,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": 1000000,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "use_sliding_window": False,
        "vocab_size": 151936,
    },
}


@pytest.mark.parametrize("model_name", sorted(HUB_CONFIGS))
def test_published_config_json_gives_the_published_yml(model_name):
  """Both config.json spellings (4.x as published, and 5.x's rope_parameters) name the model our yml does."""
  expected = make_config(model_name=model_name)
  legacy = HUB_CONFIGS[model_name]
  spellings = [legacy]
  if "rope_theta" in legacy and "rope_local_base_freq" not in legacy:
    rope = {"rope_theta": legacy["rope_theta"], "rope_type": "default", **(legacy.get("rope_scaling") or {})}
    spellings.append(
        {k: v for k, v in legacy.items() if k not in ("rope_theta", "rope_scaling")} | {"rope_parameters": rope}
    )
  for hf in spellings:
    _, keys = to_maxtext.model_keys(hf)
    for key, value in keys.items():
      assert value == expected.get(key), (key, value, expected.get(key))


def test_gpt2_config_json():
  hf = {
      "architectures": ["GPT2LMHeadModel"],
      "n_embd": 768,
      "n_head": 12,
      "n_layer": 12,
      "n_positions": 1024,
      "vocab_size": 50257,
  }
  _, keys = to_maxtext.model_keys(hf)
  assert keys["decoder_block"] == "gpt3" and keys["normalization_type"] == "layernorm" and keys["use_bias"]
  assert (keys["base_emb_dim"], keys["head_dim"], keys["base_mlp_dim"], keys["trainable_position_size"]) == (
      768,
      64,
      3072,
      1024,
  )
  assert keys["mlp_activations"] == ["gelu_tanh"] and keys["rope_type"] == "none" and keys["logits_via_embedding"]


@pytest.mark.parametrize(
    "model_name,published",
    [
        ("gemma-2b", 2_506_172_416),
        ("gemma-7b", 8_537_680_896),
        ("gemma2-2b", 2_614_341_888),
        ("gemma2-9b", 9_241_705_984),
        ("gemma2-27b", 27_227_128_320),
        ("gemma3-1b", 999_885_952),
        ("qwen3-0.6b", 596_049_920),
        ("qwen3-4b", 4_022_468_096),
        ("qwen3-8b", 8_190_735_360),
        ("qwen3-14b", 14_768_307_200),
        ("qwen3-32b", 32_762_123_264),
        ("mixtral-8x7b", 46_702_792_704),
    ],
)
def test_published_model_sizes(model_name, published):
  """Parameter counts of the published ymls equal the released checkpoints' (tied heads counted once)."""
  config = make_config(model_name=model_name)
  assert model_creation.param_count(model_creation.abstract_model(config)) == published


def test_unsupported_architecture_lists_the_supported_ones(tmp_path, capsys):
  (tmp_path / "config.json").write_text(json.dumps({"architectures": ["BertForMaskedLM"]}))
  with pytest.raises(SystemExit) as e:
    to_maxtext.main(["to_maxtext", f"hf_model_path={tmp_path}", f"output_directory={tmp_path / 'out'}"])
  assert e.value.code == 1
  err = capsys.readouterr().err
  assert "BertForMaskedLM" in err and all(a in err for a in ("GPT2LMHeadModel", "Gemma3ForCausalLM", "Qwen3ForCausalLM"))


@pytest.mark.parametrize(
    "tool,args,hint",
    [
        (to_maxtext, ["hf_model_path=x", "output_directroy=y"], "did you mean 'output_directory'"),
        (to_maxtext, ["hf_model_path=x", "output_directory=y", "stepz=3"], "did you mean 'steps'"),
        (to_huggingface, ["base.yml", "hf_output_pth=y"], "did you mean 'hf_output_path'"),
        (to_huggingface, ["base.yml", "hf_output_path=y", "stepz=3"], "did you mean 'steps'"),
        (checker, ["base.yml", "--hf_model_pth=y"], "did you mean 'hf_model_path'"),
    ],
)
def test_cli_typos_are_config_errors(tool, args, hint, capsys):
  with pytest.raises(SystemExit) as e:
    tool.main(["tool", *args])
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert err.startswith("CONFIG ERROR:") and hint in err


def test_to_huggingface_refuses_what_the_family_cannot_express():
  config = make_config(model_name="tests/tiny-llama", final_logits_soft_cap=5.0)
  with pytest.raises(weight_mapping.UnsupportedCheckpointError, match="final_logits_soft_cap"):
    to_huggingface.hf_config_json(config)


def test_logit_checker_cli_passes_and_fails(converted, tmp_path, capsys):
  c = converted("qwen3")
  base = ["checker", str(c.dir(True) / "model.yml"), f"load_parameters_path={c.dir(True) / 'params'}"]
  golden = tmp_path / "golden.npz"
  assert checker.main([*base, f"--hf_model_path={c.hf_dir}", f"--write_golden={golden}"]) == 0
  assert "PASS" in capsys.readouterr().out
  data = dict(np.load(golden))
  data["logits"][0, 3, 7] += 0.01  # one logit off by 1e-2: past the 1e-3 bound
  np.savez(tmp_path / "bad.npz", **data)
  assert checker.main([*base, f"--golden_logits={tmp_path / 'bad.npz'}"]) == 1
  assert "FAIL: max |logit diff|" in capsys.readouterr().out
