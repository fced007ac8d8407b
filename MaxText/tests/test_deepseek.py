"""DeepSeek V2 / V3 against transformers: MLA, YaRN with mscale, routed MoE with shared experts after dense layers.

Tiny random-weight transformers models (dims of tests/tiny-deepseek{2,3}.yml: V2 with a plain query projection and
group-limited softmax routing, V3 with a low-rank query, sigmoid routing with a non-zero selection bias and group
limits; both YaRN-scaled) are saved, converted with to_maxtext and checked on the dropless MoE path: logits,
both expert layouts, the exact round trip, greedy generation. MLA's latent-cache decode is checked against its own
full forward; YaRN against transformers' rope init; the published ymls against their checkpoints' config.json.
"""

import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from flax import nnx

from MaxText import pyconfig, sharding
from MaxText.inference import kvcache
from MaxText.layers import embeddings
from MaxText.layers.mla import MLA
from MaxText.tests import forward_pass_logit_checker as checker
from MaxText.tests import model_test_utils as mtu
from MaxText.tests.model_test_utils import config_of
from MaxText.utils.ckpt_conversion import to_huggingface, to_maxtext, weight_mapping
from MaxText.utils.ckpt_conversion.safetensors_io import SafetensorsReader, SafetensorsWriter

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VERSIONS = ("deepseek2", "deepseek3")
SEQ = 24  # longer than the YaRN original context of the tiny ymls (16)


def hf_config(version: str, c):
  """The transformers config of the tiny yml, spelled as a transformers user would (not through our mapping)."""
  rope = {
      "rope_type": "yarn",
      "rope_theta": c.rope_max_timescale,
      "factor": c.rope_scaling_factor,
      "original_max_position_embeddings": c.rope_original_max_position_embeddings,
      "beta_fast": c.rope_yarn_beta_fast,
      "beta_slow": c.rope_yarn_beta_slow,
      "mscale": c.rope_yarn_mscale,
      "mscale_all_dim": c.rope_yarn_mscale_all_dim,
  }
  common = dict(
      vocab_size=c.vocab_size,
      hidden_size=c.emb_dim,
      intermediate_size=c.mlp_dim,
      moe_intermediate_size=c.moe_mlp_dim,
      num_hidden_layers=c.num_decoder_layers,
      num_attention_heads=c.num_query_heads,
      num_key_value_heads=c.num_query_heads,
      n_routed_experts=c.num_experts,
      num_experts_per_tok=c.num_experts_per_tok,
      n_shared_experts=c.shared_experts,
      routed_scaling_factor=c.routed_scaling_factor,
      kv_lora_rank=c.kv_lora_rank,
      q_lora_rank=c.q_lora_rank or None,
      qk_nope_head_dim=c.qk_nope_head_dim,
      qk_rope_head_dim=c.qk_rope_head_dim,
      v_head_dim=c.v_head_dim,
      n_group=c.n_routing_groups,
      topk_group=c.topk_routing_group,
      first_k_dense_replace=c.first_num_dense_layers,
      norm_topk_prob=c.norm_topk_prob,
      max_position_embeddings=c.max_target_length,
      rms_norm_eps=c.normalization_layer_epsilon,
      tie_word_embeddings=False,
      rope_parameters=rope,
  )
  if version == "deepseek2":
    return transformers.DeepseekV2Config(**common, topk_method="group_limited_greedy")
  return transformers.DeepseekV3Config(**common)


def hf_model(version: str, c):
  """Random weights: norm scales around 1, everything else (router, V3's e_score_correction_bias too) non-zero."""
  model = transformers.AutoModelForCausalLM.from_config(hf_config(version, c), attn_implementation="eager")
  torch.manual_seed(0)
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.copy_((1.0 if "norm" in name else 0.0) + (0.3 if "norm" in name else 0.2) * torch.randn_like(p))
    for name, b in model.named_buffers():
      if name.endswith("e_score_correction_bias"):
        b.copy_(0.1 * torch.randn_like(b))
  return model.eval()


def write_fused_checkpoint(model, directory: pathlib.Path):
  """The checkpoint in transformers' in-memory (5.x fused) expert layout: experts.gate_up_proj / experts.down_proj."""
  directory.mkdir()
  tensors = {k: v.detach().numpy() for k, v in model.state_dict().items() if not k.endswith("inv_freq")}
  writer = SafetensorsWriter(directory, [(k, v.shape, v.dtype) for k, v in tensors.items()])
  for name, value in tensors.items():
    writer.write(name, value)
  writer.close()
  model.config.to_json_file(directory / "config.json")
  assert any(k.endswith("experts.gate_up_proj") for k in tensors)


