"""Every family of the registry against Hugging Face transformers, through its converted checkpoint.

For each test model a family's spec declares (`tiny_hf_configs`), a float32 random-weight transformers model
(non-trivial norms, biases and routing biases) is built, saved with save_pretrained and converted with to_maxtext in
both layer layouts (model_test_utils.converted). Checked: logits against transformers on sequences several times
longer than any sliding window or attention chunk, through the model and through `api.load(...).logits`; both
layouts hold the same params; HF -> MaxText -> HF bit for bit; greedy generation through MaxText.api against
transformers' generate; the other expert layout; model.yml against the tiny yml; a few fine-tuning steps.
A family added to the registry is tested here without editing this file: anything a variant needs comes from its
spec or its converted config.
"""

import json

import jax
import numpy as np
import pytest
import yaml

from MaxText import api, checkpointing, lora, models, sharding, train, training
from MaxText.tests import forward_pass_logit_checker as checker
from MaxText.tests import model_test_utils as mtu
from MaxText.utils.ckpt_conversion import peft_export, to_huggingface, to_maxtext

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VARIANTS = mtu.registry_variants()
WITH_TINY_YML = [v for v in VARIANTS if v.tiny_yml]
MOE = [v for v in VARIANTS if mtu.model_keys_of(v)["num_experts"] > 1]
# Training compiles are the slow part: one variant per family (the first it declares).
FINE_TUNED = [v for v in VARIANTS if v.name == next(iter(models.get(v.family).tiny_hf_configs))]
# config.json fields a round trip may change: the checkpoint's path, token ids and position limit (MaxText keeps no
# tokenizer ids and writes its max_target_length), multi-token-prediction layers (never converted) and Gemma 3's
# legacy sliding-window pattern (layer_types is what holds the layer kinds).
NOT_ARCHITECTURE = {
    "_name_or_path",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "max_position_embeddings",
    "num_nextn_predict_layers",
    "_sliding_window_pattern",
}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  return lambda variant: mtu.converted(tmp_path_factory, variant)


def assert_logits_match(got: np.ndarray, reference: np.ndarray):
  """The fp32 parity bounds: per-token KL <= 1e-5, max |logit difference| <= 1e-3, the same argmax everywhere."""
  result = checker.compare(got, reference)
  assert result.kl.max() <= 1e-5 and result.max_abs_diff <= 1e-3, checker.report(result, 5)
  assert result.top1_agreement == 1.0


@pytest.mark.parametrize("variant", WITH_TINY_YML, ids=str)
def test_model_yml_has_the_tiny_yml_model_keys(variant, converted):
  """config.json -> model keys recovers exactly the architecture configs/models/tests/tiny-<variant>.yml describes."""
  c = converted(variant)
  written = yaml.safe_load((c.dir(True) / "model.yml").read_text())
  assert written["base_config"] == "base.yml"
  config, tiny = c.config(True), mtu.config_of(model_name=variant.tiny_yml)
  for key in to_maxtext.MODEL_KEYS:
    assert config.get(key) == tiny.get(key), key


@pytest.mark.parametrize("variant", VARIANTS, ids=str)
def test_logits_match_transformers(variant, converted):
  """The scanned model (layer kinds traced inside the scan); test_api_logits_match_transformers runs the unrolled
  one, from the unscanned checkpoint."""
  c = converted(variant)
  assert_logits_match(checker.maxtext_logits(checker.load_model(c.config(True)), c.tokens), c.hf_logits)


@pytest.mark.parametrize("variant", VARIANTS, ids=str)
def test_api_logits_match_transformers(variant, converted):
  """The public surface: api.load(<converted model.yml>, load_parameters_path=...).logits(ids), MoE families too."""
  c = converted(variant)
  assert_logits_match(c.api_model().logits(c.tokens), c.hf_logits)


@pytest.mark.parametrize("variant", VARIANTS, ids=str)
def test_scanned_and_unscanned_conversions_are_identical(variant, converted):
  """Both checkpoints hold the same numbers: loaded into one layout they are bit-identical."""
  c = converted(variant)
  config = c.config(True)
  scanned = mtu.load_flat_params(config, c.dir(True) / "params")
  unscanned = mtu.load_flat_params(config, c.dir(False) / "params")
  assert scanned.keys() == unscanned.keys()
  for path, value in scanned.items():
    np.testing.assert_array_equal(value, unscanned[path], err_msg="/".join(map(str, path)))


@pytest.mark.parametrize("variant", VARIANTS, ids=str)
def test_round_trip_reproduces_every_tensor(variant, converted, tmp_path):
  """HF -> MaxText (either layout) -> HF: the same tensor names, dtypes and bits, the same config (architecture and
  layer kinds included, fields that do not describe the weights' function aside), and transformers' logits from the
  result unchanged."""
  c = converted(variant)
  original = mtu.read_safetensors(c.hf_dir)
  for scanned in (True, False):
    out = tmp_path / f"hf_{scanned}"
    to_huggingface.convert(c.config(scanned), str(out))
    back = mtu.read_safetensors(out)
    assert sorted(back) == sorted(original)
    for name, value in original.items():
      assert back[name].dtype == value.dtype and np.array_equal(back[name], value), name
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
  original_config, written = c.hf.config.to_dict(), reloaded.config.to_dict()
  for key, value in original_config.items():
    if value is not None and key not in NOT_ARCHITECTURE:
      assert written.get(key) == value, (key, written.get(key), value)
  with torch.no_grad():
    logits = reloaded(torch.from_numpy(c.tokens.astype(np.int64))).logits.numpy()
  np.testing.assert_array_equal(logits, c.hf_logits)


