"""Sampling strategies: support (which tokens can be drawn), distributions, seeding and validation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from MaxText import pyconfig
from MaxText.inference import sampling
from MaxText.inference.sampling import Sampler

# One row of logits with a clear order: probabilities 0.4, 0.25, 0.15, 0.1, 0.06, 0.04 at temperature 1.
PROBS = np.array([0.1, 0.4, 0.04, 0.25, 0.06, 0.15])
LOGITS = np.log(PROBS).astype(np.float32)
DRAWS = 20000


def draw(sampler, logits=LOGITS, seed=0, n=DRAWS):
  """n independent draws (one per row of repeated logits) -> counts per token."""
  rows = jnp.broadcast_to(jnp.asarray(logits), (n, logits.shape[-1]))
  out = np.asarray(sampling.sample(rows, jax.random.key(seed), sampler))
  return np.bincount(out, minlength=logits.shape[-1])


def test_greedy_is_argmax_and_deterministic():
  logits = jax.random.normal(jax.random.key(1), (7, 50))
  first = sampling.sample(logits, jax.random.key(0), Sampler("greedy"))
  np.testing.assert_array_equal(first, np.argmax(logits, -1))
  np.testing.assert_array_equal(first, sampling.sample(logits, jax.random.key(9), Sampler("greedy")))


def test_temperature_zero_is_greedy_for_every_strategy():
  for strategy in ("weighted", "topk", "nucleus", "composite"):
    counts = draw(Sampler(strategy, temperature=0.0, top_k=3, top_p=0.5), n=100)
    assert counts[1] == 100


def test_weighted_follows_softmax_over_temperature():
  counts = draw(Sampler("weighted"))
  np.testing.assert_allclose(counts / DRAWS, PROBS, atol=0.015)
  hot = draw(Sampler("weighted", temperature=2.0)) / DRAWS
  expected = np.sqrt(PROBS) / np.sqrt(PROBS).sum()
  np.testing.assert_allclose(hot, expected, atol=0.015)


def test_top_k_never_leaves_the_top_k():
  counts = draw(Sampler("topk", top_k=3))
  assert set(np.nonzero(counts)[0]) == {1, 3, 5}
  np.testing.assert_allclose(counts[[1, 3, 5]] / DRAWS, PROBS[[1, 3, 5]] / 0.8, atol=0.015)


def test_nucleus_keeps_the_smallest_set_reaching_p():
  # 0.4 + 0.25 = 0.65 < 0.7, so 0.15 is needed too; nothing else.
  counts = draw(Sampler("nucleus", top_p=0.7))
  assert set(np.nonzero(counts)[0]) == {1, 3, 5}
  # p below the top token's mass keeps only that token.
  assert set(np.nonzero(draw(Sampler("nucleus", top_p=0.39), n=2000))[0]) == {1}


def test_composite_applies_top_k_then_top_p_then_temperature():
  # top-k 4 renormalizes to 0.4/0.9, 0.25/0.9, 0.15/0.9, 0.1/0.9; top-p 0.6 then needs the first two (0.44 + 0.28).
  counts = draw(Sampler("composite", top_k=4, top_p=0.6, temperature=0.5))
  assert set(np.nonzero(counts)[0]) == {1, 3}
  expected = PROBS[[1, 3]] ** 2 / (PROBS[[1, 3]] ** 2).sum()  # temperature 0.5 squares the kept probabilities
  np.testing.assert_allclose(counts[[1, 3]] / DRAWS, expected, atol=0.015)


def test_masks_on_ties_and_batches():
  logits = jnp.array([[1.0, 3.0, 3.0, 0.0], [5.0, 4.0, 3.0, 2.0]])
  np.testing.assert_array_equal(sampling.top_k_mask(logits, 1), [[0, 1, 1, 0], [1, 0, 0, 0]])
  np.testing.assert_array_equal(sampling.top_k_mask(logits, 0), np.ones((2, 4)))
  np.testing.assert_array_equal(sampling.top_p_mask(logits, 1.0), np.ones((2, 4)))
  assert sampling.top_p_mask(logits, 1e-6).sum(-1).tolist() == [2, 1]  # the top token (and its ties) always stays


def test_seeded_reproducible_and_rows_independent_of_batch_size():
  sampler = Sampler("composite", temperature=1.3, top_k=20, top_p=0.9)
  logits = jax.random.normal(jax.random.key(3), (6, 100)) * 2
  a = sampling.sample(logits, jax.random.key(5), sampler)
  np.testing.assert_array_equal(a, sampling.sample(logits, jax.random.key(5), sampler))
  assert not np.array_equal(a, sampling.sample(logits, jax.random.key(6), sampler))
  np.testing.assert_array_equal(a[:2], sampling.sample(logits[:2], jax.random.key(5), sampler))
  jitted = jax.jit(sampling.sample, static_argnums=2)
  np.testing.assert_array_equal(a, jitted(logits, jax.random.key(5), sampler))


def test_sampler_validation_and_config():
  with pytest.raises(ValueError, match="strategy"):
    Sampler("beam")
  with pytest.raises(ValueError, match="top_k > 0"):
    Sampler("topk")
  with pytest.raises(ValueError, match="top_p"):
    Sampler("nucleus", top_p=0.0)
  config = pyconfig.initialize(
      ["", "base.yml"],
      decode_sampling_strategy="composite",
      decode_sampling_top_k=5,
      decode_sampling_nucleus_p=0.8,
      decode_sampling_temperature=0.7,
  )
  assert Sampler.from_config(config) == Sampler("composite", temperature=0.7, top_k=5, top_p=0.8)
  assert hash(Sampler("greedy")) == hash(Sampler("greedy"))