@dataclasses.dataclass
class Converted:
  version: str
  tiny: object
  root: pathlib.Path
  hf: object
  tokens: np.ndarray
  hf_logits: np.ndarray

  @property
  def hf_dir(self) -> pathlib.Path:
    return self.root / "hf"

  def config(self, name: str, **kw):
    return mtu.converted_config(self.root / name, name != "unscanned", **kw)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  cache = {}

  def get(version: str) -> Converted:
    if version not in cache:
      tiny = config_of(model_name=f"tests/tiny-{version}")
      root = tmp_path_factory.mktemp(version)
      model = hf_model(version, tiny)
      model.save_pretrained(root / "hf")
      write_fused_checkpoint(model, root / "hf_fused")
      tokens, logits = mtu.hf_reference(model, tiny.vocab_size, SEQ)
      for name, source, scanned in (("scanned", "hf", True), ("unscanned", "hf", False), ("fused", "hf_fused", True)):
        to_maxtext.convert(str(root / source), str(root / name), [f"scan_layers={str(scanned).lower()}"])
      cache[version] = Converted(version, tiny, root, model, tokens, logits)
    return cache[version]

  return get


@pytest.mark.parametrize("version", VERSIONS)
def test_model_yml_is_the_tiny_yml(version, converted):
  """config.json -> model keys recovers the architecture the tiny yml describes (MLA, YaRN and MoE keys included)."""
  c = converted(version)
  config = c.config("scanned")
  for key in to_maxtext.MODEL_KEYS:
    assert config.get(key) == c.tiny.get(key), key


@pytest.mark.parametrize("version", VERSIONS)
def test_logits_match_transformers(version, converted):
  """Logits of the scanned conversion (the next test shows the other conversions hold the same numbers)."""
  c = converted(version)
  got = checker.maxtext_logits(checker.load_model(c.config("scanned")), c.tokens)
  result = checker.compare(got, c.hf_logits)
  assert result.kl.max() <= 1e-5 and result.max_abs_diff <= 1e-3, checker.report(result, 5)
  assert result.top1_agreement == 1.0


@pytest.mark.parametrize("version", VERSIONS)
def test_all_conversions_hold_the_same_params(version, converted):
  """Unscanned output and a fused-expert (5.x in-memory layout) source give bit-identical params."""
  c = converted(version)
  config = c.config("scanned")
  want = mtu.load_flat_params(config, c.root / "scanned" / "params")
  for name in ("unscanned", "fused"):
    got = mtu.load_flat_params(config, c.root / name / "params")
    assert want.keys() == got.keys()
    for path, value in want.items():
      np.testing.assert_array_equal(value, got[path], err_msg=f"{name}: {'/'.join(map(str, path))}")


def test_multi_token_prediction_layer_is_skipped(converted, tmp_path):
  """A V3 checkpoint with its MTP layer (numbered after the decoder layers, holding eh_proj) converts as without it."""
  c = converted("deepseek3")
  tensors = read_safetensors(c.hf_dir)
  mtp = f"model.layers.{c.tiny.num_decoder_layers}"
  extra = {f"{mtp}.eh_proj.weight": (c.tiny.emb_dim, 2 * c.tiny.emb_dim), f"{mtp}.enorm.weight": (c.tiny.emb_dim,)}
  extra[f"{mtp}.self_attn.kv_a_layernorm.weight"] = (c.tiny.kv_lora_rank,)
  tensors |= {name: np.ones(shape, np.float32) for name, shape in extra.items()}
  (tmp_path / "hf").mkdir()
  writer = SafetensorsWriter(tmp_path / "hf", [(k, v.shape, v.dtype) for k, v in tensors.items()])
  for name, value in tensors.items():
    writer.write(name, value)
  writer.close()
  config_json = json.loads((c.hf_dir / "config.json").read_text()) | {"num_nextn_predict_layers": 1}
  (tmp_path / "hf" / "config.json").write_text(json.dumps(config_json))
  to_maxtext.convert(str(tmp_path / "hf"), str(tmp_path / "mt"), ["scan_layers=true"])
  config = c.config("scanned")
  want, got = mtu.load_flat_params(config, c.root / "scanned" / "params"), mtu.load_flat_params(
      config, tmp_path / "mt" / "params"
  )
  assert want.keys() == got.keys() and all(np.array_equal(v, got[k]) for k, v in want.items())


