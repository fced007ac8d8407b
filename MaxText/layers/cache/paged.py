"""The paged KV cache (`attention: paged`): keys/values in fixed-size pages shared by all rows (see
MaxText.layers.cache).

Pages are [kv_heads, num_pages, tokens_per_page, head_dim] (the layout of the Pallas paged-attention kernels); each
row's page table maps its token t to page `table[t // tokens_per_page]`, offset `t % tokens_per_page`. The
host-side PageManager (MaxText.inference.page_manager) decides which pages a row holds; this module only reads and
writes them. The keys-only variant (`store_values=False`) pages MLA's latent cache.

Decode attention has two implementations (`paged_attention_kernel`):
- jax: gathers each row's pages into a [batch, kv_heads, pages x tokens_per_page, head_dim] view and runs the
  same masked attention as the contiguous cache (any backend; sliding windows and soft caps included), so its logits
  equal the contiguous cache's.
- pallas: `jax.experimental.pallas.ops.gpu.paged_attention` on GPU, which reads the pages in place. It has no
  sliding window, so configs with one are refused. It is imported only when selected.
"""

import dataclasses

import jax
import jax.numpy as jnp

from MaxText.config import choices
from MaxText.config_schema import ConfigError
from MaxText.layers.cache.base import LENGTH_NAMES, AttentionView, Cache, cache_var

KERNELS = choices("paged_attention_kernel")
PAGE_NAMES = ("cache_heads", None, None, "cache_kv")
TABLE_NAMES = ("cache_batch", None)


@dataclasses.dataclass(frozen=True)
class PageSpec:
  """Dimensions of the paged cache and the decode attention implementation ("jax" or "pallas")."""

  num_pages: int
  tokens_per_page: int
  max_pages_per_slot: int
  kernel: str = "jax"

  @property
  def max_tokens_per_slot(self) -> int:
    return self.max_pages_per_slot * self.tokens_per_page


