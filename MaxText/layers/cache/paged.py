"""The paged KV cache (`attention: paged`): keys/values in fixed-size pages shared by all rows (see
MaxText.layers.cache).

Pages are [kv_heads, num_pages, tokens_per_page, head_dim] (the layout of the Pallas paged-attention kernels); each
row's page table maps its token t to page `table[t // tokens_per_page]`, offset `t % tokens_per_page`. The
host-side PageManager (MaxText.inference.page_manager) decides which pages a row holds; this module only reads and
writes them. The keys-only variant (`store_values=False`) pages MLA's latent cache. With `quantize_kvcache` the pages
hold int8 with float32 scale pages [kv_heads, num_pages, tokens_per_page, 1] beside them (as the contiguous cache
quantizes: one scale per token and head); attention dequantizes what it reads, so the jax and mirror paths take it.

Decode attention has three implementations (`paged_attention_kernel`):
- jax: gathers each row's pages into a [batch, kv_heads, pages x tokens_per_page, head_dim] view and runs the
  same masked attention as the contiguous cache (any backend; sliding windows and soft caps included), so its logits
  equal the contiguous cache's.
- mirror (the CPU default): every prompt token is also written to a contiguous copy of each row, [batch, kv_heads,
  pages x tokens_per_page, head_dim], which decode attention reads instead of gathering, and decode tokens go to
  that copy only. XLA:CPU gathers pages element by element (about 0.5 GB/s: 32 slots of 784 tokens took 8x the
  contiguous attention per layer), so the copy buys contiguous-cache decode speed for a contiguous cache's memory
  beside the pages. The pages hold the prompts, what is shared and cached (prefix caching reads them); the copy
  serves the row's own decode.
- pallas: reads the pages in place with a Pallas kernel: `jax.experimental.pallas.ops.gpu.paged_attention` on GPU,
  `jax.experimental.pallas.ops.tpu.paged_attention` on TPU (which reads keys/values as bfloat16, so auto picks it
  only for dtype bfloat16). Neither has a sliding window, so configs with one are refused. Under a mesh the kernel
  runs in a shard_map over the slot and kv-head shards (a Pallas call is opaque to GSPMD). It is imported only when
  selected.
"""

import dataclasses

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from MaxText import sharding
from MaxText.config import choices
from MaxText.config_schema import ConfigError
from MaxText.layers.cache.base import KV_NAMES, LENGTH_NAMES, AttentionView, Cache, cache_var, put_slot_rows
from MaxText.layers.cache.contiguous import dequantize_int8, quantize_int8

KERNELS = choices("paged_attention_kernel")
TPU_TOKENS_PER_BLOCK = 512  # tokens the TPU kernel reads per compute block (pages_per_compute_block x page size)
PALLAS_PLATFORMS = ("gpu", "tpu")
PAGE_NAMES = ("cache_heads", None, None, "cache_kv")
TABLE_NAMES = ("cache_batch", None)


@dataclasses.dataclass(frozen=True)
class PageSpec:
  """Dimensions of the paged cache and the decode attention implementation (jax, mirror, or pallas for `platform`)."""

  num_pages: int
  tokens_per_page: int
  max_pages_per_slot: int
  kernel: str = "jax"  # jax | mirror | pallas
  platform: str = "gpu"  # the Pallas kernel's platform (gpu | tpu); unused by the others

  @property
  def max_tokens_per_slot(self) -> int:
    return self.max_pages_per_slot * self.tokens_per_page


