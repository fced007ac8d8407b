"""A JetStream-style decode engine over the training model: prefill -> insert -> generate, with batch slots.

    engine = Engine(config)                        # slots = per_device_batch_size x devices
    prefix = engine.prefill(params, tokens, true_length)   # a prompt's KV cache and its first sampled token
    state = engine.init_decode_state()             # KV cache of [slots, max_target_length] + per-slot position
    state = engine.insert(prefix, state, slot)     # the prompt now occupies `slot`
    state, tokens = engine.generate(params, state) # one new token for every slot

Each slot carries its own length, so prompts of different lengths decode together and a finished slot takes a new
prompt while the others go on. Params are the pure dict training checkpoints hold; the model is rebuilt from the
graphdef inside each jitted function, and the decode state (a plain pytree) is donated so the cache updates in place.

The engine always runs the layer stack unrolled (scan_layers=false) and without remat, whatever the config trains
with: a decode step reads every weight once for a few tokens, and a scanned stack would first slice (copy) each
layer's weights out of the stacked arrays (2-4x slower per step on CPU); remat only serves gradients, and its
optimization barriers keep XLA from updating the cache in place. Params in the scanned layout are converted on load.

With `attention: paged` the decode state holds KV pages shared by all slots and a page table per slot, which the
caller fills from a host-side PageManager (`set_page_table`); prefill still builds a contiguous prefix cache and
insert scatters it into the slot's pages. `generate(..., rows=n, row_settings=...)` steps only slots [0, n) with
per-row sampling settings: the continuous-batching Scheduler (MaxText.inference.scheduler) drives it that way.
"""

import dataclasses
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from MaxText import pyconfig, sharding, train
from MaxText.inference import batch_sampling, kvcache, paged_attention, sampling
from MaxText.layers import scan_layout

Params = Any
DecodeState = dict[str, Any]  # {"cache": pure dict, "tokens": [slots], "positions": [slots], "key": PRNG key}
Prefix = dict[str, Any]  # {"cache": pure dict, "tokens": [n], "lengths": [n], "logits": [n, vocab]}


def _pure(tree):
  if isinstance(tree, (nnx.State, dict)):
    return {k: _pure(v) for k, v in tree.items()}
  return tree


def unrolled_config(config) -> pyconfig.Config:
  """The config with scan_layers=false and remat_policy=none: the model the engine builds (see the module doc)."""
  if not config.scan_layers and config.remat_policy == "none":
    return config
  values = {k: getattr(config, k) for k in config.keys()}
  return pyconfig.Config({**values, "scan_layers": False, "remat_policy": "none"})


def unrolled_params(params: Params, param_scan_axis: int) -> Params:
  """Params pure dict in the unscanned layout (converted if its decoder layers are stacked)."""
  layers = params.get("decoder", {}).get("layers", {})
  if layers and not all(str(k).isdigit() for k in layers):
    return scan_layout.scanned_to_unscanned(params, param_scan_axis)
  return params


def prefill_buckets(max_prefill_length: int, smallest: int = 16) -> list[int]:
  """Padded prompt lengths (powers of two, then the maximum) so prefill compiles once per bucket, not per length."""
  buckets, n = [], smallest
  while n < max_prefill_length:
    buckets.append(n)
    n *= 2
  return buckets + [max_prefill_length]


def _map_paged(fn, cache, *others):
  """fn(layer, *other layers) on every paged-cache layer dict (the ones holding "key_pages") of a cache pure dict."""
  if isinstance(cache, dict) and "key_pages" in cache:
    return fn(cache, *others)
  if isinstance(cache, dict):
    return {k: _map_paged(fn, v, *(o[k] for o in others)) for k, v in cache.items()}
  return cache


def _sample(logits, key, sampler: sampling.Sampler, row_settings: Optional[dict]):
  """The engine's sampler, or each row's own settings (continuous batching) when given."""
  if row_settings is None:
    return sampling.sample(logits, key, sampler)
  return batch_sampling.sample_rows(logits, row_settings)


