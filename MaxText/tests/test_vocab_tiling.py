"""num_vocab_tiling: the head + loss over sequence chunks gives the unchunked loss and gradients (every head kind,
either head_loss path, one device and fsdp over 8), and on a TPU compile it lowers the step's temporaries."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from MaxText import pyconfig, sharding, training
from MaxText.config.declare import ConfigError
from MaxText.layers import ops
from MaxText.layers.ops import head_loss
from MaxText.tests import model_test_utils


def _assert_trees_close(got, want, rtol=1e-5):
  """Leaves equal to rtol, or to rtol/10 of the leaf's largest entry (sums over chunks add in another order)."""
  pure = lambda t: nnx.to_pure_dict(t) if isinstance(t, nnx.State) else t
  got, want = jax.tree.map(pure, got, is_leaf=lambda t: isinstance(t, nnx.State)), jax.tree.map(
      pure, want, is_leaf=lambda t: isinstance(t, nnx.State)
  )
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    w = np.asarray(w)
    np.testing.assert_allclose(np.asarray(g), w, rtol=rtol, atol=rtol / 10 * np.abs(w).max())


@pytest.mark.parametrize("head", ops.HEAD_LOSSES)
@pytest.mark.parametrize("model_name", ["tests/tiny-llama", "tests/tiny-gemma", "tests/tiny-gemma2"])
def test_tiled_loss_and_grads_equal_the_unchunked_path(model_name, head):
  """Transformer.cross_entropy of a separate head, a tied embedding head and a soft-capped head, with z-loss and
  padding: gradients for the head's params and the hidden states."""
  model = model_test_utils.build(model_name=model_name, head_loss=head)
  rng = np.random.default_rng(0)
  hidden = jnp.asarray(rng.standard_normal((2, 24, model.decoder_norm.scale.shape[0])), jnp.float32)
  targets = jnp.asarray(rng.integers(0, 256, (2, 24)), jnp.int32)
  weights = jnp.ones((2, 24)).at[0, 20:].set(0.0)

  def loss(model, hidden, tiles):
    total, z = head_loss.tiled_cross_entropy(model, hidden, targets, 1e-3, tiles)
    return jnp.sum(total * weights) + jnp.sum(z)

  def value_and_grads(tiles):
    return nnx.jit(nnx.value_and_grad(lambda m, h: loss(m, h, tiles), argnums=(0, 1)))(model, hidden)

  want = value_and_grads(1)
  for tiles in (4, 3):  # 24 tokens per row: chunks of 6 and 8
    got = value_and_grads(tiles)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    _assert_trees_close(got[1], want[1])


def _train_loss_and_grads(config, params, batch):
  mesh = sharding.create_mesh(config)
  setup = training.TrainSetup(config, mesh)
  params = jax.device_put(params, setup.param_shardings)
  loss = lambda p: training.loss_sums(setup, p, batch, jax.random.key(0), deterministic=True)[0]
  with sharding.use_mesh(mesh, config.logical_axis_rules):
    return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.parametrize("head", ops.HEAD_LOSSES)
def test_train_loss_with_fsdp_over_8_devices_equals_unchunked(head):
  """The training loss (training.loss_sums) with the batch and params sharded over fsdp=8."""
  kw = dict(per_device_batch_size=1, max_target_length=32, ici_fsdp_parallelism=8, head_loss=head, z_loss_multiplier=1e-3)
  params = nnx.to_pure_dict(nnx.state(model_test_utils.build(**kw), nnx.Param))
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 256, (8, 32)).astype(np.int32)
  segments = np.ones((8, 32), np.int32)
  segments[:, 28:] = 0  # padding at the end of every row
  batch = {
      "inputs": tokens,
      "inputs_position": np.broadcast_to(np.arange(32, dtype=np.int32), (8, 32)),
      "inputs_segmentation": segments,
      "targets": np.roll(tokens, -1, axis=1),
      "targets_segmentation": segments,
  }
  want = _train_loss_and_grads(model_test_utils.make_config(**kw), params, batch)
  got = _train_loss_and_grads(model_test_utils.make_config(num_vocab_tiling=4, **kw), params, batch)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
  _assert_trees_close(got[1], want[1])


def test_tiles_must_divide_the_sequence():
  with pytest.raises(ConfigError, match="num_vocab_tiling: 3 chunks do not divide .* max_target_length=32"):
    model_test_utils.make_config(num_vocab_tiling=3, max_target_length=32)


def test_tpu_compile_temporaries_drop_with_tiling():
  """v5e-8, vocab 32768, 1024 tokens per device: float32 logits are 128 MiB per device (and their gradient as
  much); 4 chunks keep a quarter of that live."""
  pytest.importorskip("libtpu")
  from MaxText import train_compile  # pylint: disable=import-outside-toplevel

  temp = {}
  for tiles in (1, 4):
    argv = [
        "",
        str(pyconfig.CONFIGS_DIR / "base.yml"),
        "compile_topology=v5e-8",
        "base_emb_dim=256",
        "base_num_query_heads=4",
        "base_num_kv_heads=4",
        "base_mlp_dim=512",
        "base_num_decoder_layers=1",
        "vocab_size=32768",
        "max_target_length=1024",
        "per_device_batch_size=1",
        f"num_vocab_tiling={tiles}",
    ]
    compiled, _ = train_compile.compile_train_step(pyconfig.initialize(argv))
    temp[tiles] = compiled.memory_analysis().temp_size_in_bytes
  logits_bytes = 1024 * 32768 * 4
  assert temp[4] < temp[1] - logits_bytes / 2, temp
