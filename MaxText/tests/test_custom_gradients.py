"""The CPU-tuned ops (layers/ops: explicit matmul backward, fused head + cross-entropy, causal query blocks) against
their plain forms, each op alone and in the model under both settings of its config key."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from MaxText.layers import attentions, embeddings, linears, losses, ops
from MaxText.layers.ops import attention as attention_ops
from MaxText.layers.ops import head_loss, matmul
from MaxText.tests import model_test_utils


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
@pytest.mark.parametrize("backward", ops.DENSE_MATMUL_BACKWARDS)
def test_dense_matmul_value_and_gradients_equal_einsum(x_shape, k_shape, n_in, backward):
  x, kernel = _normal(0, x_shape), _normal(1, k_shape)
  cotangent = _normal(2, x_shape[: len(x_shape) - n_in] + k_shape[n_in:])

  def plain(x, kernel):  # JAX's own contraction and autodiff
    return jnp.tensordot(x, kernel, axes=n_in)

  def loss(fn):
    return lambda x, kernel: jnp.sum(fn(x, kernel) * cotangent)

  got = jax.value_and_grad(loss(lambda x, k: matmul.dense_matmul(x, k, n_in, backward)), argnums=(0, 1))(x, kernel)
  want = jax.value_and_grad(loss(plain), argnums=(0, 1))(x, kernel)
  _assert_trees_close(got, want, atol=1e-5, rtol=1e-5)


def _dot_types(fn, *args) -> list[str]:
  """`lhs,rhs->result` element types of every dot_general in fn's program, as JAX emits it."""
  text = jax.jit(fn).lower(*args).as_text()
  sig = r"tensor<(?:[\dx]*x)?(\w+)>"
  return [f"{lhs},{rhs}->{out}" for lhs, rhs, out in re.findall(rf"dot_general.*: \({sig}, {sig}\) -> {sig}", text)]


def test_bf16_dense_matmul_accumulates_in_f32_forward_and_backward():
  """bf16 inputs: one rounding of the exact product, and all three dots of the CPU path with float32 results
  (XLA:CPU runs a dot with bf16 results outside its matmul library: AMX then goes unused, 3x slower)."""
  x = _normal(0, (2, 64, 32)).astype(jnp.bfloat16)
  kernel = _normal(1, (32, 48)).astype(jnp.bfloat16)
  cotangent = _normal(2, (2, 64, 48)).astype(jnp.bfloat16)
  out, vjp = jax.vjp(lambda x, k: matmul.dense_matmul(x, k, 1, "explicit"), x, kernel)
  dx, dk = vjp(cotangent)
  x64, k64, g64 = (np.asarray(a, np.float64) for a in (x, kernel, cotangent))
  for got, exact in [(out, x64 @ k64), (dx, g64 @ k64.T), (dk, np.einsum("bsi,bso->io", x64, g64))]:
    assert got.dtype == jnp.bfloat16
    rounded = np.asarray(jnp.asarray(exact, jnp.bfloat16), np.float64)
    np.testing.assert_allclose(np.asarray(got, np.float64), rounded, rtol=2**-8, atol=1e-6)

  def loss(x, k):
    return jnp.sum(matmul.dense_matmul(x, k, 1, "explicit").astype(jnp.float32) * cotangent)

  assert _dot_types(jax.value_and_grad(loss, argnums=(0, 1)), x, kernel) == ["bf16,bf16->f32"] * 3


def test_bf16_attention_matmuls_accumulate_in_f32():
  """q.k (float32_qk_product) and probs.v run as bf16 dots with float32 results, not as float32 dots of upcast
  copies or dots with bf16 results; the output is bf16."""
  q, k, v = (_normal(i, (1, 16, 2, 8)).astype(jnp.bfloat16) for i in range(3))
  mask = jnp.tril(jnp.ones((1, 16, 16), bool))

  def attend(q, k, v):
    return attention_ops.dot_product_attention(q, k, v, mask, scale=0.35)

  assert attend(q, k, v).dtype == jnp.bfloat16
  assert _dot_types(attend, q, k, v) == ["bf16,bf16->f32"] * 2