def _slot_rows(state: DecodeState, rows: int) -> DecodeState:
  """A paged decode state restricted to slots [0, rows) (pages and the sampling key are shared)."""
  cache = _map_paged(
      lambda layer: {**layer, "lengths": layer["lengths"][:rows], "page_table": layer["page_table"][:rows]},
      state["cache"],
  )
  per_slot = {k: state[k][:rows] for k in ("tokens", "positions", "page_table")}
  return {**state, **per_slot, "cache": cache}


def _merge_slot_rows(state: DecodeState, sub: DecodeState, rows: int) -> DecodeState:
  """`state` with slots [0, rows) (and the pages and key) taken from the stepped `sub` state."""

  def merge(layer, stepped):
    return {**stepped, "lengths": layer["lengths"].at[:rows].set(stepped["lengths"]), "page_table": layer["page_table"]}

  per_slot = {k: state[k].at[:rows].set(sub[k]) for k in ("tokens", "positions")}
  return {
      **sub,
      **per_slot,
      "page_table": state["page_table"],
      "cache": _map_paged(merge, state["cache"], sub["cache"]),
  }


@dataclasses.dataclass(frozen=True)
class EngineDims:
  num_slots: int
  max_prefill_length: int
  max_cache_length: int


class Engine:
  """Jitted prefill / insert / generate for one config, mesh and set of cache dimensions.

  `num_slots`, `max_prefill_length` and `max_cache_length` default to per_device_batch_size x devices,
  max_prefill_predict_length and max_target_length.
  """

  def __init__(
      self,
      config,
      mesh: Optional[jax.sharding.Mesh] = None,
      *,
      num_slots: Optional[int] = None,
      max_prefill_length: Optional[int] = None,
      max_cache_length: Optional[int] = None,
  ):
    config = unrolled_config(config)
    self.config = config
    self.mesh = mesh if mesh is not None else sharding.create_mesh(config)
    self.rules = config.logical_axis_rules
    self.dims = EngineDims(
        num_slots=num_slots or config.micro_batch_size_to_train_on,
        max_prefill_length=max_prefill_length or config.max_prefill_predict_length,
        max_cache_length=max_cache_length or config.max_target_length,
    )
    if self.dims.max_prefill_length > self.dims.max_cache_length:
      raise ValueError(
          f"prefill length {self.dims.max_prefill_length} exceeds the cache length {self.dims.max_cache_length}"
      )
    self.sampler = sampling.Sampler.from_config(config)
    # attention=paged: the decode state holds KV pages and a page table (the caller allocates pages, see
    # page_manager); prefill still fills a contiguous prefix cache, which insert scatters into the slot's pages.
    self.page_spec = None
    if config.attention == "paged":
      self.page_spec = paged_attention.page_spec_from_config(config, self.dims.max_cache_length)
    self.graphdef, self.rest, self.abstract_params, self.param_shardings = train.build_model_skeleton(config, self.mesh)
    abstract_cache = jax.eval_shape(
        lambda p: self._cache_state(self._slots_model(p)),
        self.abstract_params,
    )
    self.cache_shardings = _pure(sharding.state_shardings(abstract_cache, self.rules, self.mesh))
    # Where each cached array keeps its batch (slot) axis, from its logical names (insert writes rows along it).
    self._batch_axes = None
    if self.page_spec is None:
      self._batch_axes = _pure(
          jax.tree.map(
              lambda v: list(v.get_metadata()["out_sharding"]).index(kvcache.BATCH_AXIS_NAME),
              abstract_cache,
              is_leaf=lambda x: isinstance(x, nnx.Variable),
          )
      )
    slot_sharding = sharding.logical_to_sharding(
        (kvcache.BATCH_AXIS_NAME,), self.rules, self.mesh, (self.dims.num_slots,)
    )
    replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
    self.state_shardings = {
        "cache": self.cache_shardings,
        "tokens": slot_sharding,
        "positions": slot_sharding,
        "key": replicated,
    }
    if self.page_spec is not None:
      self.state_shardings["page_table"] = sharding.logical_to_sharding(
          paged_attention.TABLE_NAMES, self.rules, self.mesh, (self.dims.num_slots, self.page_spec.max_pages_per_slot)
      )
    self._prefill = jax.jit(self._prefill_impl, static_argnames=("sampler",))
    self._insert = jax.jit(self._insert_impl, donate_argnums=(1,), out_shardings=self.state_shardings)
    self._generate = jax.jit(
        self._generate_impl,
        donate_argnums=(1,),
        static_argnames=("sampler", "steps", "with_logits", "rows"),
        out_shardings=(self.state_shardings, None, None),
    )
    self._init_state = jax.jit(self._init_state_impl, out_shardings=self.state_shardings)
    # Leaves replaced from the host go through jit too, so every state generate sees has the same array properties
    # (a device_put array can differ from a jit output in ways jit keys on, and would compile generate again).
    self._replace = jax.jit(lambda state, new: {**state, **new}, donate_argnums=(0,), out_shardings=self.state_shardings)

  # ------------------------------------------------------------------ model plumbing (inside jit)

  def _model(self, params: Params, batch: int, length: int, paged: bool = False):
    # copy=True: fresh non-param Variables, which the model may write while traced (the MoE load-balancing loss).
    model = nnx.merge(self.graphdef, nnx.State(params), self.rest, copy=True)
    model.init_cache(batch, length, **({"paged": self.page_spec} if paged else {}))
    return model

  def _slots_model(self, params: Params, batch: Optional[int] = None):
    """The model with the decode state's cache (paged under attention=paged; `batch` slots of it), not yet filled."""
    batch = batch or self.dims.num_slots
    return self._model(params, batch, self.dims.max_cache_length, paged=self.page_spec is not None)

  @staticmethod
  def _cache_state(model) -> nnx.State:
    return nnx.state(model, kvcache.KVCacheVar)

  def _with_cache(self, params: Params, cache: dict, page_table: Optional[jax.Array] = None):
    model = self._slots_model(params, None if page_table is None else page_table.shape[0])
    state = self._cache_state(model)
    if page_table is not None:  # every layer reads the one page table of the decode state
      cache = _map_paged(lambda layer: {**layer, "page_table": page_table}, cache)
    nnx.replace_by_pure_dict(state, cache)
    nnx.update(model, state)
    return model

  # ------------------------------------------------------------------ jitted bodies

  def _prefill_impl(self, params, tokens, true_lengths, key, sampler, row_settings=None):
    batch, length = tokens.shape
    model = self._model(params, batch, length)
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), tokens.shape)
    segment_ids = (positions < true_lengths[:, None]).astype(jnp.int32)
    logits = model(tokens, positions, segment_ids, model_mode="prefill", logits_at=true_lengths - 1)[:, 0]
    return {
        "cache": _pure(self._cache_state(model).to_pure_dict()),
        "tokens": _sample(logits, key, sampler, row_settings),
        "lengths": true_lengths,
        "logits": logits.astype(jnp.float32),
    }

  def _insert_impl(self, prefix, state, slots):
    if self.page_spec is not None:
      return self._insert_paged(prefix, state, slots)

    def put(dst, src, axis):
      for i in range(src.shape[axis]):  # unrolled: a prefix holds a few prompts
        row = jax.lax.dynamic_slice_in_dim(src, i, 1, axis)
        start = [0] * dst.ndim
        start[axis] = slots[i]
        dst = jax.lax.dynamic_update_slice(dst, row, start)
      return dst

    return {
        "cache": jax.tree.map(put, state["cache"], prefix["cache"], self._batch_axes),
        "tokens": state["tokens"].at[slots].set(prefix["tokens"]),
        "positions": state["positions"].at[slots].set(prefix["lengths"]),
        "key": state["key"],
    }

  def _insert_paged(self, prefix, state, slots):
    """Scatters each prefix row's tokens into the pages its slot's page table row lists (set by the caller)."""
    table = state["page_table"]
    rows, zeros = table[slots], jnp.zeros(slots.shape, jnp.int32)

    def put(layer, pre):
      write = lambda pages, new: paged_attention.write_tokens(pages, rows, zeros, jnp.swapaxes(new, 1, 2))
      return {
          **layer,
          "key_pages": write(layer["key_pages"], pre["key"]),
          "value_pages": write(layer["value_pages"], pre["value"]),
          "lengths": layer["lengths"].at[slots].set(pre["lengths"]),
          "page_table": table,
      }

    return {
        **state,
        "cache": _map_paged(put, state["cache"], prefix["cache"]),
        "tokens": state["tokens"].at[slots].set(prefix["tokens"]),
        "positions": state["positions"].at[slots].set(prefix["lengths"]),
    }

  def _step(self, params, state, sampler, row_settings=None):
    model = self._with_cache(params, state["cache"], state.get("page_table"))
    tokens, positions = state["tokens"][:, None], state["positions"][:, None]
    logits = model(tokens, positions, None, model_mode="autoregressive")[:, 0].astype(jnp.float32)
    key, step_key = jax.random.split(state["key"])
    tokens = _sample(logits, step_key, sampler, row_settings)
    new_state = {
        **state,
        "cache": _pure(self._cache_state(model).to_pure_dict()),
        "tokens": tokens,
        "positions": state["positions"] + 1,
        "key": key,
    }
    return new_state, tokens, logits

  def _generate_impl(self, params, state, row_settings, sampler, steps, with_logits, rows=None):
    if rows is not None and rows < self.dims.num_slots:
      # Only slots [0, rows) step: slice their rows (the pages are shared, so nothing big is copied) and put back.
      sub = _slot_rows(state, rows)
      sub, tokens, logits = self._generate_impl(params, sub, row_settings, sampler, steps, with_logits)
      return _merge_slot_rows(state, sub, rows), tokens, logits
    if steps == 1:
      state, tokens, logits = self._step(params, state, sampler, row_settings)
      return state, tokens, logits if with_logits else None

    def body(carry, _):
      carry, tokens, _ = self._step(params, carry, sampler)
      return carry, tokens

    state, tokens = jax.lax.scan(body, state, None, length=steps)
    return state, tokens, None

  def _init_state_impl(self, key):
    # The cache as KVCache initializes it; the zero params only give the model a shape and are compiled away.
    params = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), self.abstract_params)
    model = self._slots_model(params)
    slots = jnp.zeros((self.dims.num_slots,), jnp.int32)
    state = {"cache": _pure(self._cache_state(model).to_pure_dict()), "tokens": slots, "positions": slots, "key": key}
    if self.page_spec is not None:
      state["page_table"] = jnp.zeros((self.dims.num_slots, self.page_spec.max_pages_per_slot), jnp.int32)
    return state

  # ------------------------------------------------------------------ public API

  def place_params(self, params: Params) -> Params:
    """A params pure dict (either layer layout, e.g. from a model) in the engine's layout and shardings."""
    return jax.device_put(unrolled_params(params, self.config.param_scan_axis), self.param_shardings)

  def prefill(
      self,
      params: Params,
      tokens,
      true_length,
      *,
      key: Optional[jax.Array] = None,
      sampler: Optional[sampling.Sampler] = None,
      row_settings: Optional[dict] = None,
  ) -> Prefix:
    """Runs padded prompt(s) through the model, filling a fresh KV cache, and samples each first new token.

    tokens: int [length] (one prompt) or [n, length], padded after each prompt's `true_length` real tokens
    (length <= max_prefill_length). The prefix's cache has `length` tokens per row; logits are those the first
    token was sampled from.
    """
    tokens = np.asarray(tokens, np.int32)
    if tokens.ndim == 1:
      tokens = tokens[None]
    true_lengths = np.broadcast_to(np.asarray(true_length, np.int32), tokens.shape[:1])
    if tokens.shape[1] > self.dims.max_prefill_length:
      raise ValueError(f"prefill of {tokens.shape[1]} tokens exceeds max_prefill_length {self.dims.max_prefill_length}")
    if np.any(true_lengths < 1) or np.any(true_lengths > tokens.shape[1]):
      raise ValueError(f"true lengths {true_lengths.tolist()} must be in [1, {tokens.shape[1]}]")
    key = jax.random.key(self.config.decode_sampling_seed) if key is None else key
    with sharding.use_mesh(self.mesh, self.rules):
      return self._prefill(params, tokens, true_lengths, key, row_settings=row_settings, sampler=sampler or self.sampler)

  def init_decode_state(self, seed: Optional[int] = None) -> DecodeState:
    """Empty slots; `seed` (default decode_sampling_seed) seeds the sampling stream of generate."""
    seed = self.config.decode_sampling_seed if seed is None else seed
    with sharding.use_mesh(self.mesh, self.rules):
      return self._init_state(jax.random.key(seed))

  def set_page_table(self, state: DecodeState, table) -> DecodeState:
    """attention=paged: the decode state with the host's page table int [slots, max_pages_per_slot] (page_manager);
    insert and generate read and write the pages it lists."""
    with sharding.use_mesh(self.mesh, self.rules):
      return self._replace(state, {"page_table": np.asarray(table, np.int32)})

  def insert(self, prefix: Prefix, state: DecodeState, slot: int | Sequence[int]) -> DecodeState:
    """Puts the prefix's prompt(s) into `slot` (one prompt) or `slots` (one per prefix row); donates `state`.

    attention=paged: the slot's page table row must already hold pages for the prompt (set_page_table).
    """
    rows = prefix["tokens"].shape[0]
    slots = np.atleast_1d(np.asarray(slot, np.int32))
    if slots.shape != (rows,) or np.any(slots < 0) or np.any(slots >= self.dims.num_slots):
      raise ValueError(f"slots {slots.tolist()} do not fit {rows} prompt(s) into {self.dims.num_slots} slots")
    with sharding.use_mesh(self.mesh, self.rules):
      return self._insert(prefix, state, slots)

  def generate(
      self,
      params: Params,
      state: DecodeState,
      *,
      sampler: Optional[sampling.Sampler] = None,
      rows: Optional[int] = None,
      row_settings: Optional[dict] = None,
  ) -> tuple[DecodeState, jax.Array]:
    """One decode step for every slot: (new state, sampled tokens [slots]); donates `state`.

    `rows` (attention=paged): step only slots [0, rows), leaving the others as they are (tokens then has `rows`
    rows); a scheduler that fills low slots first steps a small batch for a few requests (compiled per value).
    `row_settings`: per-row sampling (batch_sampling.settings_arrays of the stepped rows) instead of `sampler`.
    """
    if rows is not None and (self.page_spec is None or not 0 < rows <= self.dims.num_slots):
      raise ValueError(f"rows={rows}: stepping a prefix of the slots needs attention=paged and 0 < rows <= slots")
    with sharding.use_mesh(self.mesh, self.rules):
      state, tokens, _ = self._generate(
          params, state, row_settings, sampler=sampler or self.sampler, steps=1, with_logits=False, rows=rows
      )
    return state, tokens

  def generate_with_logits(self, params: Params, state: DecodeState, *, sampler=None):
    """generate, also returning the float32 logits [slots, vocab] the tokens were sampled from."""
    with sharding.use_mesh(self.mesh, self.rules):
      return self._generate(params, state, None, sampler=sampler or self.sampler, steps=1, with_logits=True)

  def generate_steps(self, params: Params, state: DecodeState, steps: int, *, sampler=None):
    """`steps` decode steps in one device call: (new state, tokens [steps, slots]); donates `state`."""
    with sharding.use_mesh(self.mesh, self.rules):
      state, tokens, _ = self._generate(
          params, state, None, sampler=sampler or self.sampler, steps=steps, with_logits=False
      )
    return state, tokens
