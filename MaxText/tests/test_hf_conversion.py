"""Hugging Face conversion and parity per family: Llama, Mistral, Gemma, Gemma 2, Gemma 3, Qwen 3, GPT-3 (as GPT-2).

Each family's tiny random-weight transformers model (non-trivial norms and biases, float32) is built once per
module from the tiny yml's dims, saved with save_pretrained, converted with to_maxtext (scanned and unscanned), and
checked: logits against transformers on sequences longer than any sliding window, both conversions identical,
HF -> MaxText -> HF bit for bit, a few fine-tuning steps from load_parameters_path, and greedy generation through
MaxText.api against transformers' generate.
"""

import dataclasses
import json
import pathlib

import numpy as np
import pytest
import yaml

from MaxText import train
from MaxText.layers import model_creation
from MaxText.tests import forward_pass_logit_checker as checker
from MaxText.tests import model_test_utils as mtu
from MaxText.tests.model_test_utils import config_of, make_config
from MaxText.utils.ckpt_conversion import to_huggingface, to_maxtext, weight_mapping
from MaxText.utils.ckpt_conversion.safetensors_io import SafetensorsReader, SafetensorsWriter

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

FAMILIES = ("llama", "mistral", "gemma", "gemma2", "gemma3", "qwen3", "gpt3", "mixtral", "qwen3-moe")
SEQ = 24  # longer than every tiny sliding window (8)


def hf_config(family: str, c):
  """The transformers config of the tiny model, spelled the way transformers users write it (not via our mapping)."""
  t = transformers
  common = dict(
      vocab_size=c.vocab_size,
      hidden_size=c.emb_dim,
      intermediate_size=c.mlp_dim,
      num_hidden_layers=c.num_decoder_layers,
      num_attention_heads=c.num_query_heads,
      num_key_value_heads=c.num_kv_heads,
      head_dim=c.head_dim,
      max_position_embeddings=128,
  )
  rope = {"rope_type": "default", "rope_theta": c.rope_max_timescale}
  gemma = dict(common, rms_norm_eps=1e-6, rope_parameters=rope, pad_token_id=0)
  if family == "llama":
    return t.LlamaConfig(**common, rms_norm_eps=1e-5, tie_word_embeddings=False, rope_parameters=rope)
  if family == "mistral":
    return t.MistralConfig(**common, rms_norm_eps=1e-5, sliding_window=8, rope_parameters=rope)
  if family == "qwen3":
    return t.Qwen3Config(**common, rms_norm_eps=1e-6, tie_word_embeddings=False, rope_parameters=rope)
  if family == "mixtral":
    moe = dict(common, intermediate_size=c.moe_mlp_dim, num_local_experts=c.num_experts)
    return t.MixtralConfig(**moe, num_experts_per_tok=c.num_experts_per_tok, rms_norm_eps=1e-5, rope_parameters=rope)
  if family == "qwen3-moe":
    return t.Qwen3MoeConfig(
        **common,
        rms_norm_eps=1e-6,
        rope_parameters=rope,
        num_experts=c.num_experts,
        num_experts_per_tok=c.num_experts_per_tok,
        moe_intermediate_size=c.moe_mlp_dim,
        norm_topk_prob=True,
        mlp_only_layers=[0],
    )
  if family == "gemma":
    return t.GemmaConfig(**gemma, hidden_act="gelu_pytorch_tanh")
  if family == "gemma2":
    return t.Gemma2Config(
        **gemma, sliding_window=8, query_pre_attn_scalar=24, attn_logit_softcapping=5.0, final_logit_softcapping=3.0
    )
  if family == "gemma3":
    rope = {
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
    }
    kinds = ["sliding_attention", "sliding_attention", "full_attention"] * 2
    return t.Gemma3TextConfig(
        **dict(gemma, rope_parameters=rope), sliding_window=8, query_pre_attn_scalar=24, layer_types=kinds
    )
  assert family == "gpt3"
  return t.GPT2Config(
      n_embd=c.emb_dim,
      n_head=c.num_query_heads,
      n_layer=c.num_decoder_layers,
      n_inner=c.mlp_dim,
      n_positions=c.trainable_position_size,
      vocab_size=c.vocab_size,
      activation_function="gelu_new",
      resid_pdrop=0.0,
      embd_pdrop=0.0,
      attn_pdrop=0.0,
      bos_token_id=0,
      eos_token_id=0,
  )


def hf_model(family: str, c):
  """The tiny transformers model with random weights: norm scales around 1 (Gemma's stored around 0), biases != 0."""
  model = transformers.AutoModelForCausalLM.from_config(hf_config(family, c), attn_implementation="eager")
  one_centered = not family.startswith("gemma")
  torch.manual_seed(0)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("bias"):
        p.copy_(0.1 * torch.randn_like(p))
      elif "norm" in name or ".ln_" in name:
        p.copy_(float(one_centered) + 0.3 * torch.randn_like(p))
      else:
        p.copy_(0.2 * torch.randn_like(p))
  return model.eval()


