"""Context parallelism: load-balanced sequence order over the `context` axis trains exactly like the unsharded run."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from MaxText import context_parallel, sharding, training
from MaxText.config_schema import ConfigError
from MaxText.inference import engine as engine_lib
from MaxText.inference import scheduler as scheduler_lib
from MaxText.layers import attentions
from MaxText.layers.ops import attention as attention_ops
from MaxText.tests import model_test_utils as mtu
from MaxText.tests.test_train import make_config

LENGTH = 32  # divisible by 2 x 4 context shards
STEPS = 3


def packed_batches(seed: int = 0, rows: int = 8, vocab: int = 256) -> list[dict[str, np.ndarray]]:
  """STEPS batches of rows packing 1-3 documents each plus trailing padding (segment 0), positions per document."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(STEPS):
    seg = np.zeros((rows, LENGTH), np.int32)
    pos = np.zeros((rows, LENGTH), np.int32)
    for r in range(rows):
      start = 0
      for doc in range(1, rng.integers(1, 4) + 1):
        length = int(rng.integers(3, LENGTH - start + 1)) if start < LENGTH - 3 else 0
        seg[r, start : start + length] = doc
        pos[r, start : start + length] = np.arange(length)
        start += length
    inputs = np.where(seg > 0, rng.integers(1, vocab, size=(rows, LENGTH)), 0).astype(np.int32)
    targets = np.where(seg > 0, rng.integers(1, vocab, size=(rows, LENGTH)), 0).astype(np.int32)
    out.append(
        {
            "inputs": inputs,
            "inputs_position": pos,
            "inputs_segmentation": seg,
            "targets": targets,
            "targets_position": pos,
            "targets_segmentation": seg,
        }
    )
  return out


BATCHES = packed_batches()


def run_losses(tmp_path, *args) -> np.ndarray:
  """Losses of STEPS train steps on BATCHES (f32, 8 devices) under the mesh and model keys in args."""
  config = make_config(
      tmp_path, f"max_target_length={LENGTH}", "per_device_batch_size=1", "enable_checkpointing=false", *args
  )
  mesh = sharding.create_mesh(config)
  setup = training.TrainSetup(config, mesh)
  losses = []
  with sharding.use_mesh(mesh, config.logical_axis_rules):
    step, _, data_shardings = training.compile_train_step(setup, BATCHES[0])
    state = setup.init_state()
    for batch in BATCHES:
      state, metrics = step(state, {k: jax.device_put(v, data_shardings[k]) for k, v in batch.items()})
      losses.append(float(metrics["learning/loss"]))
  return np.array(losses)


_REFERENCES: dict[tuple, np.ndarray] = {}


def reference(tmp_path, *model_args) -> np.ndarray:
  """The run with the sequence unsharded (fsdp=8; test_train shows fsdp=8 equals one device), once per model."""
  if model_args not in _REFERENCES:
    _REFERENCES[model_args] = run_losses(tmp_path, "ici_fsdp_parallelism=8", *model_args)
  return _REFERENCES[model_args]


def test_order_is_a_balanced_permutation():
  for n in (1, 2, 4, 8):
    order = context_parallel.load_balanced_order(64, n)
    assert sorted(order.tolist()) == list(range(64))
    c = 64 // (2 * n) if n > 1 else 64
    for i in range(n if n > 1 else 0):  # device i holds chunks i and 2n-1-i
      held = order[i * 2 * c : (i + 1) * 2 * c]
      np.testing.assert_array_equal(held, np.r_[i * c : (i + 1) * c, (2 * n - 1 - i) * c : (2 * n - i) * c])


def test_reorder_keeps_the_batch_aligned_and_restore_inverts_it(tmp_path):
  config = make_config(tmp_path, f"max_target_length={LENGTH}", "ici_context_parallelism=4", "ici_fsdp_parallelism=2")
  batch = BATCHES[0]
  moved = context_parallel.reorder_batch({k: jax.numpy.asarray(v) for k, v in batch.items()}, config)
  order = context_parallel.token_index(config, LENGTH)
  for key, value in batch.items():
    # Every key moves by the same permutation, so each slot's token, position, segment and target stay together.
    np.testing.assert_array_equal(np.asarray(moved[key]), value[:, order])
    np.testing.assert_array_equal(np.asarray(context_parallel.restore(moved[key], 4)), value)
    np.testing.assert_array_equal(context_parallel.reorder(value, 4), value[:, order])
  assert not np.array_equal(order, np.arange(LENGTH))
  # Not balanced, or no context axis: the batch and the attention order stay natural.
  for args in (["ici_context_parallelism=4", "context_parallel_load_balance=false"], ["ici_fsdp_parallelism=8"]):
    plain = make_config(tmp_path, f"max_target_length={LENGTH}", *args)
    np.testing.assert_array_equal(context_parallel.token_index(plain, LENGTH), np.arange(LENGTH))
    assert context_parallel.reorder_batch(batch, plain)["inputs"] is batch["inputs"]
  np.testing.assert_array_equal(context_parallel.token_index(config, LENGTH, "prefill"), np.arange(LENGTH))


WINDOW = ("sliding_window_size=6",)


def test_packed_training_matches_unsharded(tmp_path):
  got = run_losses(tmp_path, "ici_context_parallelism=2", "ici_fsdp_parallelism=4")
  np.testing.assert_allclose(got, reference(tmp_path), rtol=1e-5)


