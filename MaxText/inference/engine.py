"""A JetStream-style decode engine over the training model: prefill -> insert -> generate, with batch slots.

    engine = Engine(config)                        # slots = per_device_batch_size x devices
    prefix = engine.prefill(params, tokens, true_length)   # a prompt's KV cache and its first sampled token
    state = engine.init_decode_state()             # KV cache of [slots, max_target_length] + per-slot position
    state = engine.insert(prefix, state, slot)     # the prompt now occupies `slot`
    state, tokens = engine.generate(params, state) # one new token for every slot

Each slot carries its own length and its own sampling settings (sampling.SamplingParams, given to prefill and
carried by insert), so prompts of different lengths and samplers decode together and a finished slot takes a new
prompt while the others go on. `generate(..., rows=n)` steps only slots [0, n): the continuous-batching Scheduler
(MaxText.inference.scheduler), which fills low slots first, drives the engine that way. Params are the pure dict
training checkpoints hold; the model is rebuilt from the graphdef inside each jitted function, and the decode state
(a plain pytree) is donated so the cache updates in place.

Logprobs: prefill always reports its first tokens' (sampling.token_logprobs), `prefill(..., prompt_logprobs=True)`
every prompt token's too (logits at every position, for echo/scoring), and `generate_with_logprobs` each new
token's; the logprob variants are separate executables, so plain decoding pays nothing for them. The decode state
keeps each slot's generated tokens (`history`) for the presence/frequency penalties.

The engine reaches the caches only through the cache protocol (MaxText.layers.cache): inside jit it merges the
model with the decode state's cache and calls insert / take_rows / put_rows / set_page_table on each Cache module.

The engine always runs the layer stack unrolled (scan_layers=false) and without remat, whatever the config trains
with: a decode step reads every weight once for a few tokens, and a scanned stack would first slice (copy) each
layer's weights out of the stacked arrays (2-4x slower per step on CPU); remat only serves gradients, and its
optimization barriers keep XLA from updating the cache in place. Params in the scanned layout are converted on load.

With `attention: paged` the decode state holds KV pages shared by all slots and a page table, which the caller fills
from a host-side PageManager (`set_page_table`); prefill still builds a contiguous prefix cache and insert scatters
it into the slot's pages.
"""

import dataclasses
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from MaxText import checkpointing, pyconfig, sharding, training
from MaxText.inference import sampling
from MaxText.layers import cache as cache_lib
from MaxText.layers import scan_layout

Params = Any
# {"cache": pure dict, "tokens": [slots], "positions": [slots], "sampling": {SETTINGS_KEYS..., "step"} of [slots],
#  "history": [slots, max_cache_length] the tokens each slot generated (for the presence/frequency penalties)}
DecodeState = dict[str, Any]


@struct.dataclass
class Prefix:
  """Prefilled prompt(s): the KV cache of `length` tokens per row, each row's first sampled token, its true length,
  the logits it was sampled from and its sampling settings. Read as a dict too (prefix["tokens"]).

  `logprobs`: sampling.token_logprobs of the first tokens (cheap next to the prefill). `prompt_logprobs` (prefill's
  prompt_logprobs=True): the same for each prompt token after the first under the model's raw distribution at the
  token before it, [rows, length - 1] (and [rows, length - 1, k] for the top alternatives).
  """

  cache: dict
  tokens: jax.Array
  lengths: jax.Array
  logits: jax.Array
  sampling: dict
  logprobs: Optional[dict] = None
  prompt_logprobs: Optional[dict] = None
  length: int = struct.field(pytree_node=False, default=0)

  def __getitem__(self, name: str):
    return getattr(self, name)


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
  if params.get("decoder", {}).get("layers") and not checkpointing.layers_are_unscanned(params):
    return scan_layout.scanned_to_unscanned(params, param_scan_axis)
  return params


def prefill_buckets(max_prefill_length: int, smallest: int = 16) -> list[int]:
  """Padded prompt lengths (powers of two, then the maximum) so prefill compiles once per bucket, not per length."""
  buckets, n = [], smallest
  while n < max_prefill_length:
    buckets.append(n)
    n *= 2
  return buckets + [max_prefill_length]


