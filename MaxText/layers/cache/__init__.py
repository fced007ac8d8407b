"""The KV-cache protocol: what attention layers and the decode engine may ask of a cache, whatever its layout.

A cache holds `batch` rows (decode slots) and each row's filled length, so rows at different points of their
sequences step together. Attention layers call three methods:
  prefill(key, value, lengths)      start every row afresh with a prompt's keys/values
  attention_view(key, value)        what new tokens attend to: the cache as it is, then themselves (AttentionView)
  append(key, value, after=...)     write the new tokens after each row's filled part
and the engine (MaxText.inference.engine) moves rows between caches with four more:
  insert(prefix, slots)             put the rows of a prefilled (contiguous) cache into these slots
  take_rows(n) / put_rows(saved)    narrow the cache to slots [0, n) for a step, then widen it back
  set_page_table(table)             the host's page table (paged caches; the others ignore it)

Implementations: KVCache (contiguous.py: [batch, kv_heads, length, head_dim]) and PagedKVCache (paged.py: pages
shared by all rows plus a page table), both optionally int8. Both have a keys-only variant (`store_values=False`) that
Multi-head Latent Attention uses for its latent cache (MaxText/layers/mla.py). `new_cache` builds the one a config
asks for. Every cache array is a KVCacheVar, so `nnx.state(model, KVCacheVar)` selects exactly the cache.

Entries past a row's length are never attended (they get segment id 0), so stale values left by an earlier occupant
of a slot are harmless and a slot is reused without clearing it.
"""

from flax import nnx

from MaxText.layers.cache.base import (
    BATCH_AXIS_NAME,
    KV_NAMES,
    LENGTH_NAMES,
    SEQUENCE_AXIS_NAME,
    AttentionView,
    Cache,
    KVCacheVar,
)
from MaxText.layers.cache.contiguous import KVCache, dequantize_int8, quantize_int8
from MaxText.layers.cache.paged import PagedKVCache, PageSpec, page_spec_from_config

__all__ = [
    "BATCH_AXIS_NAME",
    "KV_NAMES",
    "LENGTH_NAMES",
    "SEQUENCE_AXIS_NAME",
    "AttentionView",
    "Cache",
    "KVCache",
    "KVCacheVar",
    "PageSpec",
    "PagedKVCache",
    "caches",
    "dequantize_int8",
    "new_cache",
    "page_spec_from_config",
    "quantize_int8",
]


def new_cache(
    batch: int, length: int, num_kv_heads: int, head_dim: int, *, paged: PageSpec | None = None, **options
) -> Cache:
  """The cache an attention layer asks for: paged (`paged`: a PageSpec; `length` unused) or contiguous.

  `options`: dtype, stack, store_values, quantize (int8 with a float32 scale per token and head).
  """
  if paged is not None:
    return PagedKVCache(batch, paged, num_kv_heads, head_dim, **options)
  return KVCache(batch, length, num_kv_heads, head_dim, **options)


def caches(model: nnx.Module) -> dict[tuple, Cache]:
  """Every cache of a model by its path (the engine's only way in)."""
  return {path: m for path, m in nnx.iter_modules(model) if isinstance(m, Cache)}