def test_bf16_tied_logits_accumulate_in_f32():
  table = embeddings.Embed(64, 16, rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
  x = _normal(0, (2, 5, 16)).astype(jnp.bfloat16)
  exact = np.asarray(x, np.float64) @ np.asarray(table.embedding[...].astype(jnp.bfloat16), np.float64).T
  got = table.attend(x)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(got, np.float64), np.asarray(jnp.asarray(exact, jnp.bfloat16)), rtol=2**-8)
  assert _dot_types(table.attend, x) == ["bf16,bf16->f32"]


def _unfused_loss(x, kernel, targets, z, vocab_major, weights, dtype=jnp.float32):
  spec = "bse,ve->bsv" if vocab_major else "bse,ev->bsv"
  logits = jnp.einsum(spec, x.astype(dtype), kernel.astype(dtype)).astype(jnp.float32)
  total, z_loss = losses.cross_entropy(logits, targets, z)
  return jnp.sum(total * weights) + 0.3 * jnp.sum(z_loss * weights)


def _fused_loss(x, kernel, targets, z, vocab_major, weights, dtype=jnp.float32):
  total, z_loss = head_loss.fused_head_cross_entropy(x, kernel, targets, z, vocab_major, dtype)
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
  total, z = head_loss.fused_head_cross_entropy(x, kernel, targets, z_loss, vocab_major, jnp.float32)
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
      out = attention_ops.dot_product_attention(
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
    attention_ops.dot_product_attention(q, k, k, mask, scale=0.5, causal_blocks=2)


def test_auto_means_cpu_tuned_on_cpu_and_plain_elsewhere():
  assert ops.auto_dense_matmul_backward("cpu") == "explicit" and ops.auto_head_loss("cpu") == "fused"
  assert ops.auto_causal_blocks("cpu", sequence_sharded=False) == ops.CPU_CAUSAL_BLOCKS > 1
  for hardware in ("gpu", "tpu"):
    assert ops.auto_dense_matmul_backward(hardware) == "autodiff" and ops.auto_head_loss(hardware) == "logits"
    assert ops.auto_causal_blocks(hardware, sequence_sharded=False) == 1
  assert ops.auto_causal_blocks("cpu", sequence_sharded=True) == 1


@pytest.mark.parametrize("mesh", [{}, {"ici_sequence_parallelism": 2}, {"ici_context_parallelism": 2}])
def test_pyconfig_resolves_auto_as_the_ops_define_it(mesh):
  config = model_test_utils.config_of(**mesh)  # base.yml: every key auto, here on the CPU
  assert config.dense_matmul_backward == ops.auto_dense_matmul_backward("cpu")
  assert config.head_loss == ops.auto_head_loss("cpu")
  assert config.attention_causal_blocks == ops.auto_causal_blocks("cpu", sequence_sharded=bool(mesh))
  attention = nnx.eval_shape(lambda: attentions.Attention(config, rngs=nnx.Rngs(0)))
  assert attention.causal_blocks == config.attention_causal_blocks  # the layer takes it as resolved
  assert attention.query.matmul_backward == config.dense_matmul_backward


def _hidden_loss(tokens, positions, segments):
  """The training loss path: final-normed hidden states -> Transformer.cross_entropy (the head_loss choice)."""
  targets = jnp.roll(tokens, -1, axis=1)

  def loss(model):
    hidden = model(tokens, positions, segments, return_hidden=True)
    total, z = model.cross_entropy(hidden, targets, 1e-3)
    return jnp.sum(total) + jnp.sum(z)

  return loss


def _pure(grads):
  return nnx.to_pure_dict(grads)


@pytest.mark.parametrize("head", ops.HEAD_LOSSES)
@pytest.mark.parametrize("model_name", ["tests/tiny-llama", "tests/tiny-gemma", "tests/tiny-gemma2"])
def test_model_cross_entropy_equals_loss_of_logits(model_name, head):
  """Transformer.cross_entropy under either head_loss against the logits path: a separate head, a tied embedding
  head, and a soft-capped head (which computes the logits first whatever head_loss says)."""
  model = model_test_utils.build(model_name=model_name, head_loss=head)
  tokens, positions, segments = model_test_utils.inputs(packed=True)
  targets = jnp.roll(tokens, -1, axis=1)

  def via_logits(model):
    total, z = losses.cross_entropy(model(tokens, positions, segments), targets, 1e-3)
    return jnp.sum(total) + jnp.sum(z)

  got = nnx.value_and_grad(_hidden_loss(tokens, positions, segments))(model)
  want = nnx.value_and_grad(via_logits)(model)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
  _assert_trees_close(_pure(got[1]), _pure(want[1]), atol=1e-4, rtol=1e-4)


PLAIN = dict(dense_matmul_backward="autodiff", head_loss="logits", attention_causal_blocks=1)
CPU_TUNED = dict(dense_matmul_backward="explicit", head_loss="fused", attention_causal_blocks=4)


def _dense_backwards(model) -> set[str]:
  return {m.matmul_backward for _, m in nnx.iter_modules(model) if isinstance(m, linears.DenseGeneral)}


@pytest.mark.parametrize("model_name", ["tests/tiny-llama", "tests/tiny-deepseek3"])  # MHA + MLP; MLA + MoE
def test_plain_and_cpu_tuned_ops_give_the_same_model_loss_and_grads(model_name):
  tokens, positions, segments = model_test_utils.inputs(packed=True)
  loss = nnx.jit(nnx.value_and_grad(_hidden_loss(tokens, positions, segments)))
  results = {}
  for name, keys in (("plain", PLAIN), ("cpu_tuned", CPU_TUNED)):
    model = model_test_utils.build(model_name=model_name, **keys)
    assert _dense_backwards(model) == {keys["dense_matmul_backward"]}, name  # the key reaches every DenseGeneral
    results[name] = loss(model)
  np.testing.assert_allclose(results["cpu_tuned"][0], results["plain"][0], rtol=1e-6)
  _assert_trees_close(_pure(results["cpu_tuned"][1]), _pure(results["plain"][1]), atol=1e-5, rtol=1e-5)


# MHA; tied head; MoE; MLA + MoE. A bf16 router picks other experts for some tokens of these tiny random models, which
# moves the MoE models' gradients by 14-21% (the same before the f32-accumulating ops): only their loss is compared.
@pytest.mark.parametrize(
    "model_name,grads_compared",
    [
        ("tests/tiny-llama", True),
        ("tests/tiny-gemma", True),
        ("tests/tiny-mixtral", False),
        ("tests/tiny-deepseek2", False),
    ],
)
def test_bf16_model_with_f32_accumulating_ops_tracks_f32(model_name, grads_compared):
  """bf16 compute through the CPU ops (every matmul bf16 in, f32 out): compiles and runs (XLA:CPU has no generic
  fallback for some bf16 x bf16 -> f32 dots), loss within 1% of the f32 model's, gradients finite (and close)."""
  inputs = model_test_utils.inputs(packed=True)
  results = {}
  for dtype in ("float32", "bfloat16"):
    model = model_test_utils.build(model_name=model_name, dtype=dtype)
    loss, grads = model_test_utils.loss_and_grad(model, *inputs)
    results[dtype] = loss, np.concatenate([np.ravel(np.asarray(g, np.float32)) for g in jax.tree.leaves(_pure(grads))])
  np.testing.assert_allclose(results["bfloat16"][0], results["float32"][0], rtol=1e-2)
  got, want = results["bfloat16"][1], results["float32"][1]
  assert np.isfinite(got).all()
  if grads_compared:  # all parameters' gradients as one vector
    assert np.linalg.norm(got - want) <= 0.05 * np.linalg.norm(want)


def test_minimal_remat_saves_the_same_residuals_with_either_matmul_backward():
  """remat "minimal" keeps the weight matmuls: plain dots under autodiff, the named output under explicit."""
  tokens, positions, segments = model_test_utils.inputs()
  saved = {}
  for backward in ops.DENSE_MATMUL_BACKWARDS:
    model = model_test_utils.build(remat_policy="minimal", scan_layers=False, dense_matmul_backward=backward)
    assert _dense_backwards(model) == {backward}
    graphdef, params = nnx.split(model)

    def residuals(p, g=graphdef):
      _, vjp = jax.vjp(lambda q: model_test_utils.loss_fn(nnx.merge(g, q), tokens, positions, segments)[0], p)
      return jax.tree.leaves(vjp)  # the vjp closure holds exactly the saved residuals

    saved[backward] = sorted((x.shape, str(x.dtype)) for x in jax.eval_shape(residuals, params))
  assert saved["explicit"] == saved["autodiff"]
