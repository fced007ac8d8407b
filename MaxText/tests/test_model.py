"""Transformer behaviour: masking through the whole model, attention kinds, logits head, dtypes, sharding, sizes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from MaxText import sharding
from MaxText.layers import model_creation
from MaxText.tests.model_test_utils import B, S, build, config_of, forward, inputs, loss_logits_and_grad, make_config


@pytest.mark.parametrize("attention", ["dot_product", "autoselected"])
def test_packed_segments_are_independent_and_positions_restart(attention):
  model = build(attention=attention)
  tokens, positions, segments = inputs(packed=True)
  logits = np.asarray(forward(model, tokens, positions, segments))
  # Changing segment 1 leaves segment 2 (and padding-free row 1) untouched.
  changed = tokens.copy()
  changed[0, :9] = (changed[0, :9] + 7) % 256
  logits_changed = np.asarray(forward(model, changed, positions, segments))
  np.testing.assert_allclose(logits_changed[0, 9:20], logits[0, 9:20], atol=1e-5)
  assert np.abs(logits_changed[0, :9] - logits[0, :9]).max() > 1e-3
  # Segment 2 gives the same logits as the same 11 tokens alone at the start of a row: positions restart.
  alone = np.zeros_like(tokens)
  alone[:, :11] = tokens[0, 9:20]
  alone_positions = np.broadcast_to(np.arange(S, dtype=np.int32), (B, S)).copy()
  logits_alone = np.asarray(forward(model, alone, alone_positions, None))
  np.testing.assert_allclose(logits_alone[0, :11], logits[0, 9:20], atol=1e-5)


def test_causal_future_tokens_do_not_change_past_logits():
  model = build()
  tokens, positions, _ = inputs()
  logits = np.asarray(forward(model, tokens, positions, None))
  changed = tokens.copy()
  changed[:, 10:] = (changed[:, 10:] + 1) % 256
  logits_changed = np.asarray(forward(model, changed, positions, None))
  np.testing.assert_allclose(logits_changed[:, :10], logits[:, :10], atol=1e-5)
  assert np.abs(logits_changed[:, 10:] - logits[:, 10:]).max() > 1e-3


@pytest.mark.parametrize("attention", ["dot_product", "autoselected"])
def test_sliding_window_hides_tokens_outside_the_window(attention):
  config = config_of(model_name="tests/tiny-mistral", attention=attention)
  window, layers = config.sliding_window_size, config.num_decoder_layers
  model = build(model_name="tests/tiny-mistral", attention=attention)
  tokens, positions, _ = inputs()
  logits = np.asarray(forward(model, tokens, positions, None))
  changed = tokens.copy()
  changed[:, 0] = (changed[:, 0] + 1) % 256
  logits_changed = np.asarray(forward(model, changed, positions, None))
  reach = layers * (window - 1)  # each layer lets information travel window-1 tokens
  np.testing.assert_allclose(logits_changed[:, reach + 1 :], logits[:, reach + 1 :], atol=1e-5)
  assert np.abs(logits_changed[:, reach] - logits[:, reach]).max() > 1e-4
  # Without the window the same change reaches the end of the sequence.
  full = build(model_name="tests/tiny-mistral", sliding_window_size=0)
  delta = np.asarray(forward(full, changed, positions, None)) - np.asarray(forward(full, tokens, positions, None))
  assert np.abs(delta[:, reach + 1 :]).max() > 1e-4


@pytest.mark.parametrize("model_name", ["tests/tiny-llama", "tests/tiny-mistral"])
def test_autoselected_equals_dot_product(model_name):
  dot = build(model_name=model_name)
  auto = build(model_name=model_name, attention="autoselected")
  for packed in (False, True):
    tokens, positions, segments = inputs(seed=1, packed=packed)
    np.testing.assert_allclose(
        forward(auto, tokens, positions, segments), forward(dot, tokens, positions, segments), atol=2e-5
    )


def test_tied_and_untied_logits():
  tokens, positions, _ = inputs()
  untied = build()
  tied = build(logits_via_embedding=True)
  assert "logits_dense" in nnx.state(untied, nnx.Param) and "logits_dense" not in nnx.state(tied, nnx.Param)
  assert model_creation.param_count(untied) - model_creation.param_count(tied) == 64 * 256
  # Tied logits equal untied ones whose output kernel is the transposed embedding table.
  params = nnx.state(untied, nnx.Param)
  params["logits_dense"]["kernel"].set_value(params["token_embedder"]["embedding"].get_value().T)
  nnx.update(untied, params)
  tied_logits = forward(tied, tokens, positions, None)
  assert tied_logits.shape == (B, S, 256)
  np.testing.assert_allclose(tied_logits, forward(untied, tokens, positions, None), atol=1e-4, rtol=1e-5)


def test_final_logits_soft_cap_bounds_logits():
  tokens, positions, _ = inputs()
  model = build(final_logits_soft_cap=2.0, logits_via_embedding=True)
  logits = np.asarray(forward(model, tokens, positions, None))
  assert np.abs(logits).max() <= 2.0
  uncapped = build(logits_via_embedding=True)
  uncapped_logits = np.asarray(forward(uncapped, tokens, positions, None))
  assert np.abs(uncapped_logits).max() > 2.0
  np.testing.assert_allclose(logits, 2.0 * np.tanh(uncapped_logits / 2.0), atol=1e-5)


def test_qk_norm_adds_params_and_changes_output():
  tokens, positions, _ = inputs()
  plain = build()
  normed = build(use_qk_norm=True)
  attn = nnx.state(normed, nnx.Param)["decoder"]["layers"]["self_attention"]
  assert attn["query_norm"]["scale"].get_value().shape == (16, 2)
  assert not np.allclose(forward(plain, tokens, positions, None), forward(normed, tokens, positions, None), atol=1e-3)


def test_bf16_runs_and_tracks_f32():
  tokens, positions, segments = inputs(packed=True)
  ref = np.asarray(forward(build(), tokens, positions, segments))
  bf16 = build(dtype="bfloat16", weight_dtype="bfloat16")
  assert {p.dtype for p in jax.tree.leaves(nnx.state(bf16, nnx.Param))} == {jnp.dtype(jnp.bfloat16)}
  loss, logits, grads = loss_logits_and_grad(bf16, tokens, positions, segments)
  assert logits.dtype == jnp.float32  # cast_logits_to_fp32
  assert all(g.dtype == jnp.bfloat16 and np.isfinite(np.asarray(g, np.float32)).all() for g in jax.tree.leaves(grads))
  assert np.isfinite(loss)
  err = np.abs(np.asarray(logits) - ref).mean()
  assert err < 0.05 * np.abs(ref).mean(), err
  # The logits matmul in float32 (bf16 activations and weights otherwise) is at least as close to the f32 model.
  fp32_dot = np.asarray(
      forward(build(dtype="bfloat16", weight_dtype="bfloat16", logits_dot_in_fp32=True), tokens, positions, segments)
  )
  assert np.abs(fp32_dot - ref).mean() <= err * 1.05


EXPECTED_NAMES = {
    ("token_embedder", "embedding"): ("vocab", "embed"),
    ("decoder", "layers", "self_attention", "query", "kernel"): ("embed", "layers", "q_heads", "kv"),
    ("decoder", "layers", "self_attention", "key", "kernel"): ("embed", "layers", "kv_heads", "kv"),
    ("decoder", "layers", "self_attention", "value", "kernel"): ("embed", "layers", "kv_heads", "kv"),
    ("decoder", "layers", "self_attention", "out", "kernel"): ("heads", "layers", "kv", "embed"),
    ("decoder", "layers", "mlp", "wi_0", "kernel"): ("embed", "layers", "mlp"),
    ("decoder", "layers", "mlp", "wi_1", "kernel"): ("embed", "layers", "mlp"),
    ("decoder", "layers", "mlp", "wo", "kernel"): ("mlp", "layers", "embed"),
    ("decoder", "layers", "pre_self_attention_layer_norm", "scale"): ("norm", "layers"),
    ("decoder", "layers", "post_self_attention_layer_norm", "scale"): ("norm", "layers"),
    ("decoder_norm", "scale"): ("norm",),
    ("logits_dense", "kernel"): ("embed", "vocab"),
}

# fsdp=4, tensor=2: every "embed" dim over fsdp, every heads/mlp/vocab dim over tensor.
EXPECTED_SPECS = {
    ("token_embedder", "embedding"): ("tensor", "fsdp"),
    ("decoder", "layers", "self_attention", "query", "kernel"): ("fsdp", None, "tensor"),
    ("decoder", "layers", "self_attention", "key", "kernel"): ("fsdp", None, "tensor"),
    ("decoder", "layers", "self_attention", "value", "kernel"): ("fsdp", None, "tensor"),
    ("decoder", "layers", "self_attention", "out", "kernel"): ("tensor", None, None, "fsdp"),
    ("decoder", "layers", "mlp", "wi_0", "kernel"): ("fsdp", None, "tensor"),
    ("decoder", "layers", "mlp", "wi_1", "kernel"): ("fsdp", None, "tensor"),
    ("decoder", "layers", "mlp", "wo", "kernel"): ("tensor", None, "fsdp"),
    ("decoder", "layers", "pre_self_attention_layer_norm", "scale"): (),
    ("decoder", "layers", "post_self_attention_layer_norm", "scale"): (),
    ("decoder_norm", "scale"): (),
    ("logits_dense", "kernel"): ("fsdp", "tensor"),
}


def test_params_have_logical_names_and_shard_on_8_devices():
  config = config_of(ici_fsdp_parallelism=4, ici_tensor_parallelism=2)
  abstract = nnx.state(model_creation.abstract_model(config), nnx.Param)
  names = {path: tuple(v.get_metadata()["out_sharding"]) for path, v in abstract.flat_state()}
  assert names == EXPECTED_NAMES
  mesh = sharding.create_mesh(config)
  with sharding.use_mesh(mesh, config.logical_axis_rules):  # abstract init must not depend on the active mesh
    inside = nnx.state(model_creation.abstract_model(config), nnx.Param)
  assert jax.tree.structure(inside) == jax.tree.structure(abstract)
  model = model_creation.create_sharded_model(config, mesh)
  params = nnx.state(model, nnx.Param)
  for path, var in params.flat_state():
    value = var.get_value()
    assert tuple(value.sharding.spec) == EXPECTED_SPECS[path], path
    shard = value.addressable_shards[0].data.shape
    assert np.prod(shard) * np.prod([mesh.shape[a] for a in EXPECTED_SPECS[path] if a]) == value.size, path
  # Same values as an unsharded init, and the sharded forward pass (activation constraints on) matches.
  single = model_creation.get_model(config)
  jax.tree.map(np.testing.assert_array_equal, params, nnx.state(single, nnx.Param))
  tokens, positions, segments = inputs(packed=True)
  with sharding.use_mesh(mesh, config.logical_axis_rules):
    sharded_logits = forward(model, tokens, positions, segments)
  np.testing.assert_allclose(sharded_logits, forward(single, tokens, positions, segments), atol=2e-5)


def _llama_param_formula(c):
  attn = c.emb_dim * c.head_dim * (2 * c.num_query_heads + 2 * c.num_kv_heads)
  layer = attn + 3 * c.emb_dim * c.mlp_dim + 2 * c.emb_dim
  return c.num_decoder_layers * layer + 2 * c.vocab_size * c.emb_dim + c.emb_dim


@pytest.mark.parametrize(
    "model_name,published",
    [
        ("llama2-7b", 6_738_415_616),
        ("llama2-13b", 13_015_864_320),
        ("llama2-70b", 68_976_648_192),
        ("llama3-8b", 8_030_261_248),
        ("llama3-70b", None),
        ("llama3.1-8b", 8_030_261_248),
        ("llama3.1-70b", None),
        ("llama3.1-405b", None),
        ("llama3.3-70b", None),
        ("mistral-7b", 7_241_732_096),
        ("llama-small", None),
    ],
)
def test_published_model_sizes(model_name, published):
  config = make_config(model_name=model_name)
  count = model_creation.param_count(model_creation.abstract_model(config))
  assert count == _llama_param_formula(config)
  if published is not None:
    assert count == published