def bucket_length(length: int, max_prefill_length: int) -> int:
  """The padded prefill length for a prompt of `length` tokens."""
  for bucket in prefill_buckets(max_prefill_length):
    if length <= bucket:
      return bucket
  raise ValueError(f"prompt of {length} tokens exceeds max_prefill_length {max_prefill_length}")


@dataclasses.dataclass(frozen=True)
class EngineDims:
  num_slots: int
  max_prefill_length: int
  max_cache_length: int


def _settings(sampling_params, rows: int, default: sampling.SamplingParams) -> dict[str, np.ndarray]:
  """settings_arrays for `rows` prompts from one SamplingParams (all rows), a sequence of them, or None (default)."""
  if sampling_params is None or isinstance(sampling_params, sampling.SamplingParams):
    sampling_params = [sampling_params or default] * rows
  if len(sampling_params) != rows:
    raise ValueError(f"{len(sampling_params)} sampling settings for {rows} prompts")
  return sampling.settings_arrays(sampling_params)


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
    self.default_sampling = sampling.SamplingParams.from_config(config)
    # attention=paged: the decode state holds KV pages and a page table (the caller allocates pages, see
    # page_manager); prefill still fills a contiguous prefix cache, which insert scatters into the slot's pages.
    self.page_spec = None
    if config.attention == "paged":
      self.page_spec = cache_lib.page_spec_from_config(config, self.dims.max_cache_length)
    self.graphdef, self.rest, self.abstract_params, self.param_shardings = training.build_model_skeleton(
        config, self.mesh
    )
    abstract_cache = jax.eval_shape(lambda p: self._cache_state(self._slots_model(p)), self.abstract_params)
    self.cache_shardings = _pure(sharding.state_shardings(abstract_cache, self.rules, self.mesh))
    slot_sharding = sharding.logical_to_sharding(
        (cache_lib.BATCH_AXIS_NAME,), self.rules, self.mesh, (self.dims.num_slots,)
    )
    self.state_shardings = {
        "cache": self.cache_shardings,
        "tokens": slot_sharding,
        "positions": slot_sharding,
        "sampling": {k: slot_sharding for k in (*sampling.SETTINGS_KEYS, "step")},
        "history": sharding.logical_to_sharding(
            (cache_lib.BATCH_AXIS_NAME, None), self.rules, self.mesh, (self.dims.num_slots, self.dims.max_cache_length)
        ),
    }
    self._prefill = jax.jit(self._prefill_impl, static_argnames=("prompt_logprobs", "cache_length"))
    self._extend = jax.jit(self._extend_impl, donate_argnums=(1,))
    self._gather = jax.jit(self._gather_impl, static_argnames=("cache_length",))
    self._insert = jax.jit(self._insert_impl, donate_argnums=(1,), out_shardings=self.state_shardings)
    self._generate = jax.jit(
        self._generate_impl,
        donate_argnums=(1,),
        static_argnames=("steps", "with_logits", "rows", "logprobs"),
        out_shardings=(self.state_shardings, None, None, None),
    )
    self._init_state = jax.jit(self._init_state_impl, out_shardings=self.state_shardings)
    self._set_page_table = jax.jit(self._set_page_table_impl, donate_argnums=(0,), out_shardings=self.state_shardings)

  # ------------------------------------------------------------------ model plumbing (inside jit)

  def _model(self, params: Params, batch: int, length: int, paged: bool = False):
    # copy=True: fresh non-param Variables, which the model may write while traced (the MoE load-balancing loss).
    model = nnx.merge(self.graphdef, nnx.State(params), self.rest, copy=True)
    model.init_cache(batch, length, **({"paged": self.page_spec} if paged else {}))
    return model

  def _slots_model(self, params: Params):
    """The model with the decode state's cache (paged under attention=paged), not yet filled."""
    return self._model(params, self.dims.num_slots, self.dims.max_cache_length, paged=self.page_spec is not None)

  @staticmethod
  def _cache_state(model) -> nnx.State:
    return nnx.state(model, cache_lib.KVCacheVar)

  @staticmethod
  def _load_cache(model, cache: dict):
    state = nnx.state(model, cache_lib.KVCacheVar)
    nnx.replace_by_pure_dict(state, cache)
    nnx.update(model, state)
    return model

  def _zero_params(self) -> Params:
    # Zero params only give a model its shape where its caches alone are used; XLA compiles them away.
    return jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), self.abstract_params)

  # ------------------------------------------------------------------ jitted bodies

  def _prefill_impl(self, params, tokens, true_lengths, settings, prompt_logprobs=False, cache_length=None):
    batch, length = tokens.shape
    model = self._model(params, batch, cache_length or length)
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), tokens.shape)
    segment_ids = (positions < true_lengths[:, None]).astype(jnp.int32)
    prompt_stats = None
    if prompt_logprobs:  # logits at every position: each prompt token's logprob under the position before it
      every = model(tokens, positions, segment_ids, model_mode="prefill").astype(jnp.float32)
      logits = jnp.take_along_axis(every, (true_lengths - 1)[:, None, None], axis=1)[:, 0]
      flat = lambda a: a.reshape(batch * (length - 1), *a.shape[2:])
      stats = sampling.token_logprobs(flat(every[:, :-1]), flat(tokens[:, 1:]))
      prompt_stats = jax.tree.map(lambda a: a.reshape(batch, length - 1, *a.shape[1:]), stats)
    else:
      logits = model(tokens, positions, segment_ids, model_mode="prefill", logits_at=true_lengths - 1)[:, 0]
    settings = {**settings, "step": jnp.zeros((batch,), jnp.int32)}  # the first token is each request's draw 0
    first, first_logprobs = sampling.sample(logits, settings, logprobs=True)
    return Prefix(
        cache=_pure(self._cache_state(model).to_pure_dict()),
        tokens=first,
        lengths=true_lengths,
        logits=logits.astype(jnp.float32),
        sampling={**settings, "step": settings["step"] + 1},
        logprobs=first_logprobs,
        prompt_logprobs=prompt_stats,
        length=cache_length or length,
    )

  def _extend_impl(self, params, prefix: Prefix, tokens, true_lengths, settings):
    batch, chunk = tokens.shape
    model = self._load_cache(self._model(params, batch, prefix.length), prefix.cache)
    positions = prefix.lengths[:, None] + jnp.arange(chunk, dtype=jnp.int32)
    # The chunk attends over the prefix's cache and itself, causally, and joins the cache (as decode tokens do);
    # padding after a row's true length is written past it, masked (lengths exclude it) and overwritten later.
    logits = model(tokens, positions, None, model_mode="autoregressive", logits_at=true_lengths - 1)[:, 0]
    for cache in cache_lib.caches(model).values():
      cache.lengths[...] = prefix.lengths + true_lengths
    settings = {**settings, "step": jnp.zeros((batch,), jnp.int32)}
    first, first_logprobs = sampling.sample(logits, settings, logprobs=True)
    return Prefix(
        cache=_pure(self._cache_state(model).to_pure_dict()),
        tokens=first,
        lengths=prefix.lengths + true_lengths,
        logits=logits.astype(jnp.float32),
        sampling={**settings, "step": settings["step"] + 1},
        logprobs=first_logprobs,
        length=prefix.length,
    )

  def _insert_impl(self, prefix: Prefix, state, slots):
    zeros = self._zero_params()
    source = cache_lib.caches(self._load_cache(self._model(zeros, len(prefix.tokens), prefix.length), prefix.cache))
    model = self._load_cache(self._slots_model(zeros), state["cache"])
    for path, cache in cache_lib.caches(model).items():
      cache.insert(source[path], slots)
    return {
        "cache": _pure(self._cache_state(model).to_pure_dict()),
        "tokens": state["tokens"].at[slots].set(prefix.tokens),
        "positions": state["positions"].at[slots].set(prefix.lengths),
        "sampling": jax.tree.map(lambda a, b: a.at[slots].set(b), state["sampling"], prefix.sampling),
        "history": state["history"],  # rows are rewritten before they are read (see _generate_impl)
    }

  def _gather_impl(self, state, table, cached, settings, cache_length):
    zeros = self._zero_params()
    pages = cache_lib.caches(self._load_cache(self._slots_model(zeros), state["cache"]))
    model = self._model(zeros, table.shape[0], cache_length)
    for path, cache in cache_lib.caches(model).items():
      cache.load_stored(pages[path].stored_rows(table), cached)
    rows = table.shape[0]
    return Prefix(
        cache=_pure(self._cache_state(model).to_pure_dict()),
        tokens=jnp.zeros((rows,), jnp.int32),
        lengths=cached,
        logits=jnp.zeros((rows, self.config.vocab_size), jnp.float32),
        sampling={**settings, "step": jnp.zeros((rows,), jnp.int32)},
        length=cache_length,
    )

  def _set_page_table_impl(self, state, table):
    model = self._load_cache(self._slots_model(self._zero_params()), state["cache"])
    for cache in cache_lib.caches(model).values():
      cache.set_page_table(table)
    return {**state, "cache": _pure(self._cache_state(model).to_pure_dict())}

  def _generate_impl(self, params, state, steps, with_logits, rows=None, logprobs=False):
    model = self._load_cache(self._slots_model(params), state["cache"])
    caches = cache_lib.caches(model)
    rows = rows or self.dims.num_slots
    narrow = rows < self.dims.num_slots
    # Only slots [0, rows) step: narrow each cache to their rows and widen it back after (a contiguous cache copies
    # those rows; a paged one only its page table and lengths, the pages are shared).
    saved = {path: cache.take_rows(rows) for path, cache in caches.items()} if narrow else {}
    graphdef, cache_state, other = nnx.split(model, cache_lib.KVCacheVar, ...)
    per_slot = {k: state[k] for k in ("tokens", "positions", "sampling", "history")}
    if narrow:
      per_slot = jax.tree.map(lambda a: a[:rows], per_slot)

    def step(cache_state, slot):
      stepped = nnx.merge(graphdef, cache_state, other, copy=True)
      logits = stepped(slot["tokens"][:, None], slot["positions"][:, None], None, model_mode="autoregressive")
      logits = logits[:, 0].astype(jnp.float32)
      # The fed-back token is the row's output number step - 1: record it, then penalize what the row generated.
      settings = slot["sampling"]
      row_ids = jnp.arange(slot["tokens"].shape[0])
      written = jnp.clip(settings["step"] - 1, 0, slot["history"].shape[1] - 1)  # empty slots step on and on
      history = slot["history"].at[row_ids, written].set(slot["tokens"])
      sampled = sampling.sample(sampling.penalize(logits, history, settings), settings, logprobs=logprobs)
      tokens, stats = sampled if logprobs else (sampled, None)
      slot = {
          "tokens": tokens,
          "positions": slot["positions"] + 1,
          "sampling": {**settings, "step": settings["step"] + 1},
          "history": history,
      }
      return nnx.state(stepped, cache_lib.KVCacheVar), slot, logits, stats

    stats = None
    if steps == 1:
      cache_state, per_slot, logits, stats = step(cache_state, per_slot)
      tokens = per_slot["tokens"]
    else:

      def body(carry, _):
        cache_state, slot, _, _ = step(*carry)
        return (cache_state, slot), slot["tokens"]

      (cache_state, per_slot), tokens = jax.lax.scan(body, (cache_state, per_slot), None, length=steps)
      logits = None
    nnx.update(model, cache_state)
    for path, cache in caches.items():
      if narrow:
        cache.put_rows(saved[path])
    if narrow:
      per_slot = jax.tree.map(lambda full, sub: full.at[:rows].set(sub), {k: state[k] for k in per_slot}, per_slot)
    new_state = {**per_slot, "cache": _pure(self._cache_state(model).to_pure_dict())}
    return new_state, tokens, logits if with_logits else None, stats

  def _init_state_impl(self):
    # The cache as the cache modules initialize it.
    model = self._slots_model(self._zero_params())
    slots = jnp.zeros((self.dims.num_slots,), jnp.int32)
    settings = _settings(None, self.dims.num_slots, sampling.SamplingParams())
    return {
        "cache": _pure(self._cache_state(model).to_pure_dict()),
        "tokens": slots,
        "positions": slots,
        "sampling": {**jax.tree.map(jnp.asarray, settings), "step": slots},
        "history": jnp.zeros((self.dims.num_slots, self.dims.max_cache_length), jnp.int32),
    }

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
      sampling_params: sampling.SamplingParams | Sequence[sampling.SamplingParams] | None = None,
      prompt_logprobs: bool = False,
      cache_length: Optional[int] = None,
  ) -> Prefix:
    """Runs padded prompt(s) through the model, filling a fresh KV cache, and samples each first new token.

    tokens: int [length] (one prompt) or [n, length], padded after each prompt's `true_length` real tokens
    (length <= max_prefill_length). The prefix's cache has `length` tokens per row; logits are those the first
    token was sampled from. `sampling_params`: one for every row, one per row, or None (decode_sampling_* keys);
    insert carries them into the slot, so generate samples each slot its own way. `prompt_logprobs`: fill the
    prefix's prompt_logprobs too (logits at every position; compiled apart). `cache_length` (<= max_cache_length):
    a cache longer than the prompt, which `extend` then grows chunk by chunk (chunked prefill).
    """
    tokens = np.asarray(tokens, np.int32)
    if tokens.ndim == 1:
      tokens = tokens[None]
    true_lengths = np.broadcast_to(np.asarray(true_length, np.int32), tokens.shape[:1])
    if tokens.shape[1] > self.dims.max_prefill_length:
      raise ValueError(f"prefill of {tokens.shape[1]} tokens exceeds max_prefill_length {self.dims.max_prefill_length}")
    if np.any(true_lengths < 1) or np.any(true_lengths > tokens.shape[1]):
      raise ValueError(f"true lengths {true_lengths.tolist()} must be in [1, {tokens.shape[1]}]")
    if cache_length is not None and not tokens.shape[1] <= cache_length <= self.dims.max_cache_length:
      raise ValueError(f"cache_length {cache_length} must be in [{tokens.shape[1]}, {self.dims.max_cache_length}]")
    settings = _settings(sampling_params, tokens.shape[0], self.default_sampling)
    with sharding.use_mesh(self.mesh, self.rules):
      return self._prefill(
          params, tokens, true_lengths, settings, prompt_logprobs=prompt_logprobs, cache_length=cache_length
      )

  def extend(
      self,
      params: Params,
      prefix: Prefix,
      tokens,
      true_length=None,
      *,
      sampling_params: sampling.SamplingParams | Sequence[sampling.SamplingParams] | None = None,
  ) -> Prefix:
    """The next chunk of the prompt(s) of a prefix (a prefill with `cache_length`, or `gather`): tokens int [chunk]
    or [rows, chunk], padded after each row's `true_length` real tokens (default: all real), attending over the
    prefix and themselves. Returns the grown prefix, with each first new token sampled from its chunk's last real
    logits (a prefix can be inserted after any chunk). Donates `prefix`; compiled once per chunk length."""
    tokens = np.asarray(tokens, np.int32)
    if tokens.ndim == 1:
      tokens = tokens[None]
    true_lengths = np.broadcast_to(np.asarray(true_length or tokens.shape[1], np.int32), tokens.shape[:1])
    if tokens.shape[0] != prefix.tokens.shape[0]:
      raise ValueError(f"{tokens.shape[0]} chunk rows for a prefix of {prefix.tokens.shape[0]}")
    if np.any(true_lengths < 1) or np.any(true_lengths > tokens.shape[1]):
      raise ValueError(f"true lengths {true_lengths.tolist()} must be in [1, {tokens.shape[1]}]")
    if int(np.max(np.asarray(prefix.lengths))) + tokens.shape[1] > prefix.length:
      raise ValueError(f"a chunk of {tokens.shape[1]} tokens overflows the prefix cache of {prefix.length}")
    settings = _settings(sampling_params, tokens.shape[0], self.default_sampling)
    prefix = prefix.replace(logprobs=None, prompt_logprobs=None)
    with sharding.use_mesh(self.mesh, self.rules):
      return self._extend(params, prefix, tokens, true_lengths, settings)

  def gather(self, state: DecodeState, table, cached: int, *, cache_length: Optional[int] = None) -> Prefix:
    """attention=paged: a prefix holding the first `cached` tokens stored in the pages of one page-table row
    (int [max_pages_per_slot]: prefix caching's shared pages), in a contiguous cache of `cache_length` tokens
    (default max_cache_length; longer leaves room for a padded last chunk, which insert sends past the page table to
    the scratch page) for `extend` to continue. The state is only read."""
    if self.page_spec is None:
      raise ValueError("gather reads KV pages: it needs attention=paged")
    cache_length = cache_length or self.dims.max_cache_length
    table = np.asarray(table, np.int32).reshape(1, -1)
    if not 0 < cached < min(cache_length, self.dims.max_cache_length):
      raise ValueError(f"cached tokens {cached} must be in [1, {cache_length})")
    settings = _settings(None, 1, self.default_sampling)
    with sharding.use_mesh(self.mesh, self.rules):
      return self._gather(state, table, np.asarray([cached], np.int32), settings, cache_length=cache_length)

  def init_decode_state(self) -> DecodeState:
    """Empty slots (greedy until a prompt is inserted)."""
    with sharding.use_mesh(self.mesh, self.rules):
      return self._init_state()

  def set_page_table(self, state: DecodeState, table) -> DecodeState:
    """attention=paged: the decode state with the host's page table int [slots, max_pages_per_slot] (page_manager);
    insert and generate read and write the pages it lists. Donates `state`."""
    with sharding.use_mesh(self.mesh, self.rules):
      return self._set_page_table(state, np.asarray(table, np.int32))

  def insert(self, prefix: Prefix, state: DecodeState, slot: int | Sequence[int]) -> DecodeState:
    """Puts the prefix's prompt(s) into `slot` (one prompt) or `slots` (one per prefix row); donates `state`.

    attention=paged: the slot's page table row must already hold pages for the prompt (set_page_table).
    """
    rows = prefix.tokens.shape[0]
    slots = np.atleast_1d(np.asarray(slot, np.int32))
    if slots.shape != (rows,) or np.any(slots < 0) or np.any(slots >= self.dims.num_slots):
      raise ValueError(f"slots {slots.tolist()} do not fit {rows} prompt(s) into {self.dims.num_slots} slots")
    prefix = prefix.replace(logprobs=None, prompt_logprobs=None)  # one insert executable, whatever prefill reported
    with sharding.use_mesh(self.mesh, self.rules):
      return self._insert(prefix, state, slots)

  def generate(self, params: Params, state: DecodeState, *, rows: Optional[int] = None) -> tuple[DecodeState, jax.Array]:
    """One decode step for every slot: (new state, sampled tokens [slots]); donates `state`.

    `rows`: step only slots [0, rows), leaving the others as they are (tokens then has `rows` rows); a scheduler
    that fills low slots first steps a small batch for a few requests (compiled per value).
    """
    self._check_rows(rows)
    with sharding.use_mesh(self.mesh, self.rules):
      state, tokens, _, _ = self._generate(params, state, steps=1, with_logits=False, rows=rows)
    return state, tokens

  def generate_with_logprobs(self, params: Params, state: DecodeState, *, rows: Optional[int] = None):
    """generate, also returning sampling.token_logprobs of the new tokens (compiled apart from generate)."""
    self._check_rows(rows)
    with sharding.use_mesh(self.mesh, self.rules):
      state, tokens, _, stats = self._generate(params, state, steps=1, with_logits=False, rows=rows, logprobs=True)
    return state, tokens, stats

  def generate_with_logits(self, params: Params, state: DecodeState):
    """generate, also returning the float32 logits [slots, vocab] (before penalties) the tokens were sampled from."""
    with sharding.use_mesh(self.mesh, self.rules):
      return self._generate(params, state, steps=1, with_logits=True)[:3]

  def generate_steps(self, params: Params, state: DecodeState, steps: int):
    """`steps` decode steps in one device call: (new state, tokens [steps, slots]); donates `state`."""
    with sharding.use_mesh(self.mesh, self.rules):
      state, tokens, _, _ = self._generate(params, state, steps=steps, with_logits=False)
    return state, tokens

  def _check_rows(self, rows: Optional[int]):
    if rows is not None and not 0 < rows <= self.dims.num_slots:
      raise ValueError(f"rows={rows}: stepping a prefix of the slots needs 0 < rows <= {self.dims.num_slots}")
