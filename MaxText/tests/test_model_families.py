"""Model features the Gemma, Qwen 3 and GPT-3 families switch on by config key, checked without transformers.

(Their parity with transformers, per family, is in test_families.py.)
"""

import jax.numpy as jnp
import numpy as np
import pytest

from MaxText.layers import embeddings, normalizations
from MaxText.layers.attentions import attention_mask
from MaxText.tests.model_test_utils import build, config_of, forward, inputs


@pytest.mark.parametrize("scan_layers", [True, False])
def test_local_global_pattern_with_autoselected_attention(scan_layers):
  """Gemma 3's per-layer local/global choice (traced inside scan: lax.cond around the fused kernel) = dot_product."""
  dot = build(model_name="tests/tiny-gemma3", scan_layers=scan_layers)
  auto = build(model_name="tests/tiny-gemma3", scan_layers=scan_layers, attention="autoselected")
  for packed in (False, True):
    tokens, positions, segments = inputs(seed=2, packed=packed)
    want = np.asarray(forward(dot, tokens, positions, segments))
    # f32 rounding of two attention implementations through 6 layers: about 1e-6 of the logits' scale (~30).
    scale = float(np.abs(want).max())
    np.testing.assert_allclose(forward(auto, tokens, positions, segments), want, atol=2e-6 * scale, rtol=1e-5)


def test_only_every_nth_layer_is_global():
  attention = build(model_name="tests/tiny-gemma3", scan_layers=False).decoder.layers[0].self_attention
  assert [attention.is_local(i) for i in range(6)] == [True, True, False, True, True, False]
  mask_local = attention_mask(*(np.ones((1, 12), np.int32),) * 2, *(np.arange(12)[None],) * 2, 4, jnp.asarray(True))
  mask_global = attention_mask(*(np.ones((1, 12), np.int32),) * 2, *(np.arange(12)[None],) * 2, 4, jnp.asarray(False))
  assert int(mask_local.sum()) == 4 * 12 - 6 and int(mask_global.sum()) == 12 * 13 // 2


def test_norms_match_numpy():
  x = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
  scale, bias = np.linspace(-0.5, 0.5, 8, dtype=np.float32), np.linspace(0.1, 0.3, 8, dtype=np.float32)
  rms = normalizations.RMSNorm(8, epsilon=1e-6, scale_offset=1.0)
  assert np.all(np.asarray(rms.scale[...]) == 0)  # (1 + scale) starts as the identity scaling
  rms.scale[...] = scale
  want = x / np.sqrt((x**2).mean(-1, keepdims=True) + 1e-6) * (1 + scale)
  np.testing.assert_allclose(rms(x), want, rtol=1e-5)
  ln = normalizations.LayerNorm(8, epsilon=1e-5)
  ln.scale[...], ln.bias[...] = scale, bias
  centered = x - x.mean(-1, keepdims=True)
  want = centered / np.sqrt((centered**2).mean(-1, keepdims=True) + 1e-5) * scale + bias
  np.testing.assert_allclose(ln(x), want, rtol=1e-5, atol=1e-6)


def test_rope_none_is_identity_and_learned_positions_matter():
  x = np.random.default_rng(1).standard_normal((1, 5, 2, 8)).astype(np.float32)
  rope = embeddings.RotaryEmbedding(head_dim=8, rope_type="none")
  np.testing.assert_array_equal(rope(x, np.arange(5)[None]), x)
  model = build(model_name="tests/tiny-gpt3")
  tokens, positions, _ = inputs()
  shifted = forward(model, tokens, positions + 3, None)
  assert np.abs(np.asarray(shifted) - np.asarray(forward(model, tokens, positions, None))).max() > 1e-3
  assert config_of(model_name="tests/tiny-gpt3").trainable_position_size == 64