@pytest.mark.parametrize("balanced", [True, False])
def test_sliding_window_training_matches_unsharded(tmp_path, balanced):
  """context=4 x fsdp=2 with a window shorter than the documents, balanced or not: the unsharded losses."""
  expected = reference(tmp_path, *WINDOW)
  assert not np.allclose(expected, reference(tmp_path), rtol=1e-3)  # the window matters at this length
  got = run_losses(
      tmp_path,
      "ici_context_parallelism=4",
      "ici_fsdp_parallelism=2",
      f"context_parallel_load_balance={balanced}",
      *WINDOW,
  )
  np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_length_must_split_into_balanced_chunks(tmp_path):
  with pytest.raises(ConfigError, match="max_target_length: 36 tokens do not split into 2 x 4"):
    make_config(tmp_path, "max_target_length=36", "ici_context_parallelism=4", "ici_fsdp_parallelism=2")
  # Without balancing only the context degree must divide the length.
  make_config(
      tmp_path,
      "max_target_length=36",
      "ici_context_parallelism=4",
      "ici_fsdp_parallelism=2",
      "context_parallel_load_balance=false",
  )
  with pytest.raises(ConfigError, match="max_target_length: 34 tokens do not split into 4 context shards"):
    make_config(
        tmp_path,
        "max_target_length=34",
        "ici_context_parallelism=4",
        "ici_fsdp_parallelism=2",
        "context_parallel_load_balance=false",
    )


@pytest.mark.parametrize("n", [2, 4, 8])
def test_balanced_layout_evens_causal_work(n):
  work = context_parallel.causal_work(1024, n, balanced=True)
  assert work.max() == work.min()
  plain = context_parallel.causal_work(1024, n, balanced=False)
  assert plain.sum() == work.sum() == 1024 * 1025 // 2
  assert plain.max() / plain.mean() > 1.4


@pytest.mark.parametrize("kernel", ["autoselected", "flash"])
def test_fused_kernels_take_the_balanced_order(tmp_path, kernel):
  """cuDNN/XLA (autoselected) and splash (flash, interpreted) see natural order restored: packed rows, a window,
  and under a context=4 x fsdp=2 mesh splash splits the heads over the context axis inside its shard_map."""
  b, s, hq, hkv, d, n, window = 2, 256, 4, 2, 16, 4, 48
  keys = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(keys[0], (b, s, hq, d))
  k, v = (jax.random.normal(key, (b, s, hkv, d)) for key in keys[1:])
  seg = jnp.stack([jnp.where(jnp.arange(s) < 100, 1, 2), jnp.where(jnp.arange(s) < 200, 1, 0)]).astype(jnp.int32)
  index = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
  mask = attentions.attention_mask(seg, seg, index, index, window)
  want = attention_ops.dot_product_attention(q, k, v, mask, scale=d**-0.5)
  config = make_config(tmp_path, "max_target_length=256", "ici_context_parallelism=4", "ici_fsdp_parallelism=2")
  mesh = sharding.create_mesh(config)
  if kernel == "flash":
    fn = functools.partial(
        attention_ops.splash_attention,
        block_size=128,
        interpret=True,
        logical_axis_rules=config.logical_axis_rules,
        context_shards=n,
    )
    qkv_spec, _ = attention_ops._splash_specs(mesh, config.logical_axis_rules, q.shape)  # pylint: disable=protected-access
    assert tuple(qkv_spec) == ("fsdp", None, "context", None)
  else:
    fn = functools.partial(context_parallel.in_natural_order, attention_ops.autoselected_attention, n)
  args = [context_parallel.reorder(x, n) for x in (q, k, v, seg)]
  with sharding.use_mesh(mesh, config.logical_axis_rules):
    got = jax.jit(lambda *a: fn(*a, scale=d**-0.5, sliding_window_size=window))(*args)
  keep = (seg != 0)[:, :, None, None]  # a padding query's output is unspecified in the kernels
  got = context_parallel.restore(got, n)
  assert jnp.abs(jnp.where(keep, got, 0) - jnp.where(keep, want, 0)).max() < 2e-5


@pytest.mark.parametrize("attention", ["dot_product", "paged"])
def test_decoding_on_a_mesh_with_a_context_axis_equals_without(attention):
  """A config trained with context parallelism decodes as it is (ici_context_parallelism=2 beside fsdp=4): the
  engine keeps prompts in natural order, and 5 prompts through 4 slots get the greedy tokens of the fsdp=8 mesh."""
  kw = {"model_name": "tests/tiny-llama", "decode_sampling_strategy": "greedy", "attention": attention}
  if attention == "paged":
    kw["pagedattn_tokens_per_page"] = 4
  params = nnx.state(mtu.build(**kw), nnx.Param).to_pure_dict()
  prompts = [np.random.default_rng(i).integers(0, 256, 3 + 2 * i).tolist() for i in range(5)]
  outputs = []
  for extra in ({}, {"ici_context_parallelism": 2}):
    config = mtu.config_of(**kw, **extra)
    engine = engine_lib.Engine(config, num_slots=4)
    assert dict(zip(config.mesh_axes, config.ici_parallelism))["context"] == extra.get("ici_context_parallelism", 1)
    scheduler = scheduler_lib.Scheduler(engine, engine.place_params(params))
    outputs.append(scheduler_lib.decode_prompts(scheduler, prompts, max_new_tokens=8))
  assert outputs[0] == outputs[1]
