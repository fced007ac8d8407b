"""DeepSeek V2 / V3 beyond the parity of test_families.py: MTP layers skipped on conversion, MLA's latent-cache
decode against its own full forward, sharded MLA + MoE, YaRN against transformers' rope init, the published ymls
against their checkpoints' config.json, and the checkpoints the converter refuses.
"""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from flax import nnx

from MaxText import pyconfig, sharding
from MaxText.layers import cache, embeddings
from MaxText.layers.mla import MLA
from MaxText.layers.ops import attention as attention_ops
from MaxText.tests import model_test_utils as mtu
from MaxText.tests.model_test_utils import config_of
from MaxText.utils.ckpt_conversion import to_maxtext, weight_mapping

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VERSIONS = ("deepseek2", "deepseek3")


def test_multi_token_prediction_layer_is_skipped(tmp_path_factory, tmp_path):
  """A V3 checkpoint with its MTP layer (numbered after the decoder layers, holding eh_proj) converts as without it."""
  c = mtu.converted(tmp_path_factory, mtu.variant("deepseek3"))
  config = c.config(True)
  tensors = mtu.read_safetensors(c.hf_dir)
  mtp = f"model.layers.{config.num_decoder_layers}"
  extra = {f"{mtp}.eh_proj.weight": (config.emb_dim, 2 * config.emb_dim), f"{mtp}.enorm.weight": (config.emb_dim,)}
  extra[f"{mtp}.self_attn.kv_a_layernorm.weight"] = (config.kv_lora_rank,)
  tensors |= {name: np.ones(shape, np.float32) for name, shape in extra.items()}
  config_json = json.loads((c.hf_dir / "config.json").read_text()) | {"num_nextn_predict_layers": 1}
  mtu.write_checkpoint(tmp_path / "hf", config_json, tensors)
  mtu.assert_converts_like(c, tmp_path / "hf", tmp_path / "mt")


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
  latent = layer.kv_cache
  assert latent.key.shape == (batch, 1, total, config.kv_lora_rank + config.qk_rope_head_dim)
  assert latent.value is None
  assert len(jax.tree.leaves(nnx.state(layer, cache.KVCacheVar))) == 2  # the rows and the lengths
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


def test_mla_flash_equals_dot_product(monkeypatch):
  """attention=flash runs MLA through the splash kernel (values zero-padded to the query/key head width): on packed
  rows its outputs and input gradients equal the dot_product path's (the kernel interpreted on CPU)."""
  config = config_of(model_name="tests/tiny-deepseek3", max_target_length=256)
  layer = MLA(config, rngs=nnx.Rngs(0))
  batch, length = 2, 256
  x = jnp.asarray(np.random.default_rng(2).standard_normal((batch, length, config.emb_dim)), jnp.float32)
  positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
  segments = jnp.asarray(np.where(np.arange(length) < 100, 1, 2)[None].repeat(batch, 0), jnp.int32)
  positions = jnp.where(segments == 1, positions, positions - 100)

  def loss_and_grad():
    fn = lambda layer, x: jnp.sum(jnp.sin(_mla(layer, x, positions, segments, "train")))
    return nnx.value_and_grad(fn, argnums=1)(layer, x)

  want = loss_and_grad()
  kernel = functools.partial(attention_ops.splash_attention, block_size=128, interpret=True)
  monkeypatch.setattr(attention_ops, "splash_attention", kernel)
  layer.attention_kind = "flash"
  got = loss_and_grad()
  assert config.v_head_dim < config.qk_nope_head_dim + config.qk_rope_head_dim  # the padding is exercised
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
  np.testing.assert_allclose(got[1], want[1], atol=2e-5, rtol=1e-4)


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
  layers = nnx.state(model, nnx.Param)["decoder"]["layers"]
  assert any("tensor" in str(v.get_value().sharding.spec) for _, v in layers.flat_state())
  # The latent side of the up-projections splits over fsdp like every embed side (it was whole on every device).
  up = {"/".join(map(str, k)): v.get_value().sharding.spec for k, v in layers.flat_state() if "wkv_b" in map(str, k)}
  assert up and all("fsdp" in str(spec[-3]) for spec in up.values()), up
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
