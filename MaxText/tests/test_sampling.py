"""The one sampler: support (which tokens can be drawn), distributions, per-row seeding independent of batch
neighbours, the fast paths, validation and the config defaults."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from MaxText import pyconfig
from MaxText.inference import sampling
from MaxText.inference.sampling import SamplingParams

# One row of logits with a clear order: probabilities 0.4, 0.25, 0.15, 0.1, 0.06, 0.04 at temperature 1.
PROBS = np.array([0.1, 0.4, 0.04, 0.25, 0.06, 0.15])
LOGITS = np.log(PROBS).astype(np.float32)
DRAWS = 20000


def settings(rows, steps=None):
  """sample's settings for a list of SamplingParams (steps default 0)."""
  arrays = sampling.settings_arrays(rows)
  arrays["step"] = np.zeros(len(rows), np.int32) if steps is None else np.asarray(steps, np.int32)
  return arrays


def draw(params, logits=LOGITS, n=DRAWS):
  """n independent draws (rows of repeated logits with seeds seed .. seed + n - 1) -> counts per token."""
  rows = jnp.broadcast_to(jnp.asarray(logits), (n, logits.shape[-1]))
  out = np.asarray(sampling.sample(rows, settings(params.per_prompt(n))))
  return np.bincount(out, minlength=logits.shape[-1])


def test_greedy_is_argmax_and_deterministic():
  logits = jax.random.normal(jax.random.key(1), (7, 50))
  first = sampling.sample(logits, settings([SamplingParams(seed=0)] * 7))
  np.testing.assert_array_equal(first, np.argmax(logits, -1))
  np.testing.assert_array_equal(first, sampling.sample(logits, settings([SamplingParams(seed=9)] * 7, [3] * 7)))


def test_temperature_zero_is_greedy_for_every_strategy():
  for strategy in ("weighted", "topk", "nucleus", "composite"):
    counts = draw(SamplingParams.from_strategy(strategy, temperature=0.0, top_k=3, top_p=0.5), n=100)
    assert counts[1] == 100


def test_weighted_follows_softmax_over_temperature():
  counts = draw(SamplingParams.from_strategy("weighted"))
  np.testing.assert_allclose(counts / DRAWS, PROBS, atol=0.015)
  hot = draw(SamplingParams.from_strategy("weighted", temperature=2.0)) / DRAWS
  expected = np.sqrt(PROBS) / np.sqrt(PROBS).sum()
  np.testing.assert_allclose(hot, expected, atol=0.015)


def test_top_k_never_leaves_the_top_k():
  counts = draw(SamplingParams.from_strategy("topk", top_k=3))
  assert set(np.nonzero(counts)[0]) == {1, 3, 5}
  np.testing.assert_allclose(counts[[1, 3, 5]] / DRAWS, PROBS[[1, 3, 5]] / 0.8, atol=0.015)


def test_nucleus_keeps_the_smallest_set_reaching_p():
  # 0.4 + 0.25 = 0.65 < 0.7, so 0.15 is needed too; nothing else.
  counts = draw(SamplingParams.from_strategy("nucleus", top_p=0.7))
  assert set(np.nonzero(counts)[0]) == {1, 3, 5}
  # p below the top token's mass keeps only that token.
  assert set(np.nonzero(draw(SamplingParams.from_strategy("nucleus", top_p=0.39), n=2000))[0]) == {1}


def test_composite_applies_top_k_then_top_p_then_temperature():
  # top-k 4 renormalizes to 0.4/0.9, 0.25/0.9, 0.15/0.9, 0.1/0.9; top-p 0.6 then needs the first two (0.44 + 0.28).
  counts = draw(SamplingParams.from_strategy("composite", top_k=4, top_p=0.6, temperature=0.5))
  assert set(np.nonzero(counts)[0]) == {1, 3}
  expected = PROBS[[1, 3]] ** 2 / (PROBS[[1, 3]] ** 2).sum()  # temperature 0.5 squares the kept probabilities
  np.testing.assert_allclose(counts[[1, 3]] / DRAWS, expected, atol=0.015)