def read_safetensors(directory) -> dict[str, np.ndarray]:
  reader = SafetensorsReader(directory)
  return {name: reader.read(name) for name in reader.names()}


@pytest.mark.parametrize("version", VERSIONS)
def test_round_trip_reproduces_every_tensor(version, converted, tmp_path):
  """HF -> MaxText (either layout) -> HF: the same tensors bit for bit, and transformers' logits from it unchanged."""
  c = converted(version)
  original = read_safetensors(c.hf_dir)
  for name in ("scanned", "unscanned"):
    out = tmp_path / name
    to_huggingface.convert(c.config(name), str(out))
    back = read_safetensors(out)
    assert sorted(back) == sorted(original)
    for key, value in original.items():
      assert back[key].dtype == value.dtype and np.array_equal(back[key], value), key
  written = json.loads((tmp_path / "scanned" / "config.json").read_text())
  assert written["architectures"] == [type(c.hf).__name__]
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "scanned", attn_implementation="eager")
  with torch.no_grad():
    logits = reloaded.eval()(torch.from_numpy(c.tokens.astype(np.int64))).logits.numpy()
  np.testing.assert_array_equal(logits, c.hf_logits)


@pytest.mark.parametrize("version", VERSIONS)
def test_greedy_generation_matches_transformers(version, converted):
  api = pytest.importorskip("MaxText.api")
  c = converted(version)
  prompts = [[int(t) for t in c.tokens[0, :5]], [int(t) for t in c.tokens[1, :9]]]
  out = c.root / "scanned"
  model = api.load(str(out / "model.yml"), load_parameters_path=str(out / "params"), dtype="float32", run_name="test")
  got = model.generate(prompts, max_new_tokens=24, strategy="greedy", stop_on_eos=False)
  c.hf.generation_config.eos_token_id = None  # never stop early, as stop_on_eos=False does
  for prompt, new in zip(prompts, got):
    with torch.no_grad():
      expected = c.hf.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False, pad_token_id=0)
    assert new == expected[0, len(prompt) :].tolist()


# ---------------------------------------------------------------- MLA decode with the latent cache


@nnx.jit(static_argnames=("model_mode",))
def _mla(layer, x, positions, segment_ids, model_mode):
  return layer(x, positions, segment_ids, model_mode=model_mode)


@pytest.mark.parametrize("version", VERSIONS)
def test_mla_latent_cache_decode_equals_full_forward(version):
  """Prefill of ragged prompts then one token at a time: the same outputs as one causal pass over the sequence,
  while the cache holds one row of kv_lora_rank + qk_rope_head_dim numbers per token (no per-head keys/values)."""
  config = config_of(model_name=f"tests/tiny-{version}")
  layer = MLA(config, rngs=nnx.Rngs(0))
  batch, prefill_len, total = 3, 8, 20
  x = jnp.asarray(np.random.default_rng(1).standard_normal((batch, total, config.emb_dim)), jnp.float32)
  positions = jnp.broadcast_to(jnp.arange(total, dtype=jnp.int32), (batch, total))
  full = _mla(layer, x, positions, None, "train")

  lengths = np.array([3, 8, 5])
  layer.init_cache(batch, total)
  cache = layer.kv_cache
  assert cache.key.shape == (batch, 1, total, config.kv_lora_rank + config.qk_rope_head_dim)
  assert cache.value is None
  assert len(jax.tree.leaves(nnx.state(layer, kvcache.KVCacheVar))) == 2  # the rows and the lengths
  segments = jnp.asarray((np.arange(prefill_len)[None] < lengths[:, None]).astype(np.int32))
  prefill = _mla(layer, x[:, :prefill_len], positions[:, :prefill_len], segments, "prefill")
  for row, n in enumerate(lengths):
    np.testing.assert_allclose(prefill[row, :n], full[row, :n], atol=2e-5, rtol=1e-5)
  steps = total - lengths.max()
  rows = np.arange(batch)
  for t in range(steps):
    index = lengths + t
    step = _mla(layer, x[rows, index][:, None], jnp.asarray(index)[:, None], None, "autoregressive")
    np.testing.assert_allclose(step[:, 0], full[rows, index], atol=2e-5, rtol=1e-5, err_msg=f"step {t}")