def page_spec_from_config(config, max_cache_length: int, backend: str | None = None) -> PageSpec:
  """The PageSpec for `config` (attention: paged), checked against the cache length and the backend."""
  per_page = config.pagedattn_tokens_per_page
  max_pages = config.pagedattn_max_pages_per_slot or -(-max_cache_length // per_page)
  if max_pages * per_page < max_cache_length:
    raise ConfigError(
        f"pagedattn_max_pages_per_slot: {max_pages} pages of {per_page} tokens hold fewer than the"
        f" {max_cache_length} tokens of max_target_length"
    )
  if config.pagedattn_num_pages - 1 < max_pages:
    raise ConfigError(
        f"pagedattn_num_pages: {config.pagedattn_num_pages} pages (page 0 is scratch) cannot hold one sequence of"
        f" {max_pages} pages (raise pagedattn_num_pages or lower max_target_length)"
    )
  if config.quantize_kvcache:
    raise ConfigError("quantize_kvcache: the int8 KV cache is not available with attention=paged")
  backend = backend or jax.default_backend()
  kernel = config.paged_attention_kernel
  masked = config.sliding_window_size > 0 or config.chunk_attn_window_size > 0
  if kernel == "pallas":
    if backend != "gpu":
      raise ConfigError(f"paged_attention_kernel: pallas runs on GPU only, the backend is {backend!r} (use jax)")
    if masked:
      raise ConfigError(
          "paged_attention_kernel: the pallas kernel has no sliding window or chunked attention"
          " (sliding_window_size / chunk_attn_window_size > 0); use jax"
      )
  elif kernel == "auto":
    kernel = "pallas" if backend == "gpu" and not masked else "jax"
  return PageSpec(config.pagedattn_num_pages, per_page, max_pages, kernel)


def write_tokens(pages: jax.Array, table: jax.Array, start: jax.Array, new: jax.Array) -> jax.Array:
  """pages [H, P, T, D] with new [B, S, H, D] written at tokens start[b] .. start[b] + S - 1 of table row b.

  Tokens past the table's capacity go to the scratch page 0.
  """
  per_page = pages.shape[2]
  index = start[:, None] + jnp.arange(new.shape[1], dtype=jnp.int32)  # [B, S]
  slot_page = jnp.minimum(index // per_page, table.shape[1] - 1)
  page = jnp.where(index < table.shape[1] * per_page, jnp.take_along_axis(table, slot_page, axis=1), 0)
  return pages.at[:, page, index % per_page].set(jnp.moveaxis(new, 2, 0).astype(pages.dtype))


def gather_pages(pages: jax.Array, table: jax.Array) -> jax.Array:
  """Each row's pages in token order: [B, H, pages_per_slot x tokens_per_page, D]."""
  heads, _, per_page, dim = pages.shape
  rows = pages[:, table]  # [H, B, pages_per_slot, T, D]
  return jnp.swapaxes(rows.reshape(heads, table.shape[0], table.shape[1] * per_page, dim), 0, 1)


class PagedKVCache(Cache):
  """Key/value pages [kv_heads, num_pages, tokens_per_page, head_dim], page table [batch, pages_per_slot] and
  filled lengths [batch] of one attention layer (values None when keys-only)."""

  def __init__(
      self,
      batch: int,
      spec: PageSpec,
      num_kv_heads: int,
      head_dim: int,
      *,
      dtype,
      stack: tuple[int, ...] = (),
      store_values: bool = True,
  ):
    shape = tuple(stack) + (num_kv_heads, spec.num_pages, spec.tokens_per_page, head_dim)
    self.dtype = dtype
    self.kernel = spec.kernel if store_values else "jax"  # the kernel needs values
    self.key_pages = cache_var(jnp.zeros(shape, dtype), PAGE_NAMES, stack)
    self.value_pages = cache_var(jnp.zeros(shape, dtype), PAGE_NAMES, stack) if store_values else None
    self.page_table = cache_var(jnp.zeros(tuple(stack) + (batch, spec.max_pages_per_slot), jnp.int32), TABLE_NAMES, stack)
    self.lengths = cache_var(jnp.zeros(tuple(stack) + (batch,), jnp.int32), LENGTH_NAMES, stack)

  def _write(self, key: jax.Array, value: jax.Array | None, table: jax.Array, start: jax.Array):
    """key/value [B, S, H, D] written at tokens start[b].. of table row b."""
    self.key_pages[...] = write_tokens(self.key_pages[...], table, start, key)
    if self.value_pages is not None:
      self.value_pages[...] = write_tokens(self.value_pages[...], table, start, value)

  def _store(self, key: jax.Array, value: jax.Array | None, start: jax.Array):
    self._write(key, value, self.page_table[...], start)

  def prefill(self, key: jax.Array, value: jax.Array | None, lengths: jax.Array):
    self._store(key, value, jnp.zeros(key.shape[:1], jnp.int32))
    self.lengths[...] = lengths.astype(jnp.int32)

  def attention_view(self, key: jax.Array, value: jax.Array | None) -> AttentionView:
    """Each row's pages gathered in token order as the cached part."""
    table = self.page_table[...]
    values = None if self.value_pages is None else gather_pages(self.value_pages[...], table)
    return self._view(gather_pages(self.key_pages[...], table), values, key, value)

  def insert(self, prefix: Cache, slots: jax.Array):
    """Scatters each prefix row into the pages its slot's page table row lists (set_page_table first)."""
    keys, values = prefix.keys_values()  # [n, H, T, D]
    heads_second = lambda x: None if x is None else jnp.swapaxes(x, 1, 2)
    zeros = jnp.zeros(slots.shape, jnp.int32)
    self._write(heads_second(keys), heads_second(values), self.page_table[...][slots], zeros)
    self._insert_rows(prefix, slots, ("lengths",))

  def set_page_table(self, table: jax.Array):
    self.page_table[...] = jnp.broadcast_to(jnp.asarray(table, jnp.int32), self.page_table.shape)

  def kernel_attention(self, query: jax.Array, key: jax.Array, value: jax.Array, *, scale: float, soft_cap: float):
    """One new token per row [batch, 1, heads, head_dim]: append it, then attend over the pages with the Pallas
    GPU kernel (it reads the cache in place, so the write comes first)."""
    if query.shape[1] != 1:
      raise ValueError(f"the paged kernel decodes one token per row, got {query.shape[1]}")
    self.append(key, value)
    out = pallas_decode_attention(
        query[:, 0].astype(self.dtype),
        self.key_pages[...],
        self.value_pages[...],
        self.page_table[...],
        self.lengths[...],
        scale=scale,
        soft_cap=soft_cap,
    )
    return out[:, None]


def pallas_decode_attention(query, key_pages, value_pages, table, lengths, *, scale, soft_cap, interpret=False):
  """query [B, heads, D] over each row's first lengths[b] paged tokens with the Pallas GPU kernel -> [B, heads, D].

  The kernel does not scale the logits, so the queries are scaled first (the soft cap then applies to scaled logits,
  as in dot_product_attention). `interpret` runs the kernel in Pallas' interpreter (any backend; for tests).
  """
  # pylint: disable-next=import-outside-toplevel
  from jax.experimental.pallas.ops.gpu import paged_attention as pallas_paged

  q = (query.astype(jnp.float32) * scale).astype(query.dtype)
  return pallas_paged.paged_attention(
      q,
      key_pages,
      value_pages,
      table,
      lengths,
      attn_logits_soft_cap=soft_cap if soft_cap > 0 else None,
      interpret=interpret,
      **kernel_blocks(table.shape[-1]),
  )


def _largest_divisor(n: int, at_most: int) -> int:
  return max(d for d in range(1, min(n, at_most) + 1) if n % d == 0)


def kernel_blocks(pages_per_slot: int) -> dict[str, int]:
  """Work split of the Pallas GPU kernel: it needs k_splits | pages_per_slot and pages_per_compute_block | the pages
  of one split; the kernel's defaults (16 splits, 8 pages per block) are upper bounds."""
  k_splits = _largest_divisor(pages_per_slot, 16)
  return {"k_splits": k_splits, "pages_per_compute_block": _largest_divisor(pages_per_slot // k_splits, 8)}
