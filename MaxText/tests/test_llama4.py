"""Llama 4 (text) against transformers' Llama4ForCausalLM, and its conversions.

A tiny random-weight transformers model with every Llama 4 layer kind (MoE and dense layers, RoPE layers with
8-token attention chunks and L2 QK norm, NoPE layers with temperature tuning, Llama 3.1 RoPE scaling) is built once
per module from tests/tiny-llama4.yml's dims, saved with save_pretrained and converted with to_maxtext (scanned and
unscanned). Sequences are 28 tokens, several chunks long. Checked: fp32 logits, greedy generation, KV-cache decoding,
HF -> MaxText -> HF bit for bit, the per-expert and multimodal checkpoint spellings, the published configs, packed
documents, and a few fine-tuning steps.
"""

import json
import pathlib

import numpy as np
import pytest
import yaml
from flax import nnx

from MaxText import pyconfig, train
from MaxText.tests import forward_pass_logit_checker as checker
from MaxText.tests import model_test_utils as mtu
from MaxText.utils.ckpt_conversion import to_huggingface, to_maxtext, weight_mapping
from MaxText.utils.ckpt_conversion.safetensors_io import SafetensorsReader, SafetensorsWriter

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

SEQ = 28  # three and a half 8-token chunks


def hf_config(c):
  """The tiny model as transformers users write it (not via our mapping): NoPE every 3rd layer, MoE every 2nd."""
  return transformers.Llama4TextConfig(
      vocab_size=c.vocab_size,
      hidden_size=c.emb_dim,
      intermediate_size=c.moe_mlp_dim,
      intermediate_size_mlp=c.mlp_dim,
      num_hidden_layers=c.num_decoder_layers,
      num_attention_heads=c.num_query_heads,
      num_key_value_heads=c.num_kv_heads,
      head_dim=c.head_dim,
      num_local_experts=c.num_experts,
      num_experts_per_tok=1,
      interleave_moe_layer_step=2,
      no_rope_layer_interval=3,
      attention_chunk_size=8,
      use_qk_norm=True,
      attn_temperature_tuning=True,
      floor_scale=4,
      attn_scale=0.5,
      rms_norm_eps=1e-5,
      max_position_embeddings=128,
      rope_parameters={
          "rope_type": "llama3",
          "rope_theta": 10000.0,
          "factor": 8.0,
          "low_freq_factor": 1.0,
          "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16,
      },
      bos_token_id=0,
      eos_token_id=0,
      pad_token_id=0,
  )


def hf_model(c):
  model = transformers.Llama4ForCausalLM(hf_config(c))
  model.config._attn_implementation = "eager"  # pylint: disable=protected-access
  torch.manual_seed(0)
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.copy_((1.0 if "norm" in name else 0.0) + (0.3 if "norm" in name else 0.2) * torch.randn_like(p))
  return model.eval()


class Converted:
  """The tiny HF model, its checkpoint, reference logits and the two MaxText conversions."""

  def __init__(self, root: pathlib.Path):
    self.tiny = mtu.config_of(model_name="tests/tiny-llama4")
    self.root = root
    self.hf = hf_model(self.tiny)
    self.hf_dir = root / "hf"
    self.hf.save_pretrained(self.hf_dir)
    self.tokens, self.hf_logits = mtu.hf_reference(self.hf, self.tiny.vocab_size, SEQ)
    for scanned in (True, False):
      to_maxtext.convert(str(self.hf_dir), str(self.dir(scanned)), [f"scan_layers={str(scanned).lower()}"])
    self.models = {}

  def dir(self, scanned: bool) -> pathlib.Path:
    return self.root / ("scanned" if scanned else "unscanned")

  def config(self, scanned: bool, **kw):
    return mtu.converted_config(self.dir(scanned), scanned, **kw)

  def model(self, scanned: bool):
    if scanned not in self.models:
      self.models[scanned] = checker.load_model(self.config(scanned))
    return self.models[scanned]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  return Converted(tmp_path_factory.mktemp("llama4"))


def read_safetensors(directory) -> dict[str, np.ndarray]:
  reader = SafetensorsReader(directory)
  return {name: reader.read(name) for name in reader.names()}


def test_model_yml_is_the_tiny_yml(converted):
  """config.json -> model keys recovers exactly the architecture tests/tiny-llama4.yml describes."""
  config = converted.config(True)
  for key in to_maxtext.MODEL_KEYS:
    assert config.get(key) == converted.tiny.get(key), key


@pytest.mark.parametrize("scanned,attention", [(True, "dot_product"), (False, "autoselected")])
def test_logits_match_transformers(converted, scanned, attention):
  """Both layer layouts (traced and static layer kinds); autoselected attention runs JAX's fused kernel on NoPE
  layers and falls back to the masked reference on chunked ones."""
  model = (
      converted.model(scanned)
      if attention == "dot_product"
      else checker.load_model(converted.config(scanned, attention=attention))
  )
  result = checker.compare(checker.maxtext_logits(model, converted.tokens), converted.hf_logits)
  assert result.kl.max() <= 1e-5 and result.max_abs_diff <= 1e-3, checker.report(result, 5)
  assert result.top1_agreement == 1.0