def test_sharded_forward_equals_unsharded():
  """fsdp=2 x tensor=2 x expert=2 on 8 devices (heads, experts and the MLA projections split): packed-sequence logits
  equal the unsharded model's."""
  tokens, positions, segments = mtu.inputs(packed=True)
  want = mtu.forward(mtu.build(model_name="tests/tiny-deepseek2"), tokens, positions, segments)
  mesh_kw = dict(ici_fsdp_parallelism=2, ici_tensor_parallelism=2, ici_expert_parallelism=2)
  config = mtu.config_of(model_name="tests/tiny-deepseek2", **mesh_kw)
  model = mtu.build(model_name="tests/tiny-deepseek2", **mesh_kw)
  mesh = sharding.create_mesh(config)
  state = nnx.state(model, nnx.Param)
  shardings = sharding.state_shardings(state, config.logical_axis_rules, mesh)
  with sharding.use_mesh(mesh, config.logical_axis_rules):
    nnx.update(model, jax.device_put(state, shardings))
    got = mtu.forward(model, tokens, positions, segments)
  wkv_b = nnx.state(model, nnx.Param)["decoder"]["layers"]
  assert any("tensor" in str(v.get_value().sharding.spec) for _, v in wkv_b.flat_state())
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=1e-5)


# ---------------------------------------------------------------- YaRN


YARN_CASES = {
    # DeepSeek-V3 (mscale = mscale_all_dim: amplitude 1, softmax scale corrected)
    "v3": dict(dim=64, theta=10000.0, factor=40.0, original=4096, beta_fast=32, beta_slow=1, mscale=1.0, all_dim=1.0),
    # DeepSeek-V2(-Lite)
    "v2": dict(dim=64, theta=10000.0, factor=40.0, original=4096, beta_fast=32, beta_slow=1, mscale=0.707, all_dim=0.707),
    # unequal mscales: amplitude != 1 as well
    "tiny-v3": dict(dim=8, theta=10000.0, factor=4.0, original=16, beta_fast=32, beta_slow=1, mscale=1.0, all_dim=0.8),
    # no mscales (generic YaRN: amplitude 0.1 ln(factor) + 1, no softmax correction), other betas and theta
    "plain": dict(dim=32, theta=500000.0, factor=8.0, original=2048, beta_fast=16, beta_slow=2, mscale=0, all_dim=0),
}


@pytest.mark.parametrize("case", sorted(YARN_CASES))
def test_yarn_matches_transformers(case):
  p = YARN_CASES[case]
  rope = {
      "rope_type": "yarn",
      "rope_theta": p["theta"],
      "factor": p["factor"],
      "original_max_position_embeddings": p["original"],
      "beta_fast": p["beta_fast"],
      "beta_slow": p["beta_slow"],
  }
  rope |= {k: v for k, v in (("mscale", p["mscale"]), ("mscale_all_dim", p["all_dim"])) if v}
  hf = transformers.DeepseekV3Config(
      hidden_size=64,
      num_attention_heads=2,
      qk_rope_head_dim=p["dim"],
      max_position_embeddings=163840,
      rope_parameters=rope,
  )
  hf_inv_freq, hf_amplitude = transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS["yarn"](hf)
  from transformers.models.deepseek_v3 import modeling_deepseek_v3  # pylint: disable=import-outside-toplevel

  hf_softmax = modeling_deepseek_v3.yarn_apply_mscale(hf.rope_parameters, 1.0)
  keys = weight_mapping.rope_keys(weight_mapping.HFConfig({"rope_parameters": rope}).rope(), 163840)
  ours = embeddings.RotaryEmbedding(
      head_dim=p["dim"],
      rope_type=keys["rope_type"],
      max_timescale=keys["rope_max_timescale"],
      scaling_factor=keys["rope_scaling_factor"],
      original_max_position_embeddings=keys["rope_original_max_position_embeddings"],
      yarn_beta_fast=keys["rope_yarn_beta_fast"],
      yarn_beta_slow=keys["rope_yarn_beta_slow"],
      yarn_mscale=keys["rope_yarn_mscale"],
      yarn_mscale_all_dim=keys["rope_yarn_mscale_all_dim"],
  )
  np.testing.assert_allclose(ours.inv_frequencies(), hf_inv_freq.numpy(), rtol=1e-6)
  assert ours.amplitude() == pytest.approx(hf_amplitude, rel=1e-12)
  assert ours.softmax_scale_multiplier() == pytest.approx(hf_softmax, rel=1e-12)
  # The interpolated and the kept ends both occur (else the ramp is not exercised).
  ratio = ours.inv_frequencies() / embeddings.rope_inv_frequencies(p["dim"], max_timescale=p["theta"])
  assert ratio.max() == pytest.approx(1.0) and ratio.min() == pytest.approx(1 / p["factor"], rel=1e-5)


