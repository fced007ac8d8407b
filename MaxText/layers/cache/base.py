"""The cache protocol's base class and shared pieces (see MaxText.layers.cache)."""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

# Logical axis names of the cached arrays; logical_axis_rules shard them (a stacked-layer axis "layers" leads).
KV_NAMES = ("cache_batch", "cache_heads", "cache_sequence", "cache_kv")
LENGTH_NAMES = ("cache_batch",)
BATCH_AXIS_NAME = "cache_batch"
SEQUENCE_AXIS_NAME = "cache_sequence"


class KVCacheVar(nnx.Cache):
  """The variable type of every KV-cache array, so `nnx.state(model, KVCacheVar)` selects exactly the cache."""


@dataclasses.dataclass(frozen=True)
class AttentionView:
  """Inputs of attention for new tokens over a cache: two key/value parts (cache [batch, kv_heads, length, head_dim],
  new tokens [batch, kv_heads, S, head_dim]) with indices and segment ids over both parts, in that order.
  `values` is None for a keys-only cache."""

  keys: tuple[jax.Array, jax.Array]
  values: tuple[jax.Array, jax.Array] | None
  q_index: jax.Array
  kv_index: jax.Array
  kv_segment_ids: jax.Array


def cache_var(value: jax.Array, names: tuple, stack: tuple[int, ...]) -> KVCacheVar:
  """A cache array with logical axis names (a leading "layers" per `stack` dim of a scanned stack)."""
  return KVCacheVar(value, out_sharding=("layers",) * len(stack) + tuple(names), eager_sharding=False)


def _batch_axis(var: KVCacheVar) -> int | None:
  names = list(var.get_metadata()["out_sharding"])
  return names.index(BATCH_AXIS_NAME) if BATCH_AXIS_NAME in names else None


def _has_token_axis(var: KVCacheVar) -> bool:
  return SEQUENCE_AXIS_NAME in var.get_metadata()["out_sharding"]


def write_rows(cache: jax.Array, update: jax.Array, start: jax.Array) -> jax.Array:
  """cache [B, H, T, ...] with update [B, S, H, ...] written at tokens start[b] .. start[b] + S - 1 of row b."""
  update = jnp.swapaxes(update, 1, 2)
  return jax.vmap(lambda c, u, i: jax.lax.dynamic_update_slice_in_dim(c, u, i, axis=1))(cache, update, start)


def put_row(dst: jax.Array, src: jax.Array, axis: int, i: int, slot: jax.Array) -> jax.Array:
  """dst with row i of src (along `axis`) written at row `slot`, from index 0 of the other axes."""
  row = jax.lax.dynamic_slice_in_dim(src, i, 1, axis)
  start = [0] * dst.ndim
  start[axis] = slot
  return jax.lax.dynamic_update_slice(dst, row.astype(dst.dtype), start)


def put_slot_rows(dst: KVCacheVar, src: jax.Array, slots: jax.Array):
  """Row i of src (along dst's batch axis) written to row slots[i] of dst, from index 0 of the other axes."""
  axis, value = _batch_axis(dst), dst[...]
  for i in range(slots.shape[0]):
    value = put_row(value, src, axis, i, slots[i])
  dst.set_value(value)


