"""Attention core, masks and rotary embeddings against independent numpy references."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from MaxText import pyconfig
from MaxText.layers import attentions, embeddings
from MaxText.layers.ops.attention import autoselected_attention, filled_block_attention

BASE = str(pyconfig.CONFIGS_DIR / "base.yml")


def _rng_normal(seed, shape):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def reference_attention(q, k, v, segment_ids, window=0, soft_cap=0.0):
  """Per-head softmax attention in float64 numpy, K/V explicitly repeated to the query heads."""
  b, s, hq, d = q.shape
  rep = hq // k.shape[2]
  k = np.repeat(k, rep, axis=2).astype(np.float64)
  v = np.repeat(v, rep, axis=2).astype(np.float64)
  out = np.zeros((b, s, hq, d))
  for bi in range(b):
    for h in range(hq):
      logits = q[bi, :, h].astype(np.float64) @ k[bi, :, h].T / math.sqrt(d)
      if soft_cap:
        logits = soft_cap * np.tanh(logits / soft_cap)
      for i in range(s):
        for j in range(s):
          ok = j <= i and segment_ids[bi, i] == segment_ids[bi, j] and (window == 0 or i - j < window)
          if not ok:
            logits[i, j] = -np.inf
      p = np.exp(logits - logits.max(-1, keepdims=True))
      out[bi, :, h] = (p / p.sum(-1, keepdims=True)) @ v[bi, :, h]
  return out


SEGMENTS = np.array([[1] * 5 + [2] * 7 + [0] * 4, [1] * 16], np.int32)


@pytest.mark.parametrize("num_kv_heads", [4, 2, 1])  # MHA, GQA, MQA
@pytest.mark.parametrize("window,soft_cap", [(0, 0.0), (4, 0.0), (0, 3.0)])
def test_dot_product_matches_repeat_kv_reference(num_kv_heads, window, soft_cap):
  q = _rng_normal(0, (2, 16, 4, 8))
  k = _rng_normal(1, (2, 16, num_kv_heads, 8))
  v = _rng_normal(2, (2, 16, num_kv_heads, 8))
  index = np.broadcast_to(np.arange(16, dtype=np.int32), (2, 16))
  mask = attentions.attention_mask(SEGMENTS, SEGMENTS, index, index, window)
  out = attentions.dot_product_attention(q, k, v, mask, scale=8**-0.5, attn_logits_soft_cap=soft_cap)
  np.testing.assert_allclose(out, reference_attention(q, k, v, SEGMENTS, window, soft_cap), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("num_kv_heads", [4, 2, 1])
@pytest.mark.parametrize("window", [0, 4])
@pytest.mark.parametrize("packed", [True, False])
def test_autoselected_matches_dot_product(num_kv_heads, window, packed):
  q = _rng_normal(3, (2, 16, 4, 8))
  k = _rng_normal(4, (2, 16, num_kv_heads, 8))
  v = _rng_normal(5, (2, 16, num_kv_heads, 8))
  segments = SEGMENTS if packed else np.ones((2, 16), np.int32)
  index = np.broadcast_to(np.arange(16, dtype=np.int32), (2, 16))
  mask = attentions.attention_mask(segments, segments, index, index, window)
  expected = attentions.dot_product_attention(q, k, v, mask, scale=8**-0.5)
  got = autoselected_attention(q, k, v, segments if packed else None, scale=8**-0.5, sliding_window_size=window)
  np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("num_kv_heads", [4, 1])
@pytest.mark.parametrize("soft_cap", [0.0, 3.0])
@pytest.mark.parametrize("block", [8, 12, 40])
def test_filled_block_attention_matches_reference(num_kv_heads, soft_cap, block):
  """A prompt chunk over a KV cache read block by block (rows filled 0, 5, 16 and all 40 tokens; blocks that do
  and do not divide the cache) equals softmax attention over each row's filled keys then the chunk's own, causal."""
  b, s, hq, d, t = 4, 6, 4, 8, 40
  filled = np.array([0, 5, 16, 40], np.int32)
  q = _rng_normal(6, (b, s, hq, d))
  cache_k, cache_v = _rng_normal(7, (b, num_kv_heads, t, d)), _rng_normal(8, (b, num_kv_heads, t, d))
  new_k, new_v = _rng_normal(9, (b, num_kv_heads, s, d)), _rng_normal(10, (b, num_kv_heads, s, d))
  got = filled_block_attention(
      q, (cache_k, cache_v), (new_k, new_v), filled, block=block, scale=d**-0.5, attn_logits_soft_cap=soft_cap
  )
  for row, n in enumerate(filled):
    # Each row alone: its filled keys and the chunk's as one sequence, the queries at its end (causal offsets).
    keys = np.concatenate([cache_k[row, :, :n], new_k[row]], axis=1).transpose(1, 0, 2)[None]
    values = np.concatenate([cache_v[row, :, :n], new_v[row]], axis=1).transpose(1, 0, 2)[None]
    padded_q = np.concatenate([np.zeros((1, n, hq, d), np.float32), q[row : row + 1]], axis=1)
    ones = np.ones((1, n + s), np.int32)
    expected = reference_attention(padded_q, keys, values, ones, soft_cap=soft_cap)[:, n:]
    np.testing.assert_allclose(got[row : row + 1], expected, atol=2e-5, rtol=2e-5)


def test_mask_padding_rows_are_never_empty():
  index = np.broadcast_to(np.arange(16, dtype=np.int32), (2, 16))
  mask = np.asarray(attentions.attention_mask(SEGMENTS, SEGMENTS, index, index, 3))
  assert mask.any(-1).all()
  assert not mask[0, 5:12, :5].any()  # segment 2 never sees segment 1
  assert not mask[0, 12:, :12].any()  # padding never sees real tokens
  assert not mask[0, :12, 12:].any()  # real tokens never see padding


def _rotate_complex(x, positions, freqs):
  """RoPE as complex multiplication of the (i, i + d/2) pairs by exp(i * position * freq)."""
  half = x.shape[-1] // 2
  z = x[..., :half].astype(np.float64) + 1j * x[..., half:].astype(np.float64)
  z = z * np.exp(1j * positions[:, :, None, None].astype(np.float64) * freqs)
  return np.concatenate([z.real, z.imag], axis=-1)


def _llama31_scaling(freqs, factor, low, high, old_context):
  """Meta's published Llama 3.1 frequency scaling, one frequency at a time."""
  out = []
  for freq in freqs:
    wavelen = 2 * math.pi / freq
    if wavelen < old_context / high:
      out.append(freq)
    elif wavelen > old_context / low:
      out.append(freq / factor)
    else:
      smooth = (old_context / wavelen - low) / (high - low)
      out.append((1 - smooth) * freq / factor + smooth * freq)
  return np.array(out)


