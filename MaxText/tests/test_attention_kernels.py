"""Fused attention kernels (layers/ops/attention.py): TPU splash attention (interpreted on CPU, and lowered for TPU)
and the cuDNN selection."""

import jax
import jax.numpy as jnp
import pytest
from jax import export

from MaxText import pyconfig
from MaxText.layers import attentions
from MaxText.layers.ops import attention as attention_ops

B, S, HQ, HKV, D = 2, 256, 4, 2, 64
SCALE = D**-0.5


@pytest.fixture(scope="module", name="qkv")
def fixture_qkv():
  keys = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(keys[0], (B, S, HQ, D))
  k = jax.random.normal(keys[1], (B, S, HKV, D))
  v = jax.random.normal(keys[2], (B, S, HKV, D))
  # Two packed documents per row, split at different places, and a padded tail in row 1.
  seg = jnp.stack(
      [
          jnp.where(jnp.arange(S) < 100, 1, 2),
          jnp.where(jnp.arange(S) < 37, 1, jnp.where(jnp.arange(S) < 200, 2, 0)),
      ]
  ).astype(jnp.int32)
  return q, k, v, seg


def _reference(q, k, v, seg, window=0):
  index = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
  seg = jnp.ones((B, S), jnp.int32) if seg is None else seg
  mask = attentions.attention_mask(seg, seg, index, index, window)
  return attention_ops.dot_product_attention(q, k, v, mask, scale=SCALE)


@pytest.mark.parametrize("window", [0, 48])
@pytest.mark.parametrize("packed", [False, True])
def test_splash_matches_dot_product(qkv, window, packed):
  q, k, v, seg = qkv
  seg = seg if packed else None
  got = attention_ops.splash_attention(
      q, k, v, seg, scale=SCALE, sliding_window_size=window, block_size=128, interpret=True
  )
  want = _reference(q, k, v, seg, window)
  if packed:  # padding rows attend to padding in the reference; the kernel's value there is unspecified
    keep = (seg != 0)[:, :, None, None]
    got, want = jnp.where(keep, got, 0), jnp.where(keep, want, 0)
  assert jnp.abs(got - want).max() < 2e-5


def test_splash_gradients_match_dot_product(qkv):
  q, k, v, _ = qkv

  def loss(fn):
    return lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v)))

  got = jax.grad(
      loss(lambda q, k, v: attention_ops.splash_attention(q, k, v, None, scale=SCALE, block_size=128, interpret=True)),
      argnums=(0, 1, 2),
  )(q, k, v)
  want = jax.grad(loss(lambda q, k, v: _reference(q, k, v, None)), argnums=(0, 1, 2))(q, k, v)
  for g, w in zip(got, want):
    assert jnp.abs(g - w).max() < 1e-4


def test_splash_lowers_for_tpu_from_cpu(qkv):
  """The Mosaic kernel (forward and backward) lowers to a TPU custom call without a TPU."""
  q, k, v, seg = (x.astype(jnp.bfloat16) if x.dtype == jnp.float32 else x for x in qkv)

  def step(q, k, v, seg):
    def f(q, k, v):
      out = attention_ops.splash_attention(q, k, v, seg, scale=SCALE, block_size=128, platform="tpu")
      return jnp.sum(out.astype(jnp.float32))

    return jax.value_and_grad(f, argnums=(0, 1, 2))(q, k, v)

  module = export.export(jax.jit(step), platforms=["tpu"])(q, k, v, seg).mlir_module()
  assert module.count("tpu_custom_call") >= 2  # forward and backward kernels


def test_flash_off_tpu_is_a_clear_error():
  # A config error when the config is built (MaxText/config/checks.py), before any model exists.
  with pytest.raises(ValueError, match=r"^attention: flash.*TPU only.*'cpu'"):
    pyconfig.initialize(["", "MaxText/configs/base.yml", "model_name=default", "attention=flash", "log_config=false"])


def test_cudnn_selection_reasons():
  bf16 = jnp.zeros((1, 128, 4, 64), jnp.bfloat16)
  kw = dict(compute_capability=(9, 0), has_segments=True)
  assert attention_ops.cudnn_unsupported_reason(bf16, bf16, backend="gpu", **kw) is None
  assert "backend is 'cpu'" in attention_ops.cudnn_unsupported_reason(bf16, bf16, backend="cpu", **kw)
  f32 = bf16.astype(jnp.float32)
  assert "dtype float32" in attention_ops.cudnn_unsupported_reason(f32, f32, backend="gpu", **kw)
  wide = jnp.zeros((1, 128, 4, 264), jnp.bfloat16)
  assert "head_dim 264" in attention_ops.cudnn_unsupported_reason(wide, wide, backend="gpu", **kw)
  ampere_wide = jnp.zeros((1, 128, 4, 192), jnp.bfloat16)
  reason = attention_ops.cudnn_unsupported_reason(
      ampere_wide, ampere_wide, backend="gpu", compute_capability=(8, 0), has_segments=False
  )
  assert "up to 128" in reason
  odd = jnp.zeros((1, 127, 4, 64), jnp.bfloat16)
  assert "odd" in attention_ops.cudnn_unsupported_reason(odd, odd, backend="gpu", **kw)
  old = attention_ops.cudnn_unsupported_reason(bf16, bf16, backend="gpu", compute_capability=(7, 5), has_segments=0)
  assert "below 8.0" in old


def test_autoselected_on_cpu_falls_back_to_xla_and_matches(qkv):
  q, k, v, seg = qkv
  got = attention_ops.autoselected_attention(q, k, v, seg, scale=SCALE)
  want = _reference(q, k, v, seg)
  keep = (seg != 0)[:, :, None, None]
  assert jnp.abs(jnp.where(keep, got - want, 0)).max() < 2e-5