class Cache(nnx.Module):
  """Base of every KV cache (see the module doc). Subclasses define prefill/attention_view/append/insert and hold
  `lengths` [batch] and `dtype`; the row methods here work on every array with a "cache_batch" axis."""

  kernel = "jax"  # "pallas": attention runs as kernel_attention, which reads the cache in place
  dtype: Any
  lengths: KVCacheVar
  # Set by take_rows: a step of rows [0, rows_in_step) only. Arrays with a token axis stay whole then (see take_rows):
  # read them through step_rows, write them through write_step_rows.
  rows_in_step: int | None = None

  def prefill(self, key: jax.Array, value: jax.Array | None, lengths: jax.Array):
    """Starts every row afresh with a prompt's keys/values [batch, S, kv_heads, head_dim]; `lengths` [batch] counts
    its real tokens."""
    raise NotImplementedError

  def attention_view(self, key: jax.Array, value: jax.Array | None) -> AttentionView:
    """What S new tokens [batch, S, kv_heads, head_dim] attend to: the cache as it is, then themselves."""
    raise NotImplementedError

  def _store(self, key: jax.Array, value: jax.Array | None, start: jax.Array):
    raise NotImplementedError

  def insert(self, prefix: "Cache", slots: jax.Array):
    """Row i of `prefix` (a contiguous cache filled by prefill) becomes slot slots[i] of this cache."""
    raise NotImplementedError

  def append(self, key: jax.Array, value: jax.Array | None, *, after: jax.Array | None = None):
    """Writes S new tokens [batch, S, kv_heads, head_dim] after each row's filled part.

    `after`: a result computed from the cache as it was (the attention output). Making the write depend on it lets
    XLA update the cache in place once every read is done; without it XLA (on CPU) copies the whole cache first.
    Adding 0 * (one element of it) changes no finite value.
    """
    if after is not None:
      tie = jnp.zeros((), jnp.float32) * after.reshape(-1)[0].astype(jnp.float32)
      key = key + tie.astype(key.dtype)
      value = None if value is None else value + tie.astype(value.dtype)
    start = self.lengths[...]
    self._store(key, value, start)
    self.lengths[...] = start + key.shape[1]

  def kernel_attention(self, query, key, value, *, scale: float, soft_cap: float) -> jax.Array:
    raise NotImplementedError(f"{type(self).__name__} has no attention kernel")

  def set_page_table(self, table: jax.Array):
    """The page table int [batch, pages_per_slot] of a paged cache; a contiguous cache has none."""
    del table

  def _row_vars(self) -> dict[str, tuple[KVCacheVar, int]]:
    return {
        name: (var, _batch_axis(var))
        for name, var in vars(self).items()
        if isinstance(var, KVCacheVar) and _batch_axis(var) is not None
    }

  def take_rows(self, n: int) -> dict[str, jax.Array]:
    """Narrows the cache to rows [0, n) for a step; returns what put_rows needs to widen it back.

    Small per-row arrays (lengths, page table) are sliced. Arrays with a token axis (keys, values, scales, a paged
    mirror's rows) stay whole: slicing them and writing the slice back copies n rows of the whole cache twice per
    step, which made a 16-row step on CPU ~3x a 32-row one. Steps read their first n rows (step_rows) and write
    into those rows in place (write_step_rows)."""
    saved = {}
    for name, (var, axis) in self._row_vars().items():
      if not _has_token_axis(var):
        saved[name] = var[...]
        var.set_value(jax.lax.slice_in_dim(saved[name], 0, n, axis=axis))
    self.rows_in_step = n
    return saved

  def put_rows(self, saved: dict[str, jax.Array]):
    """Widens the cache back to all rows: the full arrays of take_rows with rows [0, n) from this cache."""
    for name, value in saved.items():
      var = getattr(self, name)
      var.set_value(jax.lax.dynamic_update_slice(value, var[...], [0] * value.ndim))
    self.rows_in_step = None

  def step_rows(self, var: KVCacheVar) -> jax.Array:
    """A per-row array with a token axis [batch, ...] (one layer's) as this step sees it: rows [0, rows_in_step)."""
    value = var[...]
    return value if self.rows_in_step is None else value[: self.rows_in_step]

  def write_step_rows(self, var: KVCacheVar, update: jax.Array, start: jax.Array):
    """update [rows, S, H, ...] written into var [batch, H, tokens, ...] at tokens start[b].. of row b: all rows, or
    in place into rows [0, rows_in_step) of the whole array during a narrow step."""
    update = update.astype(var.dtype)
    if self.rows_in_step is None:
      var[...] = write_rows(var[...], update, start)
      return
    rows = jnp.arange(update.shape[0])[:, None]
    tokens = start[:, None] + jnp.arange(update.shape[1])
    var[...] = var[...].at[rows, :, tokens].set(update)

  def _insert_rows(self, prefix: "Cache", slots: jax.Array, names: tuple[str, ...]):
    """Copies rows of prefix's arrays `names` into `slots` (unrolled: a prefix holds a few prompts)."""
    for name in names:
      put_slot_rows(getattr(self, name), getattr(prefix, name)[...], slots)

  def _view(self, cached_keys, cached_values, key: jax.Array, value: jax.Array | None) -> AttentionView:
    """The AttentionView of new tokens over cached parts [batch, kv_heads, length, head_dim] of this cache.

    Cached entries at or past a row's length are given segment 0 (the new tokens have 1), which masks them out.
    """
    batch, new = key.shape[:2]
    length = cached_keys.shape[2]
    start = self.lengths[...]
    q_index = start[:, None] + jnp.arange(new, dtype=jnp.int32)
    cached_index = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    filled = (cached_index < start[:, None]).astype(jnp.int32)
    heads_first = lambda x: jnp.swapaxes(x, 1, 2).astype(self.dtype)
    return AttentionView(
        keys=(cached_keys, heads_first(key)),
        values=None if value is None else (cached_values, heads_first(value)),
        q_index=q_index,
        kv_index=jnp.concatenate([cached_index, q_index], axis=1),
        kv_segment_ids=jnp.concatenate([filled, jnp.ones((batch, new), jnp.int32)], axis=1),
    )
