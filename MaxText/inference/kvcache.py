"""The KV cache of one attention layer, held as nnx state so decoding runs the training modules unchanged.

A cache holds `batch` rows (decode slots) of up to `length` tokens each, and each row's filled length, so rows
at different points of their sequences step together. Arrays are [batch, kv_heads, length, head_dim]: heads before
tokens, so attention over the cache is a batched matmul that reads the cache where it lies. Keys/values are stored
in the activation dtype, or as int8 with one float32 scale per token and head (`quantize_kvcache`), which halves
(bf16) or quarters (f32) the cache.

A keys-only cache (`store_values=False`) holds one array per token: Multi-head Latent Attention caches its
compressed latent plus rope key there and reads its values as a slice of it (MaxText/layers/mla.py).

Entries past a row's length are never attended (they get segment id 0), so stale values left by an earlier
occupant of a slot are harmless and a slot is reused without clearing it.
"""

import dataclasses

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


def quantize_int8(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Symmetric int8 over the last axis: x ~= q * scale, one float32 scale per [..., token, head]."""
  x32 = x.astype(jnp.float32)
  scale = jnp.max(jnp.abs(x32), axis=-1, keepdims=True) / 127.0
  scale = jnp.where(scale > 0, scale, 1.0)  # an all-zero vector stores zeros, not NaNs
  q = jnp.clip(jnp.round(x32 / scale), -127, 127).astype(jnp.int8)
  return q, scale


def dequantize_int8(q: jax.Array, scale: jax.Array, dtype) -> jax.Array:
  return (q.astype(jnp.float32) * scale).astype(dtype)


def _write_rows(cache: jax.Array, update: jax.Array, start: jax.Array) -> jax.Array:
  """cache [B, H, T, ...] with update [B, S, H, ...] written at tokens start[b] .. start[b] + S - 1 of row b."""
  update = jnp.swapaxes(update, 1, 2)
  return jax.vmap(lambda c, u, i: jax.lax.dynamic_update_slice_in_dim(c, u, i, axis=1))(cache, update, start)


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


class KVCache(nnx.Module):
  """Keys and values [batch, kv_heads, length, head_dim] and filled lengths [batch] of one attention layer.

  `stack` prepends leading dimensions (the layer count of a scanned decoder stack, named "layers"); inside the scan
  each layer sees its own slice, which is what the methods below work on.
  """

  def __init__(
      self,
      batch: int,
      length: int,
      num_kv_heads: int,
      head_dim: int,
      *,
      dtype,
      quantize: bool = False,
      stack: tuple[int, ...] = (),
      store_values: bool = True,
  ):
    lead = ("layers",) * len(stack)
    shape = tuple(stack) + (batch, num_kv_heads, length, head_dim)

    def var(value, names):
      return KVCacheVar(value, out_sharding=lead + names, eager_sharding=False)

    self.quantized = quantize
    self.dtype = dtype
    store = jnp.int8 if quantize else dtype
    self.store_values = store_values
    self.key = var(jnp.zeros(shape, store), KV_NAMES)
    self.value = var(jnp.zeros(shape, store), KV_NAMES) if store_values else None
    if quantize:
      self.key_scale = var(jnp.ones(shape[:-1] + (1,), jnp.float32), KV_NAMES)
      self.value_scale = var(jnp.ones(shape[:-1] + (1,), jnp.float32), KV_NAMES) if store_values else None
    self.lengths = var(jnp.zeros(tuple(stack) + (batch,), jnp.int32), LENGTH_NAMES)

  def _store(self, key: jax.Array, value: jax.Array | None, start: jax.Array):
    updates = {"key": key, "value": value} if self.store_values else {"key": key}
    if self.quantized:
      for name in list(updates):
        updates[name], updates[f"{name}_scale"] = quantize_int8(updates[name])
    for name, update in updates.items():
      cache = getattr(self, name)
      cache[...] = _write_rows(cache[...], update.astype(cache.dtype), start)

  def keys_values(self) -> tuple[jax.Array, jax.Array | None]:
    """The whole cache [batch, kv_heads, length, head_dim] in the compute dtype (values None when keys-only)."""

    def read(name):
      if not self.store_values and name == "value":
        return None
      if self.quantized:
        return dequantize_int8(getattr(self, name)[...], getattr(self, f"{name}_scale")[...], self.dtype)
      return getattr(self, name)[...]

    return read("key"), read("value")

  def prefill(self, key: jax.Array, value: jax.Array | None, lengths: jax.Array):
    """Starts every row afresh with a prompt's keys/values [batch, S, kv_heads, head_dim]; `lengths` [batch] counts
    its real tokens."""
    self._store(key, value, jnp.zeros(key.shape[:1], jnp.int32))
    self.lengths[...] = lengths.astype(jnp.int32)

  def attention_view(self, key: jax.Array, value: jax.Array | None) -> AttentionView:
    """What S new tokens [batch, S, kv_heads, head_dim] attend to: the cache as it is, then themselves.

    Cached entries at or past a row's length are given segment 0 (the new tokens have 1), which masks them out.
    """
    batch, new = key.shape[:2]
    length = self.key.shape[2]
    start = self.lengths[...]
    q_index = start[:, None] + jnp.arange(new, dtype=jnp.int32)
    cached_index = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    filled = (cached_index < start[:, None]).astype(jnp.int32)
    cached_keys, cached_values = self.keys_values()
    heads_first = lambda x: jnp.swapaxes(x, 1, 2).astype(self.dtype)
    return AttentionView(
        keys=(cached_keys, heads_first(key)),
        values=None if value is None else (cached_values, heads_first(value)),
        q_index=q_index,
        kv_index=jnp.concatenate([cached_index, q_index], axis=1),
        kv_segment_ids=jnp.concatenate([filled, jnp.ones((batch, new), jnp.int32)], axis=1),
    )

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