def test_masks_on_ties_and_batches():
  logits = jnp.array([[1.0, 3.0, 3.0, 0.0], [5.0, 4.0, 3.0, 2.0]])
  np.testing.assert_array_equal(sampling.top_k_mask(logits, 1), [[0, 1, 1, 0], [1, 0, 0, 0]])
  np.testing.assert_array_equal(sampling.top_k_mask(logits, 0), np.ones((2, 4)))
  np.testing.assert_array_equal(sampling.top_p_mask(logits, 1.0), np.ones((2, 4)))
  assert sampling.top_p_mask(logits, 1e-6).sum(-1).tolist() == [2, 1]  # the top token (and its ties) always stays


# Rows whose batch takes every branch of the sampler: all greedy, no filter, top-k candidates only, full sort.
MIXED = [
    SamplingParams(temperature=1.3, top_k=20, top_p=0.9, seed=5),
    SamplingParams(),
    SamplingParams(temperature=0.7, seed=11),
    SamplingParams(temperature=1.0, top_p=0.8, seed=2),  # top-p without top-k: the full sort
    SamplingParams(temperature=1.1, top_k=3, seed=5),
]


def test_rows_are_seeded_and_independent_of_batch_neighbours():
  """A row's token depends on its logits, settings, seed and step only: alone, in any batch (whichever branch the
  batch takes), in any position, jitted or not."""
  logits = jax.random.normal(jax.random.key(3), (len(MIXED), 300)) * 2
  steps = [4, 0, 7, 1, 2]
  together = np.asarray(sampling.sample(logits, settings(MIXED, steps)))
  for i, params in enumerate(MIXED):
    alone = sampling.sample(logits[i : i + 1], settings([params], steps[i : i + 1]))
    assert int(alone[0]) == together[i]
  order = [4, 2, 0, 3, 1]
  shuffled = jax.jit(sampling.sample)(logits[np.array(order)], settings([MIXED[i] for i in order], np.take(steps, order)))
  np.testing.assert_array_equal(np.asarray(shuffled), together[order])
  # The draw is seeded: the same row with another seed or at another step draws another token (over many tries).
  row = jnp.broadcast_to(logits[0], (64, 300))
  base = sampling.sample(row, settings([MIXED[0]] * 64, range(64)))
  np.testing.assert_array_equal(base, sampling.sample(row, settings([MIXED[0]] * 64, range(64))))
  other = SamplingParams(temperature=1.3, top_k=20, top_p=0.9, seed=6)
  assert not np.array_equal(base, sampling.sample(row, settings([other] * 64, range(64))))
  assert len(set(np.asarray(base).tolist())) > 1  # the step moves the stream


def test_candidate_branch_equals_full_sort():
  """The top-k fast path keeps exactly the tokens the full sort keeps (its mask decides the draw)."""
  logits = jax.random.normal(jax.random.key(4), (3, 500))
  top_k, top_p = jnp.array([5, 40, 128]), jnp.array([0.9, 1.0, 0.5])
  fast = sampling._keep_mask(logits, top_k, top_p, sampling.TOP_K_CANDIDATES)  # pylint: disable=protected-access
  np.testing.assert_array_equal(fast, sampling._keep_mask(logits, top_k, top_p, 500))  # pylint: disable=protected-access
  assert fast.sum(-1).tolist()[0] <= 5


def test_validation_and_config_defaults():
  with pytest.raises(ValueError, match="strategy"):
    SamplingParams.from_strategy("beam")
  with pytest.raises(ValueError, match="top_k > 0"):
    SamplingParams.from_strategy("topk")
  with pytest.raises(ValueError, match="top_p"):
    SamplingParams.from_strategy("nucleus", top_p=0.0)
  with pytest.raises(ValueError, match="temperature"):
    SamplingParams(temperature=-1.0)
  config = pyconfig.initialize(
      ["", "base.yml"],
      decode_sampling_strategy="composite",
      decode_sampling_top_k=5,
      decode_sampling_nucleus_p=0.8,
      decode_sampling_temperature=0.7,
      decode_sampling_seed=3,
  )
  assert SamplingParams.from_config(config) == SamplingParams(temperature=0.7, top_k=5, top_p=0.8, seed=3)
  assert SamplingParams.from_strategy("greedy", temperature=0.7, top_k=5).greedy
  assert SamplingParams.from_strategy("nucleus", 0.7, top_k=5, top_p=0.8) == SamplingParams(0.7, 0, 0.8)
  assert [p.seed for p in SamplingParams(seed=3).per_prompt(3)] == [3, 4, 5]