def page_spec_from_config(config, max_cache_length: int, backend: str | None = None) -> PageSpec:
  """The PageSpec for `config` (attention: paged), checked against the cache length and the backend (default: the
  config's hardware, which is tpu when compiling for a compile_topology on a CPU host)."""
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
  backend = backend or getattr(config, "hardware", None) or jax.default_backend()
  kernel = config.paged_attention_kernel
  masked = config.sliding_window_size > 0 or config.chunk_attn_window_size > 0
  if kernel == "pallas":
    if backend not in PALLAS_PLATFORMS:
      raise ConfigError(f"paged_attention_kernel: pallas runs on GPU or TPU only, the backend is {backend!r} (use jax)")
    if config.quantize_kvcache:
      raise ConfigError("paged_attention_kernel: the pallas kernel does not read int8 pages (quantize_kvcache); use jax")
    if masked:
      raise ConfigError(
          "paged_attention_kernel: the pallas kernel has no sliding window or chunked attention"
          " (sliding_window_size / chunk_attn_window_size > 0); use jax"
      )
  elif kernel == "auto":
    # The TPU kernel reads keys/values as bfloat16: auto takes it only for a bfloat16 cache, never rounding an f32 one.
    exact = backend == "gpu" or config.dtype == "bfloat16"
    usable = backend in PALLAS_PLATFORMS and not masked and not config.quantize_kvcache
    kernel = "pallas" if usable and exact else ("mirror" if backend == "cpu" else "jax")
  platform = backend if backend in PALLAS_PLATFORMS else "gpu"
  return PageSpec(config.pagedattn_num_pages, per_page, max_pages, kernel, platform)


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
  filled lengths [batch] of one attention layer (values None when keys-only); `quantize`: int8 pages with float32
  scale pages."""

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
      quantize: bool = False,
  ):
    shape = tuple(stack) + (num_kv_heads, spec.num_pages, spec.tokens_per_page, head_dim)
    self.dtype = dtype
    self.quantized = quantize
    self.kernel = spec.kernel if spec.kernel == "pallas" and store_values and not quantize else "jax"
    self.mirrored = spec.kernel == "mirror"
    self.platform = spec.platform
    store = jnp.int8 if quantize else dtype
    self.key_pages = cache_var(jnp.zeros(shape, store), PAGE_NAMES, stack)
    self.value_pages = cache_var(jnp.zeros(shape, store), PAGE_NAMES, stack) if store_values else None
    if quantize:
      scales = lambda: cache_var(jnp.ones(shape[:-1] + (1,), jnp.float32), PAGE_NAMES, stack)
      self.key_scale_pages = scales()
      self.value_scale_pages = scales() if store_values else None
    self.page_table = cache_var(jnp.zeros(tuple(stack) + (batch, spec.max_pages_per_slot), jnp.int32), TABLE_NAMES, stack)
    self.lengths = cache_var(jnp.zeros(tuple(stack) + (batch,), jnp.int32), LENGTH_NAMES, stack)
    if self.mirrored:  # "<name>_rows" beside each "<name>_pages", as stored (int8 and scales stay so)
      for name in self._stored_names():
        pages = getattr(self, f"{name}_pages")
        shape = tuple(stack) + (batch, num_kv_heads, spec.max_tokens_per_slot, pages.shape[-1])
        setattr(self, f"{name}_rows", cache_var(jnp.zeros(shape, pages.dtype), KV_NAMES, stack))

  def _stored_names(self) -> list[str]:
    """The stored arrays: key, value (unless keys-only), and their scales when quantized."""
    names = ["key"] if self.value_pages is None else ["key", "value"]
    return names + [f"{n}_scale" for n in names] if self.quantized else names

  def _updates(self, key: jax.Array, value: jax.Array | None) -> dict[str, jax.Array]:
    """key/value [B, S, H, D] as stored, by stored name."""
    updates = {"key": key} if self.value_pages is None else {"key": key, "value": value}
    if self.quantized:
      for name in list(updates):
        updates[name], updates[f"{name}_scale"] = quantize_int8(updates[name])
    return updates

  def _write(self, updates: dict[str, jax.Array], table: jax.Array, start: jax.Array):
    """Stored updates [B, S, H, D] written at tokens start[b].. of table row b."""
    for name, update in updates.items():
      pages = getattr(self, f"{name}_pages")
      pages[...] = write_tokens(pages[...], table, start, update)

  def _write_rows(self, updates: dict[str, jax.Array], start: jax.Array):
    """Stored updates [B, S, H, D] written to the mirror's row copy at tokens start[b].. of row b."""
    for name, update in updates.items():
      self.write_step_rows(getattr(self, f"{name}_rows"), update, start)

  def _store(self, key: jax.Array, value: jax.Array | None, start: jax.Array):
    """Decode tokens (append). With the mirror kernel they go to the row copy only: nothing reads them from the
    pages, which hold what insert and prefill wrote (the prompts, all that prefix caching shares), so a step writes
    one copy, not two (6% of a 32-slot llama-small step on CPU)."""
    updates = self._updates(key, value)
    if self.mirrored:
      self._write_rows(updates, start)
    else:
      self._write(updates, self.page_table[...], start)

  def prefill(self, key: jax.Array, value: jax.Array | None, lengths: jax.Array):
    updates, start = self._updates(key, value), jnp.zeros(key.shape[:1], jnp.int32)
    self._write(updates, self.page_table[...], start)
    if self.mirrored:
      self._write_rows(updates, start)
    self.lengths[...] = lengths.astype(jnp.int32)

  def attention_view(self, key: jax.Array, value: jax.Array | None) -> AttentionView:
    """Each row's pages gathered in token order (dequantized) as the cached part."""
    table = self.page_table[...]
    stored = (
        (lambda name: self.step_rows(getattr(self, f"{name}_rows")))
        if self.mirrored
        else (lambda name: gather_pages(getattr(self, f"{name}_pages")[...], table))
    )

    def read(name):
      if not self.quantized:
        return stored(name)
      return dequantize_int8(stored(name), stored(f"{name}_scale"), self.dtype)

    return self._view(read("key"), None if self.value_pages is None else read("value"), key, value)

  def insert(self, prefix: Cache, slots: jax.Array):
    """Scatters each prefix row into the pages its slot's page table row lists (set_page_table first)."""
    # The prefix's arrays as stored ([n, H, T, D]; int8 stays int8 with its scales), not requantized.
    stored = {name: getattr(prefix, name)[...] for name in self._stored_names()}
    zeros = jnp.zeros(slots.shape, jnp.int32)
    self._write({k: jnp.swapaxes(v, 1, 2) for k, v in stored.items()}, self.page_table[...][slots], zeros)
    self._insert_rows(prefix, slots, ("lengths",))
    if self.mirrored:  # cut to the rows' capacity (a gathered prefix can be longer)
      for name, src in stored.items():
        rows = getattr(self, f"{name}_rows")
        put_slot_rows(rows, src[:, :, : rows.shape[2]], slots)

  def stored_rows(self, table: jax.Array) -> dict[str, jax.Array]:
    """The pages of table rows [B, pages] in token order, as stored (int8 and scales stay so): {"key": [B, H,
    pages x tokens_per_page, D], "value", "key_scale", "value_scale" as the cache holds them} (prefix caching)."""
    return {name: gather_pages(getattr(self, f"{name}_pages")[...], table) for name in self._stored_names()}

  def set_page_table(self, table: jax.Array):
    self.page_table[...] = jnp.broadcast_to(jnp.asarray(table, jnp.int32), self.page_table.shape)

  def kernel_attention(
      self,
      query: jax.Array,
      key: jax.Array,
      value: jax.Array,
      *,
      scale: float,
      soft_cap: float,
      logical_axis_rules=None,
  ):
    """One new token per row [batch, 1, heads, head_dim]: append it, then attend over the pages with the Pallas
    kernel of the cache's platform (it reads the cache in place, so the write comes first). Under a mesh
    (jax.set_mesh) with `logical_axis_rules`, the kernel runs on each device's slots and kv heads (shard_map)."""
    if query.shape[1] != 1:
      raise ValueError(f"the paged kernel decodes one token per row, got {query.shape[1]}")
    self.append(key, value)
    args = (query[:, 0].astype(self.dtype), self.key_pages[...], self.value_pages[...])
    args += (self.page_table[...], self.lengths[...])

    def attend(q, k_pages, v_pages, table, lengths):
      return pallas_decode_attention(
          q, k_pages, v_pages, table, lengths, scale=scale, soft_cap=soft_cap, platform=self.platform
      )

    mesh = jax.sharding.get_abstract_mesh()
    if logical_axis_rules is not None and not mesh.empty and mesh.size > 1:
      attend = _sharded(attend, mesh, logical_axis_rules, args)
    return attend(*args)[:, None]


