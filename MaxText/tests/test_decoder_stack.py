"""The decoder stack: scanned vs unrolled layers, remat policies, dropout keys, and scan-layout conversion."""

import jax
import numpy as np
import pytest
from flax import nnx

from MaxText.layers import model_creation, scan_layout
from MaxText.layers.decoders import REMAT_POLICIES
from MaxText.tests.model_test_utils import build, config_of, forward, inputs, loss_and_grad, loss_fn, loss_logits_and_grad


@pytest.mark.parametrize("param_scan_axis", [0, 1])
def test_scan_and_unrolled_give_same_logits_loss_and_grads(param_scan_axis):
  scanned = build(param_scan_axis=param_scan_axis)
  unrolled = build(param_scan_axis=param_scan_axis, scan_layers=False)
  tokens, positions, segments = inputs(packed=True)
  loss_s, logits_s, grads_s = loss_logits_and_grad(scanned, tokens, positions, segments)
  loss_u, logits_u, grads_u = loss_logits_and_grad(unrolled, tokens, positions, segments)
  np.testing.assert_allclose(logits_s, logits_u, atol=1e-5)
  np.testing.assert_allclose(loss_s, loss_u, rtol=1e-6)
  grads_u = scan_layout.unscanned_to_scanned(grads_u, param_scan_axis)
  # rtol: the two programs sum in different orders; on an AVX-512 host a gradient of 2.4 differed by 6e-7 relative
  # (a few float32 ulps), past atol alone. A wrong layer mapping differs by O(1).
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5), grads_s, grads_u)


@pytest.mark.parametrize("scan_layers,policies", [(True, tuple(REMAT_POLICIES)), (False, ("none", "full"))])
def test_every_remat_policy_gives_same_loss_and_grads(scan_layers, policies):
  tokens, positions, segments = inputs(packed=True)
  reference = None
  for policy in policies:
    model = build(remat_policy=policy, scan_layers=scan_layers)
    loss, grads = loss_and_grad(model, tokens, positions, segments)
    if reference is None:
      reference = (loss, grads)
      continue
    np.testing.assert_allclose(loss, reference[0], rtol=1e-6, err_msg=policy)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(reference[1])):
      np.testing.assert_allclose(got, want, atol=1e-6, err_msg=policy)


def test_remat_policies_change_what_is_saved():
  """The policies must really differ: each saves strictly less for the backward pass than the next."""
  tokens, positions, segments = inputs()
  counts = {}
  order = ("full", "save_qkv_proj", "save_dot_except_mlp", "minimal", "none")
  for policy in order:
    model = build(remat_policy=policy, scan_layers=False)
    graphdef, params = nnx.split(model)

    def residual_bytes(p, g=graphdef):
      _, vjp = jax.vjp(lambda q: loss_fn(nnx.merge(g, q), tokens, positions, segments), p)
      return jax.tree.leaves(vjp)  # the vjp closure holds exactly the saved residuals

    counts[policy] = sum(x.size * x.dtype.itemsize for x in jax.eval_shape(residual_bytes, params))
  sizes = [counts[p] for p in order]
  assert sizes == sorted(set(sizes)), counts


def test_dropout_only_when_training_and_same_for_scan_and_unrolled():
  kw = dict(dropout_rate=0.3)
  tokens, positions, segments = inputs(packed=True)
  scanned = build(**kw)
  unrolled = build(scan_layers=False, **kw)
  eval_logits = forward(scanned, tokens, positions, segments)

  @nnx.jit
  def train_logits_from_key(model, key):
    return model(tokens, positions, segments, deterministic=False, rngs=nnx.Rngs(dropout=key))

  train_logits = lambda model, seed: train_logits_from_key(model, jax.random.key(seed))
  a, b, c = train_logits(scanned, 0), train_logits(scanned, 0), train_logits(scanned, 1)
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c) and not np.allclose(a, eval_logits)
  np.testing.assert_allclose(train_logits(unrolled, 0), a, atol=1e-5)
  # The model's own stream advances, so consecutive training calls draw different masks.
  first = forward(scanned, tokens, positions, segments, deterministic=False)
  second = forward(scanned, tokens, positions, segments, deterministic=False)
  assert not np.allclose(first, second)


def test_scan_layout_round_trips_states_and_pure_dicts():
  config = config_of()
  state = nnx.state(build(), nnx.Param)
  unscanned = scan_layout.scanned_to_unscanned(state, config.param_scan_axis)
  layer0 = unscanned["decoder"]["layers"][0]["self_attention"]["query"]["kernel"]
  assert layer0.get_value().shape == (64, 4, 16)
  assert tuple(layer0.get_metadata()["out_sharding"]) == ("embed", "q_heads", "kv")
  back = scan_layout.unscanned_to_scanned(unscanned, config.param_scan_axis)
  assert jax.tree.structure(back) == jax.tree.structure(state)
  jax.tree.map(np.testing.assert_array_equal, back, state)
  kernel = back["decoder"]["layers"]["mlp"]["wo"]["kernel"]
  assert tuple(kernel.get_metadata()["out_sharding"]) == ("mlp", "layers", "embed")
  pure = scan_layout.scanned_to_unscanned(state.to_pure_dict(), config.param_scan_axis)
  assert sorted(pure["decoder"]["layers"]) == [0, 1]
  jax.tree.map(np.testing.assert_array_equal, scan_layout.unscanned_to_scanned(pure, 1), state.to_pure_dict())
  abstract = nnx.state(model_creation.abstract_model(config), nnx.Param)
  abstract_unscanned = scan_layout.scanned_to_unscanned(abstract, config.param_scan_axis)
  assert abstract_unscanned["decoder"]["layers"][1]["mlp"]["wo"]["kernel"].get_value().shape == (128, 64)