def test_round_trip_reproduces_every_tensor(converted, tmp_path):
  """HF -> MaxText (either layout) -> HF: the same tensor names, dtypes and bits; transformers reads the config back."""
  original = read_safetensors(converted.hf_dir)
  for scanned in (True, False):
    out = tmp_path / f"hf_{scanned}"
    to_huggingface.convert(converted.config(scanned), str(out))
    back = read_safetensors(out)
    assert sorted(back) == sorted(original)
    for name, value in original.items():
      assert back[name].dtype == value.dtype and np.array_equal(back[name], value), name
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
  assert reloaded.config.layer_types == converted.hf.config.layer_types
  assert reloaded.config.moe_layers == converted.hf.config.moe_layers
  with torch.no_grad():
    logits = reloaded(torch.from_numpy(converted.tokens.astype(np.int64))).logits.numpy()
  np.testing.assert_array_equal(logits, converted.hf_logits)


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


def test_greedy_generation_matches_transformers(converted):
  api = pytest.importorskip("MaxText.api")
  prompts = [[int(t) for t in converted.tokens[0, :5]], [int(t) for t in converted.tokens[1, :11]]]
  model = api.load(
      str(converted.dir(True) / "model.yml"),
      load_parameters_path=str(converted.dir(True) / "params"),
      dtype="float32",
      run_name="test",
  )
  got = model.generate(prompts, max_new_tokens=24, strategy="greedy", stop_on_eos=False)
  converted.hf.generation_config.eos_token_id = None  # never stop early, as stop_on_eos=False does
  for prompt, new in zip(prompts, got):
    with torch.no_grad():
      out = converted.hf.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False, pad_token_id=0)
    assert new == out[0, len(prompt) :].tolist()


def write_checkpoint(directory: pathlib.Path, config_json: dict, tensors: dict[str, np.ndarray]):
  directory.mkdir()
  (directory / "config.json").write_text(json.dumps(config_json))
  writer = SafetensorsWriter(directory, [(k, v.shape, v.dtype) for k, v in tensors.items()])
  for name, value in tensors.items():
    writer.write(name, value)
  writer.close()


def assert_converts_like_the_original(converted, directory, tmp_path):
  to_maxtext.convert(str(directory), str(tmp_path / "mt"), ["scan_layers=true"])
  config = converted.config(True)
  want, got = mtu.load_flat_params(config, converted.dir(True) / "params"), mtu.load_flat_params(
      config, tmp_path / "mt" / "params"
  )
  assert want.keys() == got.keys()
  for path, value in want.items():
    np.testing.assert_array_equal(value, got[path], err_msg="/".join(map(str, path)))


def test_per_expert_checkpoint_converts_like_fused(converted, tmp_path):
  """Experts stored one nn.Linear each (experts.<j>.{gate,up,down}_proj.weight) give the same params."""
  tensors = read_safetensors(converted.hf_dir)
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
  write_checkpoint(tmp_path / "per_expert", config_json, tensors)
  assert_converts_like_the_original(converted, tmp_path / "per_expert", tmp_path)


def test_multimodal_checkpoint_converts_its_text_model(converted, tmp_path):
  """Llama4ForConditionalGeneration (the published checkpoints): text_config and language_model tensors; vision
  tensors skipped."""
  text_config = json.loads((converted.hf_dir / "config.json").read_text())
  tensors = {f"language_model.{k}": v for k, v in read_safetensors(converted.hf_dir).items()}
  tensors["vision_model.patch_embedding.linear.weight"] = np.zeros((4, 3), np.float32)
  tensors["multi_modal_projector.linear_1.weight"] = np.zeros((4, 3), np.float32)
  config_json = {
      "architectures": ["Llama4ForConditionalGeneration"],
      "model_type": "llama4",
      "text_config": text_config,
  }
  write_checkpoint(tmp_path / "mm", config_json, tensors)
  assert_converts_like_the_original(converted, tmp_path / "mm", tmp_path)


def test_packed_documents_chunk_from_their_own_start(converted):
  """With packing, a document's chunks start at its first token: its logits equal those of the document alone
  (row 0: documents of 11 and 17 tokens; row 1: the second document alone, then padding)."""
  first, second = 11, SEQ - 11
  doc = converted.tokens[0, first:]
  tokens = np.stack([converted.tokens[0], np.concatenate([doc, np.zeros(first, np.int32)])])
  segments = np.array([[1] * first + [2] * second, [1] * second + [0] * first], np.int32)
  positions = np.array([list(range(first)) + list(range(second)), list(range(SEQ))], np.int32)
  logits = np.asarray(mtu.forward(converted.model(True), tokens, positions, segments))
  np.testing.assert_allclose(logits[0, first:], logits[1, :second], atol=1e-4, rtol=0)


def test_fine_tunes_from_converted_params(converted, tmp_path):
  config = converted.config(
      True,
      base_output_directory=str(tmp_path),
      dataset_type="synthetic",
      steps=4,
      per_device_batch_size=1,
      max_target_length=32,
      max_prefill_predict_length=16,
      learning_rate=1e-2,
      warmup_steps_fraction=0.0,
      enable_checkpointing=False,
      enable_tensorboard=False,
      load_balance_loss_weight=0.01,
  )
  losses = [h["learning/loss"] for h in train.train(config)]
  assert len(losses) == 4 and np.all(np.isfinite(losses))
  assert losses[-1] < losses[0], losses


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
  bad = {**hf_config(config).to_dict(), "architectures": ["Llama4ForCausalLM"], "num_experts_per_tok": 2}
  with pytest.raises(weight_mapping.UnsupportedCheckpointError, match="num_experts_per_tok"):
    to_maxtext.model_keys(bad)