# ---------------------------------------------------------------- published configs and bad input


# config.json of the published checkpoints (transformers 4.x spelling: rope_theta + rope_scaling) and their ymls.
_YARN_V2 = {
    "type": "yarn",
    "factor": 40,
    "original_max_position_embeddings": 4096,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 0.707,
    "mscale_all_dim": 0.707,
}
_COMMON = {
    "hidden_act": "silu",
    "kv_lora_rank": 512,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "rms_norm_eps": 1e-06,
    "rope_theta": 10000,
    "tie_word_embeddings": False,
    "max_position_embeddings": 163840,
    "attention_bias": False,
}
HUB_CONFIGS = {
    "deepseek2-16b": _COMMON
    | {
        "architectures": ["DeepseekV2ForCausalLM"],
        "model_type": "deepseek_v2",
        "vocab_size": 102400,
        "hidden_size": 2048,
        "intermediate_size": 10944,
        "moe_intermediate_size": 1408,
        "num_hidden_layers": 27,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "q_lora_rank": None,
        "n_routed_experts": 64,
        "n_shared_experts": 2,
        "num_experts_per_tok": 6,
        "first_k_dense_replace": 1,
        "moe_layer_freq": 1,
        "topk_method": "greedy",
        "n_group": 1,
        "topk_group": 1,
        "routed_scaling_factor": 1.0,
        "norm_topk_prob": False,
        "scoring_func": "softmax",
        "rope_scaling": _YARN_V2,
    },
    "deepseek2-236b": _COMMON
    | {
        "architectures": ["DeepseekV2ForCausalLM"],
        "model_type": "deepseek_v2",
        "vocab_size": 102400,
        "hidden_size": 5120,
        "intermediate_size": 12288,
        "moe_intermediate_size": 1536,
        "num_hidden_layers": 60,
        "num_attention_heads": 128,
        "num_key_value_heads": 128,
        "q_lora_rank": 1536,
        "n_routed_experts": 160,
        "n_shared_experts": 2,
        "num_experts_per_tok": 6,
        "first_k_dense_replace": 1,
        "moe_layer_freq": 1,
        "topk_method": "group_limited_greedy",
        "n_group": 8,
        "topk_group": 3,
        "routed_scaling_factor": 16.0,
        "norm_topk_prob": False,
        "scoring_func": "softmax",
        "rope_scaling": _YARN_V2,
    },
    "deepseek3-671b": _COMMON
    | {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "vocab_size": 129280,
        "hidden_size": 7168,
        "intermediate_size": 18432,
        "moe_intermediate_size": 2048,
        "num_hidden_layers": 61,
        "num_attention_heads": 128,
        "num_key_value_heads": 128,
        "q_lora_rank": 1536,
        "n_routed_experts": 256,
        "n_shared_experts": 1,
        "num_experts_per_tok": 8,
        "first_k_dense_replace": 3,
        "moe_layer_freq": 1,
        "topk_method": "noaux_tc",
        "n_group": 8,
        "topk_group": 4,
        "routed_scaling_factor": 2.5,
        "norm_topk_prob": True,
        "scoring_func": "sigmoid",
        "num_nextn_predict_layers": 1,
        "rope_scaling": _YARN_V2 | {"mscale": 1.0, "mscale_all_dim": 1.0},
    },
}


@pytest.mark.parametrize("model_name", sorted(HUB_CONFIGS))
def test_published_config_json_is_the_model_yml(model_name):
  _, keys = to_maxtext.model_keys(HUB_CONFIGS[model_name])
  yml = yaml.safe_load((pyconfig.CONFIGS_DIR / "models" / f"{model_name}.yml").read_text())
  defaults = to_maxtext.base_defaults()
  for key, value in keys.items():
    assert yml.get(key, defaults[key]) == value, key


@pytest.mark.parametrize(
    "change, message",
    [
        ({"rope_interleave": False}, "rope_interleave"),
        ({"num_key_value_heads": 64}, "num_key_value_heads"),
        ({"rope_scaling": _YARN_V2 | {"truncate": False}}, "truncate"),
        ({"attention_bias": True}, "attention_bias"),
    ],
)
def test_unsupported_checkpoints_are_refused_by_name(change, message):
  with pytest.raises(weight_mapping.UnsupportedCheckpointError, match=message):
    to_maxtext.model_keys(HUB_CONFIGS["deepseek3-671b"] | change)
