"""Hand-written backward passes (dense_dot, the fused head cross-entropy, causal query blocks) against autodiff."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from MaxText.layers import attentions, linears, losses


def _normal(seed, shape, scale=1.0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * scale)


def _assert_trees_close(got, want, atol, rtol):
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32), atol=atol, rtol=rtol)


@pytest.mark.parametrize(
    "x_shape,k_shape,n_in",
    [
        ((3, 5, 8), (8, 6), 1),  # [B, S, E] x [E, F]
        ((2, 4, 8), (8, 3, 2), 1),  # q/k/v projection: [E, heads, head_dim]
        ((2, 4, 3, 2), (3, 2, 8), 2),  # output projection: [heads, head_dim, E]
        ((7, 8), (8, 5), 1),  # no sequence axis
    ],
)
def test_dense_dot_value_and_gradients_equal_dot_general(x_shape, k_shape, n_in):
  x, kernel = _normal(0, x_shape), _normal(1, k_shape)
  cotangent = _normal(2, x_shape[: len(x_shape) - n_in] + k_shape[n_in:])

  def plain(x, kernel):
    contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
    return jax.lax.dot_general(x, kernel, (contract, ((), ())))

  def loss(fn):
    return lambda x, kernel: jnp.sum(fn(x, kernel) * cotangent)

  got = jax.value_and_grad(loss(lambda x, k: linears.dense_dot(x, k, n_in)), argnums=(0, 1))(x, kernel)
  want = jax.value_and_grad(loss(plain), argnums=(0, 1))(x, kernel)
  _assert_trees_close(got, want, atol=1e-5, rtol=1e-5)


def _unfused_loss(x, kernel, targets, z, vocab_major, weights, dtype=jnp.float32):
  spec = "bse,ve->bsv" if vocab_major else "bse,ev->bsv"
  logits = jnp.einsum(spec, x.astype(dtype), kernel.astype(dtype)).astype(jnp.float32)
  total, z_loss = losses.cross_entropy(logits, targets, z)
  return jnp.sum(total * weights) + 0.3 * jnp.sum(z_loss * weights)


def _fused_loss(x, kernel, targets, z, vocab_major, weights, dtype=jnp.float32):
  total, z_loss = losses.head_cross_entropy(x, kernel, targets, z, vocab_major, dtype)
  return jnp.sum(total * weights) + 0.3 * jnp.sum(z_loss * weights)


@pytest.mark.parametrize("vocab_major", [False, True])  # a separate head [E, V] or a tied embedding [V, E]
@pytest.mark.parametrize("z_loss", [0.0, 1e-2])
def test_fused_head_cross_entropy_equals_unfused(vocab_major, z_loss):
  b, s, e, v = 2, 6, 16, 40
  x = _normal(0, (b, s, e))
  kernel = _normal(1, (v, e) if vocab_major else (e, v), 0.5)
  targets = jnp.asarray(np.random.default_rng(2).integers(0, v, (b, s)), jnp.int32)
  weights = _normal(3, (b, s))  # any per-token cotangent, masks included
  args = (x, kernel, targets, z_loss, vocab_major, weights)
  want = jax.value_and_grad(_unfused_loss, argnums=(0, 1))(*args)
  got = jax.value_and_grad(_fused_loss, argnums=(0, 1))(*args)
  _assert_trees_close(got, want, atol=2e-5, rtol=2e-5)
  # The per-token outputs themselves, not only their weighted sum.
  total, z = losses.head_cross_entropy(x, kernel, targets, z_loss, vocab_major, jnp.float32)
  logits = jnp.einsum("bse,ve->bsv" if vocab_major else "bse,ev->bsv", x, kernel)
  want_total, want_z = losses.cross_entropy(logits, targets, z_loss)
  _assert_trees_close((total, z), (want_total, want_z), atol=2e-5, rtol=2e-5)


def test_fused_head_cross_entropy_bf16_close_to_f32():
  b, s, e, v = 2, 8, 32, 64
  x, kernel = _normal(0, (b, s, e)), _normal(1, (e, v), 0.3)
  targets = jnp.asarray(np.random.default_rng(2).integers(0, v, (b, s)), jnp.int32)
  weights = jnp.ones((b, s))
  f32 = jax.value_and_grad(_fused_loss, argnums=(0, 1))(x, kernel, targets, 0.0, False, weights)
  bf16 = jax.value_and_grad(_fused_loss, argnums=(0, 1))(x, kernel, targets, 0.0, False, weights, jnp.bfloat16)
  assert bf16[1][0].dtype == jnp.float32 and bf16[1][1].dtype == jnp.float32  # gradients keep the params' dtype
  _assert_trees_close(bf16, f32, atol=0.05, rtol=0.02)


SEGMENTS = np.array([[1] * 5 + [2] * 7 + [0] * 4, [1] * 16], np.int32)


@pytest.mark.parametrize(
    "blocks,num_kv_heads,window,soft_cap",
    [(b, kv, w, c) for b in (3, 4) for kv in (4, 1) for w, c in ((0, 0.0), (5, 0.0), (0, 3.0))]  # 3 does not divide 16
    + [(16, 2, 5, 0.0)],  # one query per block
)
def test_causal_blocks_equal_one_block(blocks, num_kv_heads, window, soft_cap):
  q, k, v = _normal(0, (2, 16, 4, 8)), _normal(1, (2, 16, num_kv_heads, 8)), _normal(2, (2, 16, num_kv_heads, 8))
  index = np.broadcast_to(np.arange(16, dtype=np.int32), (2, 16))
  mask = attentions.attention_mask(SEGMENTS, SEGMENTS, index, index, window)
  cotangent = _normal(3, (2, 16, 4, 8))

  def loss(n, key_window):
    def f(q, k, v):
      out = attentions.dot_product_attention(
          q, k, v, mask, scale=8**-0.5, attn_logits_soft_cap=soft_cap, causal_blocks=n, key_window=key_window
      )
      return jnp.sum(out * cotangent)

    return f

  want = jax.jit(jax.value_and_grad(loss(1, 0), argnums=(0, 1, 2)))(q, k, v)
  for key_window in sorted({0, window}):  # the window only trims keys the mask already hides
    got = jax.jit(jax.value_and_grad(loss(blocks, key_window), argnums=(0, 1, 2)))(q, k, v)
    _assert_trees_close(got, want, atol=1e-5, rtol=1e-5)


def test_causal_blocks_refuse_a_cache_or_foreign_keys():
  q, k = _normal(0, (1, 8, 2, 4)), _normal(1, (1, 12, 2, 4))
  mask = jnp.ones((1, 8, 12), bool)
  with pytest.raises(ValueError, match="causal_blocks"):
    attentions.dot_product_attention(q, k, k, mask, scale=0.5, causal_blocks=2)


@pytest.mark.parametrize("model_name", ["tests/tiny-llama", "tests/tiny-gemma", "tests/tiny-gemma2"])
def test_model_cross_entropy_equals_loss_of_logits(model_name):
  """The training loss path (hidden states -> Transformer.cross_entropy) against the logits path: a separate head,
  a tied embedding head, and a soft-capped head (which computes the logits first)."""
  from flax import nnx  # pylint: disable=import-outside-toplevel

  from MaxText.tests import model_test_utils  # pylint: disable=import-outside-toplevel

  model = model_test_utils.build(model_name=model_name)
  tokens, positions, segments = model_test_utils.inputs(packed=True)
  targets = jnp.roll(tokens, -1, axis=1)

  def via_hidden(model):
    hidden = model(tokens, positions, segments, return_hidden=True)
    total, z = model.cross_entropy(hidden, targets, 1e-3)
    return jnp.sum(total) + jnp.sum(z)

  def via_logits(model):
    total, z = losses.cross_entropy(model(tokens, positions, segments), targets, 1e-3)
    return jnp.sum(total) + jnp.sum(z)

  got = nnx.value_and_grad(via_hidden)(model)
  want = nnx.value_and_grad(via_logits)(model)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
  _assert_trees_close(nnx.State(got[1]).to_pure_dict(), nnx.State(want[1]).to_pure_dict(), atol=1e-4, rtol=1e-4)