def _sharded(attend, mesh, rules, args):
  """`attend` in a shard_map: slots over cache_batch's mesh axes, query and kv heads over cache_heads' (the query
  heads of one kv head stay on its device); every device keeps all pages of its kv heads (pages hold every slot)."""
  query, k_pages = args[0], args[1]
  batch = sharding.logical_to_mesh_spec(("cache_batch",), rules, mesh, query.shape[:1])
  heads = sharding.logical_to_mesh_spec(("cache_heads",), rules, mesh, k_pages.shape[:1])
  b = batch[0] if len(batch) else None
  h = heads[0] if len(heads) else None
  q_spec, page_spec = P(b, h, None), P(h, None, None, None)
  specs = (q_spec, page_spec, page_spec, P(b, None), P(b))
  return jax.shard_map(attend, mesh=mesh, in_specs=specs, out_specs=q_spec, check_vma=False)


def pallas_decode_attention(
    query, key_pages, value_pages, table, lengths, *, scale, soft_cap, interpret=False, platform="gpu"
):
  """query [B, heads, D] over each row's first lengths[b] paged tokens with the Pallas kernel of `platform` (gpu or
  tpu) -> [B, heads, D].

  The kernels do not scale the logits, so the queries are scaled first (the soft cap then applies to scaled logits,
  as in dot_product_attention). `interpret` runs the GPU kernel in Pallas' interpreter (any backend; for tests);
  the TPU kernel interprets under `jax.experimental.pallas.tpu.force_tpu_interpret_mode()`.
  """
  q = (query.astype(jnp.float32) * scale).astype(query.dtype)
  cap = soft_cap if soft_cap > 0 else None
  if platform == "tpu":
    # pylint: disable-next=import-outside-toplevel
    from jax.experimental.pallas.ops.tpu import paged_attention as pallas_tpu

    pages_per_block = _largest_divisor(table.shape[-1], max(1, TPU_TOKENS_PER_BLOCK // key_pages.shape[2]))
    return pallas_tpu.paged_attention(
        q,
        key_pages,
        value_pages,
        lengths,
        table,
        attn_logits_soft_cap=cap,
        pages_per_compute_block=pages_per_block,
    )
  if platform != "gpu":
    raise ValueError(f"the Pallas paged kernel runs on {list(PALLAS_PLATFORMS)}, not {platform!r}")
  # pylint: disable-next=import-outside-toplevel
  from jax.experimental.pallas.ops.gpu import paged_attention as pallas_paged

  return pallas_paged.paged_attention(
      q,
      key_pages,
      value_pages,
      table,
      lengths,
      attn_logits_soft_cap=cap,
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
