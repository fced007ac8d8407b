"""LoRA: fresh adapters change nothing, the trainable count is the formula, the base stays frozen with no optimizer
state, checkpoints hold only adapters, merged weights equal base + adapter (dense projections and routed experts),
sharded equals unsharded, adapter dropout acts in training only, decode loads base + adapters, the PEFT export loads
in `peft` to the same logits, and bad settings are config errors."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx, traverse_util

from MaxText import api, checkpointing, generate_param_only_checkpoint, lora, pyconfig, sharding, train, training
from MaxText.config_schema import ConfigError
from MaxText.inference import loading
from MaxText.layers import linears, model_creation, quantization
from MaxText.tests import model_test_utils as mtu
from MaxText.tests.test_train import TINY, losses
from MaxText.utils.ckpt_conversion import to_huggingface

RANK = 4


def make_config(tmp_path, *args, **kw):
  return pyconfig.initialize(["", "base.yml", f"base_output_directory={tmp_path}", *TINY, *args], **kw)


def params_of(model) -> dict:
  return training._pure(nnx.state(model, nnx.Param).to_pure_dict())  # pylint: disable=protected-access


def logits_of(config, params):
  model = model_creation.abstract_model(config)
  nnx.update(model, nnx.State(params))
  tokens, positions, segments = mtu.inputs(packed=True)
  return np.asarray(mtu.forward(model, tokens, positions, segments), np.float64)


def expected_count(rank: int, layers: int = 2) -> int:
  """tiny-llama: emb 64, 4 query / 2 kv heads of 16, gated MLP of 128; r * (in + out) per adapted projection."""
  emb, q, kv, mlp = 64, 64, 32, 128
  per_layer = (emb + q) + 2 * (emb + kv) + (q + emb) + 2 * (emb + mlp) + (mlp + emb)
  return rank * per_layer * layers


def test_fresh_adapters_change_no_logits_and_count_the_formula(tmp_path):
  config = make_config(tmp_path, f"lora_rank={RANK}")
  params = params_of(model_creation.get_model(config))
  base, adapters = lora.split(params)
  assert lora.count(adapters) == expected_count(RANK)
  assert all(k[-1] in lora.ADAPTER_NAMES for k in traverse_util.flatten_dict(adapters))
  plain = make_config(tmp_path)
  np.testing.assert_array_equal(logits_of(config, params), logits_of(plain, base))
  only_query = make_config(tmp_path, "lora_rank=2", "lora_target_modules=[query]")
  assert lora.count(lora.split(params_of(model_creation.get_model(only_query)))[1]) == 2 * (64 + 64) * 2


def save_base(tmp_path):
  """A params-only checkpoint of the plain tiny model (the 'converted base')."""
  plain = make_config(tmp_path)
  params = params_of(model_creation.get_model(plain))
  path = str(tmp_path / "base_params")
  checkpointing.save_params(path, params)
  return path, params


def test_training_freezes_the_base_and_merged_weights_equal_base_plus_adapters(tmp_path):
  base_path, base = save_base(tmp_path)
  args = [f"lora_rank={RANK}", f"load_parameters_path={base_path}", "run_name=lora", "steps=6", "checkpoint_period=6"]
  config = make_config(tmp_path, *args, "per_device_batch_size=1", "learning_rate=1e-2")
  setup = training.TrainSetup(config, sharding.create_mesh(config))
  # Optimizer moments exist for the adapters only.
  moments = [x for x in jax.tree.leaves(setup.abstract_state["opt_state"]) if x.ndim > 0]
  assert sum(int(np.prod(x.shape)) for x in moments) == 2 * expected_count(RANK)
  history = train.train(config)
  assert losses(history)[-1] < losses(history)[0]

  step_dir = tmp_path / "lora" / "checkpoints" / "6"
  stored = traverse_util.flatten_dict(checkpointing.stored_params_tree(str(step_dir)))
  assert stored and all(str(k[-1]) in lora.ADAPTER_NAMES for k in stored), sorted(stored)[:4]

  # Decoding: the base from load_parameters_path, the adapters from the run's newest checkpoint.
  decode_args = [f"lora_rank={RANK}", f"load_parameters_path={base_path}", "run_name=lora"]
  decode_config = make_config(tmp_path, *decode_args)
  _, _, abstract, shardings = training.build_model_skeleton(decode_config, sharding.create_mesh(decode_config))
  full = jax.device_get(loading.load_params(decode_config, abstract, shardings))
  loaded_base, adapters = lora.split(full)
  want_base = traverse_util.flatten_dict(base)
  for key, value in traverse_util.flatten_dict(loaded_base).items():
    np.testing.assert_array_equal(value, want_base[key])  # frozen: exactly the base it started from
  assert any(np.abs(v).max() > 0 for k, v in traverse_util.flatten_dict(adapters).items() if k[-1] == "lora_b")
  merged = lora.merge(full, lora.scale(config), config.param_scan_axis)
  want = logits_of(make_config(tmp_path), merged)
  np.testing.assert_allclose(logits_of(config, full), want, rtol=1e-5, atol=1e-5)
  # The public API loads the same way.
  model = api.load(
      "base.yml", base_output_directory=str(tmp_path), **_tiny_keys(), **dict(a.split("=") for a in decode_args)
  )
  tokens = mtu.inputs()[0]
  plain = make_config(tmp_path)
  np.testing.assert_allclose(model.logits(tokens), _plain_logits(plain, merged, tokens), rtol=1e-5, atol=1e-5)

  # Export: a merged params-only checkpoint any plain config loads, and a Hugging Face model that transformers runs
  # to the same logits as base + adapters.
  out = generate_param_only_checkpoint.export(decode_config, str(tmp_path / "merged"))
  plain_model = api.load("base.yml", base_output_directory=str(tmp_path), **_tiny_keys(), load_parameters_path=out)
  np.testing.assert_allclose(plain_model.logits(tokens), model.logits(tokens), rtol=1e-5, atol=1e-5)
  to_huggingface.convert(decode_config, str(tmp_path / "hf"))
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel

  hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32)
  with torch.no_grad():
    hf_logits = hf(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
  np.testing.assert_allclose(hf_logits, model.logits(tokens), rtol=1e-4, atol=1e-4)

  # The trained adapters alone as a PEFT adapter (the command line), loaded by peft onto the converted base.
  peft = pytest.importorskip("peft")
  to_huggingface.convert(make_config(tmp_path, f"load_parameters_path={base_path}"), str(tmp_path / "hf_base"))
  cli = [f"base_output_directory={tmp_path}", *TINY, *decode_args, f"peft_output_path={tmp_path / 'peft'}"]
  to_huggingface.main(["to_huggingface", "base.yml", *cli])
  written = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
  assert written["r"] == RANK and written["peft_type"] == "LORA" and len(written["target_modules"]) == 2 * 7
  base_hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf_base"), dtype=torch.float32)
  with torch.no_grad():
    peft_logits = peft.PeftModel.from_pretrained(base_hf, str(tmp_path / "peft"))(torch.tensor(tokens)).logits.numpy()
  np.testing.assert_allclose(peft_logits, model.logits(tokens), rtol=1e-4, atol=1e-4)


def _plain_logits(config, params, tokens):
  model = model_creation.abstract_model(config)
  nnx.update(model, nnx.State(params))
  positions = np.broadcast_to(np.arange(tokens.shape[1], dtype=np.int32), tokens.shape)
  return np.asarray(mtu.forward(model, tokens, positions, None))


def test_qlora_trains_adapters_over_an_int8_base_and_merges_to_float(tmp_path):
  _, base = save_base(tmp_path)
  quant = ["quantization=int8w", "checkpoint_is_quantized=true"]
  int8_config = make_config(tmp_path, *quant)
  _, _, int8_abstract, _ = training.build_model_skeleton(int8_config, sharding.create_mesh(int8_config))
  int8_base = jax.device_get(quantization.quantize_params(base, int8_abstract))
  int8_path = str(tmp_path / "int8_params")
  checkpointing.save_params(int8_path, int8_base)

  args = [f"lora_rank={RANK}", *quant, f"load_parameters_path={int8_path}", "run_name=qlora", "steps=6"]
  config = make_config(tmp_path, *args, "checkpoint_period=6", "per_device_batch_size=1", "learning_rate=1e-2")
  setup = training.TrainSetup(config, sharding.create_mesh(config))
  frozen = traverse_util.flatten_dict(setup.abstract_frozen)
  kernels = [x for k, x in frozen.items() if k[-1] == "kernel" and "layers" in k]  # the layers' projections
  assert kernels and all(x.dtype == jnp.int8 for x in kernels)
  history = train.train(config)
  assert losses(history)[-1] < losses(history)[0]

  decode_config = make_config(tmp_path, *args)
  _, _, abstract, shardings = training.build_model_skeleton(decode_config, sharding.create_mesh(decode_config))
  full = jax.device_get(loading.load_params(decode_config, abstract, shardings))
  merged = lora.merge(full, lora.scale(config), config.param_scan_axis)
  assert not any(k[-1] == "kernel_scale" for k in traverse_util.flatten_dict(merged))
  np.testing.assert_allclose(
      logits_of(make_config(tmp_path), merged), logits_of(decode_config, full), rtol=1e-5, atol=1e-5
  )


def _tiny_keys():
  keys = {}
  for arg in TINY:
    k, v = arg.split("=", 1)
    keys[k] = v
  return keys


def test_merge_handles_unscanned_layers(tmp_path):
  config = make_config(tmp_path, f"lora_rank={RANK}", "scan_layers=false")
  params = params_of(mtu.build(**_tiny_overrides(config)))
  # Random adapters of a trained adapter's size (test fills are unit-variance: B would swamp the kernels).
  params = jax.tree_util.tree_map_with_path(lambda p, x: x * 0.05 if str(p[-1].key) == "lora_b" else x, params)
  merged = lora.merge(params, lora.scale(config), config.param_scan_axis)
  plain = make_config(tmp_path, "scan_layers=false")
  np.testing.assert_allclose(logits_of(plain, merged), logits_of(config, params), rtol=1e-5, atol=1e-5)


def _tiny_overrides(config):
  return {"lora_rank": config.lora_rank, "scan_layers": config.scan_layers}


def test_lora_sharded_equals_unsharded(tmp_path):
  common = [f"lora_rank={RANK}", "steps=3", "per_device_batch_size=1", "enable_checkpointing=false"]
  replicated = losses(train.train(make_config(tmp_path, *common, "ici_data_parallelism=8")))
  sharded = losses(train.train(make_config(tmp_path, *common, "ici_fsdp_parallelism=4", "ici_tensor_parallelism=2")))
  np.testing.assert_allclose(sharded, replicated, rtol=1e-5)


def test_lora_gradient_accumulation_equals_the_large_batch_unscanned(tmp_path):
  common = [f"lora_rank={RANK}", "steps=3", "enable_checkpointing=false", "scan_layers=false"]
  big = losses(train.train(make_config(tmp_path, *common, "per_device_batch_size=2")))
  accumulated = losses(
      train.train(make_config(tmp_path, *common, "per_device_batch_size=1", "gradient_accumulation_steps=2"))
  )
  np.testing.assert_allclose(accumulated, big, rtol=1e-5)


@pytest.mark.parametrize(
    "args,message",
    [
        (["lora_rank=65"], "lora_rank: 65 is larger than the query projection's smaller dimension"),
        (["lora_rank=4", "lora_target_modules=[q_proj]"], r"lora_target_modules: \['q_proj'\] is not a list of"),
        (["lora_rank=4", "ici_stage_parallelism=2"], "LoRA with pipeline stages"),
        (["lora_rank=4", "load_full_state_path=/x"], "load_full_state_path: with lora_rank"),
        (["lora_rank=4", "lora_dropout=1.0"], "lora_dropout: 1.0 would drop every adapter input"),
        (["lora_rank=4", "lora_target_modules=[query,moe_wo]"], r"\['moe_wo'\] adapt routed MoE experts; this model"),
        (["lora_rank=97", "model_name=tests/tiny-mixtral", "lora_target_modules=[moe_wi_0]"], "moe_wi_0 projection"),
        (["lora_rank=4", "lora_target_modules=[wkv_a]"], r"no \['wkv_a'\] projection \(attention_type='mha'"),
        (["lora_rank=4", "model_name=tests/tiny-deepseek2", "lora_target_modules=[wq_a]"], "q_lora_rank=0"),
    ],
)
def test_bad_lora_settings_are_config_errors(tmp_path, args, message):
  with pytest.raises(ConfigError, match=message):
    make_config(tmp_path, *args)


def test_decoding_a_lora_config_needs_its_base(tmp_path):
  with pytest.raises(ConfigError, match="load_parameters_path: a LoRA config"):
    api.load("base.yml", base_output_directory=str(tmp_path), **_tiny_keys(), lora_rank=RANK, run_name="none")
  base_path, _ = save_base(tmp_path)
  with pytest.raises(ConfigError, match="run_name: no LoRA adapters found for run 'none'"):
    api.load(
        "base.yml",
        base_output_directory=str(tmp_path),
        **_tiny_keys(),
        lora_rank=RANK,
        run_name="none",
        load_parameters_path=base_path,
    )


# ---------------------------------------------------------------- adapter dropout


def test_adapter_dropout_keeps_its_mean_and_never_touches_the_base_path():
  rngs = nnx.Rngs(params=0)
  layer = linears.DenseGeneral(8, 6, kernel_axes=(None, None), rngs=rngs, lora_rank=2, lora_scale=1.0, lora_dropout=0.5)
  x = jax.random.normal(jax.random.key(1), (4, 8))
  base = np.asarray(x @ layer.kernel[...])
  keys = jax.random.split(jax.random.key(2), 4000)
  # Fresh adapters (B = 0): dropout on the adapter's input changes nothing at all.
  np.testing.assert_array_equal(np.asarray(layer(x, lora_rng=keys[0])), base)
  layer.lora_b[...] = jax.random.normal(jax.random.key(3), layer.lora_b.shape)
  full = np.asarray(layer(x))  # no key: no dropout (evaluation and decoding)
  np.testing.assert_allclose(full, base + np.asarray(x @ layer.lora_a[...] @ layer.lora_b[...]), rtol=1e-5, atol=1e-5)
  dropped = np.stack([np.asarray(layer(x, lora_rng=k)) for k in keys[:8]])
  assert not np.allclose(dropped[0], dropped[1])  # a different mask per key
  # Inverted dropout: over many keys the adapter's output averages to the undropped one.
  mean = np.asarray(jax.vmap(lambda k: layer(x, lora_rng=k))(keys).mean(0))
  np.testing.assert_allclose(mean, full, atol=0.15 * np.abs(full - base).max())


def test_adapter_dropout_acts_in_training_only(tmp_path):
  common = [f"lora_rank={RANK}", "steps=3", "per_device_batch_size=1", "enable_checkpointing=false"]
  plain = losses(train.train(make_config(tmp_path, *common)))
  dropped = losses(train.train(make_config(tmp_path, *common, "lora_dropout=0.5")))
  assert dropped[0] == plain[0]  # step 0: B = 0, so the adapters contribute nothing either way
  assert not np.allclose(dropped[1:], plain[1:])  # the updates saw dropped adapter inputs
  # Evaluation never drops: a model with lora_dropout gives the same logits as without.
  model = model_creation.get_model(make_config(tmp_path, f"lora_rank={RANK}", "lora_dropout=0.5"))  # holds its rngs
  params = jax.tree_util.tree_map_with_path(lambda p, x: x + 0.05 if str(p[-1].key) == "lora_b" else x, params_of(model))
  nnx.update(model, nnx.State(params))
  tokens, positions, segments = mtu.inputs(packed=True)
  got = np.asarray(mtu.forward(model, tokens, positions, segments), np.float64)
  np.testing.assert_array_equal(got, logits_of(make_config(tmp_path, f"lora_rank={RANK}"), params))


# ---------------------------------------------------------------- routed experts

EXPERT_TARGETS = "lora_target_modules=[query,moe_wi_0,moe_wi_1,moe_wo]"


@pytest.mark.parametrize("path", ["dropless", "capacity", "unscanned"])
def test_routed_expert_adapters_merge_to_the_same_logits(tmp_path, path):
  keys = {"dropless": [], "capacity": ["capacity_factor=4.0"], "unscanned": ["scan_layers=false"]}[path]
  config = make_config(tmp_path, "model_name=tests/tiny-mixtral", f"lora_rank={RANK}", EXPERT_TARGETS, *keys)
  params = params_of(model_creation.get_model(config))
  _, adapters = lora.split(params)
  # tiny-mixtral: 2 layers, 4 experts, emb 64, expert MLP 96; query 64 -> 64.
  assert lora.count(adapters) == 2 * RANK * ((64 + 64) + 4 * 3 * (64 + 96))
  experts = [k for k in traverse_util.flatten_dict(adapters) if k[-2] == "wi_0_lora"]
  assert experts and all(k[-1] in lora.ADAPTER_NAMES for k in experts)
  params = jax.tree_util.tree_map_with_path(lambda p, x: x + 0.05 if str(p[-1].key) == "lora_b" else x, params)
  merged = lora.merge(params, lora.scale(config), config.param_scan_axis)
  plain = make_config(tmp_path, "model_name=tests/tiny-mixtral", *keys)
  want = logits_of(plain, merged)
  assert np.abs(want - logits_of(plain, lora.split(params)[0])).max() > 1e-3  # the expert adapters matter
  np.testing.assert_allclose(logits_of(config, params), want, rtol=1e-5, atol=1e-5)


def test_routed_expert_lora_expert_parallel_equals_unsharded(tmp_path):
  common = ["model_name=tests/tiny-mixtral", f"lora_rank={RANK}", EXPERT_TARGETS, "steps=3"]
  common += ["per_device_batch_size=1", "enable_checkpointing=false"]
  replicated = losses(train.train(make_config(tmp_path, *common, "ici_data_parallelism=8")))
  sharded = losses(train.train(make_config(tmp_path, *common, "ici_expert_parallelism=4", "ici_tensor_parallelism=2")))
  np.testing.assert_allclose(sharded, replicated, rtol=1e-5)


def test_peft_export_of_a_run_without_lora_is_a_config_error(tmp_path, capsys):
  with pytest.raises(SystemExit) as exit_info:
    to_huggingface.main(["to_huggingface", "base.yml", *TINY, f"peft_output_path={tmp_path / 'peft'}"])
  assert exit_info.value.code == 2
  assert "peft_output_path: a PEFT adapter comes from a LoRA run; set lora_rank" in capsys.readouterr().err
  assert not (tmp_path / "peft").exists()


# ---------------------------------------------------------------- MLA (DeepSeek)


@pytest.mark.parametrize(
    "model,targets",
    [
        ("tests/tiny-deepseek2", "[query,out,wkv_a,wkv_b,wi_0,moe_wo]"),  # plain query projection
        ("tests/tiny-deepseek3", "[wq_a,wq_b,wkv_a,wkv_b,out]"),  # low-rank query
    ],
)
def test_mla_adapters_merge_and_decode_like_the_merged_model(tmp_path, model, targets):
  """Training's expanded keys/values and decoding's latent cache (which absorbs wkv_b into the query and output)
  both see base + adapters: logits and greedy ids equal the merged model's."""
  keys = [f"model_name={model}", "scan_layers=false"]
  config = make_config(tmp_path, *keys, f"lora_rank={RANK}", f"lora_target_modules={targets}")
  params = params_of(model_creation.get_model(config))
  assert any(k[-2] == "wkv_b" for k in traverse_util.flatten_dict(lora.split(params)[1]))
  params = jax.tree_util.tree_map_with_path(lambda p, x: x + 0.05 if str(p[-1].key) == "lora_b" else x, params)
  merged = lora.merge(params, lora.scale(config), config.param_scan_axis)
  plain = make_config(tmp_path, *keys)
  want = logits_of(plain, merged)
  assert np.abs(want - logits_of(plain, lora.split(params)[0])).max() > 1e-3  # the adapters matter
  np.testing.assert_allclose(logits_of(config, params), want, rtol=1e-5, atol=1e-5)
  prompts = [[3, 17, 42, 9, 100], [7, 7, 1]]
  got = api.Model(config, params).generate(prompts, max_new_tokens=8, stop_on_eos=False)
  assert got == api.Model(plain, merged).generate(prompts, max_new_tokens=8, stop_on_eos=False)