def _rope_config(**kw):
  return pyconfig.initialize(["", BASE], run_name="t", **kw)


@pytest.mark.parametrize(
    "rope_type,theta,min_ts", [("default", 10_000.0, 1.0), ("default", 500_000.0, 2.0), ("llama3.1", 500_000.0, 1.0)]
)
def test_rope_matches_numpy_reference(rope_type, theta, min_ts):
  head_dim = 128
  config = _rope_config(rope_type=rope_type, rope_max_timescale=theta, rope_min_timescale=min_ts)
  rope = embeddings.RotaryEmbedding.from_config(config, head_dim)
  freqs = 1.0 / (min_ts * (theta / min_ts) ** (np.arange(0, head_dim, 2) / head_dim))
  if rope_type == "llama3.1":
    scaled = _llama31_scaling(freqs, 8.0, 1.0, 4.0, 8192)
    # All three bands occur at this theta/head_dim, so the test covers each branch of the definition.
    assert (scaled == freqs).any() and np.isclose(scaled, freqs / 8).any()
    assert ((scaled != freqs) & ~np.isclose(scaled, freqs / 8)).any()
    freqs = scaled
  x = _rng_normal(6, (2, 5, 3, head_dim))
  positions = np.array([[0, 1, 2, 700, 9000], [4, 3, 2, 1, 0]], np.int32)
  # float32 angles at position 9000 are good to ~5e-4 rad (the same in every f32 implementation).
  np.testing.assert_allclose(
      rope(jnp.asarray(x), jnp.asarray(positions)), _rotate_complex(x, positions, freqs), atol=2e-3
  )


def test_rope_linear_scales_positions():
  head_dim = 16
  config = _rope_config(rope_type="linear", rope_scaling_factor=4.0)
  rope = embeddings.RotaryEmbedding.from_config(config, head_dim)
  freqs = 1.0 / (10_000.0 ** (np.arange(0, head_dim, 2) / head_dim))
  x = _rng_normal(7, (1, 4, 2, head_dim))
  positions = np.array([[0, 3, 8, 41]], np.int32)
  np.testing.assert_allclose(rope(x, positions), _rotate_complex(x, positions / 4.0, freqs), atol=1e-5)


def test_rope_position_zero_is_identity_and_norm_preserved():
  x = _rng_normal(8, (1, 3, 2, 32))
  inv = embeddings.rope_inv_frequencies(32, max_timescale=10_000.0)
  out = np.asarray(embeddings.apply_rope(x, np.array([[0, 5, 100]], np.int32), inv))
  np.testing.assert_allclose(out[0, 0], x[0, 0], atol=1e-6)
  np.testing.assert_allclose(np.linalg.norm(out, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)
  assert not np.allclose(out[0, 1], x[0, 1])


def test_bf16_attention_close_to_f32():
  q, k, v = (_rng_normal(i, (1, 16, 4, 8)) for i in range(3))
  index = np.broadcast_to(np.arange(16, dtype=np.int32), (1, 16))
  mask = attentions.attention_mask(SEGMENTS[1:], SEGMENTS[1:], index, index)
  f32 = attentions.dot_product_attention(q, k, v, mask, scale=8**-0.5)
  for kw in (dict(), dict(float32_qk_product=False, float32_logits=False)):
    bf = attentions.dot_product_attention(*(jnp.asarray(t, jnp.bfloat16) for t in (q, k, v)), mask, scale=8**-0.5, **kw)
    assert bf.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(bf, np.float32), f32, atol=0.1)