@dataclasses.dataclass
class Converted:
  family: str
  tiny: object  # the tiny yml's config
  hf_dir: pathlib.Path
  hf: object  # the transformers model
  root: pathlib.Path
  tokens: np.ndarray
  hf_logits: np.ndarray

  def dir(self, scanned: bool) -> pathlib.Path:
    return self.root / ("scanned" if scanned else "unscanned")

  def config(self, scanned: bool, **kw):
    """The converted model.yml with its params, in either layer layout (`scan_layers` defaults to the checkpoint's)."""
    return mtu.converted_config(self.dir(scanned), scanned, **kw)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  cache = {}

  def get(family: str) -> Converted:
    if family not in cache:
      tiny = config_of(model_name=f"tests/tiny-{family}")
      root = tmp_path_factory.mktemp(family)
      model = hf_model(family, tiny)
      model.save_pretrained(root / "hf")
      tokens, logits = mtu.hf_reference(model, tiny.vocab_size, SEQ)
      item = Converted(family, tiny, root / "hf", model, root, tokens, logits)
      for scanned in (True, False):
        to_maxtext.convert(str(item.hf_dir), str(item.dir(scanned)), [f"scan_layers={str(scanned).lower()}"])
      cache[family] = item
    return cache[family]

  return get


@pytest.mark.parametrize("family", FAMILIES)
def test_model_yml_has_the_tiny_yml_model_keys(family, converted):
  """config.json -> model keys recovers exactly the architecture the tiny yml describes."""
  c = converted(family)
  written = yaml.safe_load((c.dir(True) / "model.yml").read_text())
  assert written["base_config"] == "base.yml"
  config = c.config(True)
  for key in to_maxtext.MODEL_KEYS:
    assert config.get(key) == c.tiny.get(key), key


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers(family, converted):
  c = converted(family)
  for scanned in (True, False):
    got = checker.maxtext_logits(checker.load_model(c.config(scanned)), c.tokens)
    result = checker.compare(got, c.hf_logits)
    assert result.kl.max() <= 1e-5 and result.max_abs_diff <= 1e-3, checker.report(result, 5)
    assert result.top1_agreement == 1.0


@pytest.mark.parametrize("family", FAMILIES)
def test_scanned_and_unscanned_conversions_are_identical(family, converted):
  """Both checkpoints hold the same numbers: loaded into one layout they are bit-identical (so are their logits)."""
  c = converted(family)
  config = c.config(True)
  scanned = mtu.load_flat_params(config, c.dir(True) / "params")
  unscanned = mtu.load_flat_params(config, c.dir(False) / "params")
  assert scanned.keys() == unscanned.keys()
  for path, value in scanned.items():
    np.testing.assert_array_equal(value, unscanned[path], err_msg="/".join(map(str, path)))


def read_safetensors(directory) -> dict[str, np.ndarray]:
  reader = SafetensorsReader(directory)
  return {name: reader.read(name) for name in reader.names()}


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_reproduces_every_tensor(family, converted, tmp_path):
  """HF -> MaxText (either layout) -> HF: the same tensor names, dtypes and bits, and transformers loads the result."""
  c = converted(family)
  original = read_safetensors(c.hf_dir)
  for scanned in (True, False):
    out = tmp_path / f"hf_{scanned}"
    to_huggingface.convert(c.config(scanned), str(out))
    back = read_safetensors(out)
    assert sorted(back) == sorted(original)
    for name, value in original.items():
      assert back[name].dtype == value.dtype and np.array_equal(back[name], value), name
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
  with torch.no_grad():
    logits = reloaded(torch.from_numpy(c.tokens.astype(np.int64))).logits.numpy()
  np.testing.assert_array_equal(logits, c.hf_logits)


@pytest.mark.parametrize("family", ["mixtral", "qwen3-moe"])
def test_fused_expert_checkpoints_convert_like_per_expert_ones(family, converted, tmp_path):
  """transformers 5.x modules hold experts fused (experts.gate_up_proj / down_proj, mlp.gate): a checkpoint of that
  state dict converts to the same params as the per-expert one save_pretrained writes."""
  c = converted(family)
  fused = {k: v.detach().numpy() for k, v in c.hf.state_dict().items()}
  assert any(k.endswith("mlp.experts.gate_up_proj") for k in fused)
  assert not any(".experts.0." in k for k in fused)
  out = tmp_path / "fused"
  writer = SafetensorsWriter(out, [(k, v.shape, v.dtype) for k, v in fused.items()], 10**9)
  for name, value in fused.items():
    writer.write(name, value)
  writer.close()
  (out / "config.json").write_text((c.hf_dir / "config.json").read_text())
  to_maxtext.convert(str(out), str(tmp_path / "mt"), ["scan_layers=true"])
  config = c.config(True)
  want, got = mtu.load_flat_params(config, c.dir(True) / "params"), mtu.load_flat_params(
      config, tmp_path / "mt" / "params"
  )
  assert want.keys() == got.keys()
  for path, value in want.items():
    np.testing.assert_array_equal(got[path], value, err_msg="/".join(map(str, path)))