@pytest.mark.parametrize("variant", MOE, ids=str)
def test_in_memory_expert_layout_converts_like_the_saved_one(variant, converted, tmp_path):
  """transformers 5.x modules may hold experts fused (experts.gate_up_proj / down_proj) while save_pretrained writes
  them per expert: a checkpoint of the module's own state dict converts to the same params."""
  c = converted(variant)
  tensors = {k: v.detach().numpy() for k, v in c.hf.state_dict().items() if not k.endswith("inv_freq")}
  config_json = json.loads((c.hf_dir / "config.json").read_text())
  mtu.write_checkpoint(tmp_path / "in_memory", config_json, tensors)
  mtu.assert_converts_like(c, tmp_path / "in_memory", tmp_path / "mt")


@pytest.mark.parametrize("variant", VARIANTS, ids=str)
def test_greedy_generation_matches_transformers(variant, converted):
  """api.generate (engine, KV cache, scheduler) against transformers' generate, past every window and chunk."""
  c = converted(variant)
  prompts = [[int(t) for t in c.tokens[0, :5]], [int(t) for t in c.tokens[1, :11]]]
  got = c.api_model().generate(prompts, max_new_tokens=24, strategy="greedy", stop_on_eos=False)
  c.hf.generation_config.eos_token_id = None  # never stop early, as stop_on_eos=False does
  for prompt, new in zip(prompts, got):
    with torch.no_grad():
      out = c.hf.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False, pad_token_id=0)
    assert new == out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("variant", FINE_TUNED, ids=str)
def test_fine_tunes_from_converted_params(variant, converted, tmp_path):
  c = converted(variant)
  moe = variant in MOE
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
      load_balance_loss_weight=0.01 if moe else 0.0,
      warmup_steps_fraction=0.0,
      enable_checkpointing=False,
      enable_tensorboard=False,
  )
  losses = [h["learning/loss"] for h in train.train(config)]
  assert len(losses) == config.steps and np.all(np.isfinite(losses))
  assert losses[-1] < losses[0], losses


# peft moves gate/up/down-projection adapters of these model types onto the routed experts, wherever they sit (the
# export refuses them: see the test below), so their variants adapt attention only.
ATTENTION_ONLY = {"qwen3-moe", "deepseek2", "deepseek3"}
# One variant per family, and DeepSeek V3's low-rank query besides V2's plain one.
LORA = FINE_TUNED + [v for v in VARIANTS if v.name == "deepseek3" and v not in FINE_TUNED]


def _attention_targets(variant) -> list[str]:
  keys = mtu.model_keys_of(variant)
  if keys.get("attention_type") != "mla":
    return ["query", "key", "value", "out"]
  return ["out", "wkv_a", "wkv_b"] + (["wq_a", "wq_b"] if keys.get("q_lora_rank", 0) > 0 else ["query"])


@pytest.mark.parametrize("variant", LORA, ids=str)
def test_peft_adapter_loaded_by_peft_matches_maxtext_lora(variant, converted, tmp_path):
  """Random rank-4 adapters on every dense projection the family has, exported in PEFT format from either layer
  layout: `peft` loads them onto the transformers model, whose logits then equal MaxText's base + adapters through
  api.load (and differ from the base's)."""
  peft = pytest.importorskip("peft")
  c = converted(variant)
  keys = dict(lora_rank=4, lora_alpha=8.0, base_output_directory=str(tmp_path))
  if variant.name in ATTENTION_ONLY:
    keys["lora_target_modules"] = _attention_targets(variant)
  config = c.config(True, **keys)
  _, _, abstract, _ = training.build_model_skeleton(config, sharding.create_mesh(config))
  rng = np.random.default_rng(0)
  adapters = jax.tree.map(lambda x: 0.2 * rng.standard_normal(x.shape).astype(np.float32), lora.split(abstract)[1])
  adapters_dir = str(tmp_path / "adapters")
  checkpointing.save_params(adapters_dir, adapters)
  maxtext = api.load(
      str(c.dir(True) / "model.yml"),
      load_parameters_path=str(c.dir(True) / "params"),
      checkpoint_path=adapters_dir,
      **keys,
  ).logits(c.tokens)
  assert np.abs(maxtext - c.hf_logits).max() > 1e-2  # the adapters matter
  for scanned in (True, False):
    out = str(tmp_path / f"peft-{scanned}")
    peft_export.export(c.config(scanned, checkpoint_path=adapters_dir, **keys), out)
    base = transformers.AutoModelForCausalLM.from_pretrained(
        str(c.hf_dir), dtype=torch.float32, attn_implementation="eager"
    )
    model = peft.PeftModel.from_pretrained(base, out).eval()
    with torch.no_grad():
      got = model(torch.from_numpy(c.tokens.astype(np.int64))).logits.numpy()
    assert_logits_match(maxtext, got)


def test_peft_export_refuses_dense_mlp_adapters_peft_would_move_onto_experts(converted, tmp_path):
  """Qwen3-MoE with a dense layer (mlp_only_layers): peft reads any gate_proj/up_proj/down_proj adapter of a
  qwen3_moe model as a routed-expert one, so the export says so instead of writing an adapter that loads wrongly."""
  c = converted(next(v for v in VARIANTS if v.name == "qwen3-moe"))
  keys = dict(lora_rank=4, base_output_directory=str(tmp_path))
  config = c.config(True, **keys)
  _, _, abstract, _ = training.build_model_skeleton(config, sharding.create_mesh(config))
  checkpointing.save_params(
      str(tmp_path / "adapters"), jax.tree.map(lambda x: np.zeros(x.shape, np.float32), lora.split(abstract)[1])
  )
  with pytest.raises(ValueError, match=r"dense MLP adapters of model\.layers\.0\.mlp\.gate_proj"):
    peft_export.export(c.config(True, checkpoint_path=str(tmp_path / "adapters"), **keys), str(tmp_path / "peft"))
