"""The contiguous KV cache: [batch, kv_heads, length, head_dim] per attention layer (see MaxText.layers.cache).

Heads come before tokens, so attention over the cache is a batched matmul that reads the cache where it lies.
Keys/values are stored in the activation dtype, or as int8 with one float32 scale per token and head
(`quantize_kvcache`), which halves (bf16) or quarters (f32) the cache. The keys-only variant (`store_values=False`)
holds one array per token: MLA's compressed latent plus rope key, whose values are a slice of it.
"""

import jax
import jax.numpy as jnp

from MaxText.layers.cache.base import KV_NAMES, LENGTH_NAMES, AttentionView, Cache, cache_var


def quantize_int8(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Symmetric int8 over the last axis: x ~= q * scale, one float32 scale per [..., token, head]."""
  x32 = x.astype(jnp.float32)
  scale = jnp.max(jnp.abs(x32), axis=-1, keepdims=True) / 127.0
  scale = jnp.where(scale > 0, scale, 1.0)  # an all-zero vector stores zeros, not NaNs
  q = jnp.clip(jnp.round(x32 / scale), -127, 127).astype(jnp.int8)
  return q, scale


def dequantize_int8(q: jax.Array, scale: jax.Array, dtype) -> jax.Array:
  return (q.astype(jnp.float32) * scale).astype(dtype)


class KVCache(Cache):
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
    shape = tuple(stack) + (batch, num_kv_heads, length, head_dim)
    self.quantized = quantize
    self.dtype = dtype
    store = jnp.int8 if quantize else dtype
    self.store_values = store_values
    self.key = cache_var(jnp.zeros(shape, store), KV_NAMES, stack)
    self.value = cache_var(jnp.zeros(shape, store), KV_NAMES, stack) if store_values else None
    if quantize:
      self.key_scale = cache_var(jnp.ones(shape[:-1] + (1,), jnp.float32), KV_NAMES, stack)
      self.value_scale = cache_var(jnp.ones(shape[:-1] + (1,), jnp.float32), KV_NAMES, stack) if store_values else None
    self.lengths = cache_var(jnp.zeros(tuple(stack) + (batch,), jnp.int32), LENGTH_NAMES, stack)

  def _store(self, key: jax.Array, value: jax.Array | None, start: jax.Array):
    updates = {"key": key, "value": value} if self.store_values else {"key": key}
    if self.quantized:
      for name in list(updates):
        updates[name], updates[f"{name}_scale"] = quantize_int8(updates[name])
    for name, update in updates.items():
      self.write_step_rows(getattr(self, name), update, start)

  def keys_values(self) -> tuple[jax.Array, jax.Array | None]:
    """The whole cache [batch, kv_heads, length, head_dim] in the compute dtype (values None when keys-only)."""

    def read(name):
      if not self.store_values and name == "value":
        return None
      if self.quantized:
        return dequantize_int8(
            self.step_rows(getattr(self, name)), self.step_rows(getattr(self, f"{name}_scale")), self.dtype
        )
      return self.step_rows(getattr(self, name))

    return read("key"), read("value")

  def prefill(self, key: jax.Array, value: jax.Array | None, lengths: jax.Array):
    self._store(key, value, jnp.zeros(key.shape[:1], jnp.int32))
    self.lengths[...] = lengths.astype(jnp.int32)

  def attention_view(self, key: jax.Array, value: jax.Array | None) -> AttentionView:
    cached_keys, cached_values = self.keys_values()
    return self._view(cached_keys, cached_values, key, value)

  def load_stored(self, rows: dict[str, jax.Array], lengths: jax.Array):
    """Rows [B, H, tokens, ...] of stored arrays (a paged cache's stored_rows: same dtypes) as the start of this
    cache's contents, `lengths` [B] of them filled."""
    for name, value in rows.items():
      var = getattr(self, name)
      n = min(value.shape[2], var.shape[2])
      var[...] = var[...].at[:, :, :n].set(value[:, :, :n].astype(var.dtype))
    self.lengths[...] = lengths.astype(jnp.int32)

  def insert(self, prefix: Cache, slots: jax.Array):
    """The prefix's rows (as stored: int8 stays int8) go to `slots`, from token 0; the rest of a row is stale."""
    self._insert_rows(prefix, slots, tuple(self._row_vars()))