@pytest.mark.parametrize("family", FAMILIES)
def test_fine_tunes_from_converted_params(family, converted, tmp_path):
  c = converted(family)
  moe = c.tiny.num_experts > 1
  config = c.config(
      True,
      base_output_directory=str(tmp_path),
      dataset_type="synthetic",
      per_device_batch_size=1,
      max_target_length=32,
      max_prefill_predict_length=16,
      # The tiny random MoEs see batch-to-batch loss swings larger than 3 steps at 3e-3 gain (any lr, any mesh,
      # either MoE path; their gradients are checked in test_moe.py): they get more steps at a higher rate.
      steps=6 if moe else 3,
      learning_rate=1e-2 if moe else 3e-3,
      warmup_steps_fraction=0.0,
      enable_checkpointing=False,
      enable_tensorboard=False,
  )
  losses = [h["learning/loss"] for h in train.train(config)]
  assert len(losses) == config.steps and np.all(np.isfinite(losses))
  assert losses[-1] < losses[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_matches_transformers(family, converted):
  api = pytest.importorskip("MaxText.api")
  c = converted(family)
  prompts = [[int(t) for t in c.tokens[0, :5]], [int(t) for t in c.tokens[1, :9]]]
  model = api.load(
      str(c.dir(True) / "model.yml"), load_parameters_path=str(c.dir(True) / "params"), dtype="float32", run_name="test"
  )
  got = model.generate(prompts, max_new_tokens=32, strategy="greedy", stop_on_eos=False)
  c.hf.generation_config.eos_token_id = None  # never stop early, as stop_on_eos=False does
  for prompt, new in zip(prompts, got):
    with torch.no_grad():
      out = c.hf.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False, pad_token_id=0)
    assert new == out[0, len(prompt) :].tolist()


def test_sharded_checkpoints_in_and_out(converted, tmp_path):
  """Shards with an index json convert like one file; to_huggingface shards big outputs the same way."""
  c = converted("llama")
  c.hf.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
  assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
  to_maxtext.convert(str(tmp_path / "sharded"), str(tmp_path / "mt"), ["scan_layers=true"])
  config = c.config(True)
  want, got = mtu.load_flat_params(config, c.dir(True) / "params"), mtu.load_flat_params(
      config, tmp_path / "mt" / "params"
  )
  assert all(np.array_equal(value, got[k]) for k, value in want.items())
  to_huggingface.convert(config, str(tmp_path / "back"), max_shard_bytes=50_000)
  index = json.loads((tmp_path / "back" / "model.safetensors.index.json").read_text())
  assert len(set(index["weight_map"].values())) > 1
  original, back = read_safetensors(c.hf_dir), read_safetensors(tmp_path / "back")
  assert all(np.array_equal(original[k], back[k]) for k in original) and back.keys() == original.keys()
  transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back")


def test_gemma3_multimodal_checkpoint_converts_its_text_model(converted, tmp_path):
  """Gemma3ForConditionalGeneration (the 4B-27B checkpoints): text_config and language-model tensors; vision skipped."""
  c = converted("gemma3")
  text_config = json.loads((c.hf_dir / "config.json").read_text())
  tensors = {f"model.language_model.{k[len('model.'):]}": v for k, v in read_safetensors(c.hf_dir).items()}
  tensors["model.vision_tower.patch_embedding.weight"] = np.zeros((4, 3), np.float32)
  config_json = {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3", "text_config": text_config}
  (tmp_path / "mm").mkdir()
  (tmp_path / "mm" / "config.json").write_text(json.dumps(config_json))
  writer = SafetensorsWriter(tmp_path / "mm", [(k, v.shape, v.dtype) for k, v in tensors.items()])
  for name, value in tensors.items():
    writer.write(name, value)
  writer.close()
  to_maxtext.convert(str(tmp_path / "mm"), str(tmp_path / "mt"), ["scan_layers=true"])
  config = c.config(True)
  want, got = mtu.load_flat_params(config, c.dir(True) / "params"), mtu.load_flat_params(
      config, tmp_path / "mt" / "params"
  )
  assert all(np.array_equal(value, got[k]) for k, value in want.items())


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
