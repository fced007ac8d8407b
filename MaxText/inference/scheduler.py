"""Continuous batching over an Engine: requests join and leave the running batch between generate steps. The one
scheduler of the decode CLI, the Python API (both through `decode_prompts`) and the server.

One thread owns the engine and loops: take new requests and cancellations, admit waiting requests (prefill, then
insert into a free slot) while slots (and KV pages) allow, then run one generate step for the occupied slots. With
the paged cache (attention=paged) a request books the pages it may need (prompt + max_tokens) when admitted, so a
running request never runs out; one that does not fit waits in the queue (FIFO) until pages are released. With the
contiguous cache a slot holds a whole sequence, so a free slot is all a request needs. Shapes are fixed (slots, row
buckets, prefill buckets), so after warm-up no request compiles anything.

Each request (MaxText.inference.request) has its own sampling settings, token budget, stop token ids and stop
strings; its output arrives as `Event`s (text and token deltas, then a finish reason) through its callback, from
the engine thread. A request that asks for logprobs gets each new token's logprob and top alternatives (the
engine's logprob variants run only while such a request is in the batch); `echo` adds the prompt tokens' logprobs,
and with max_tokens 0 the request is scored (prefilled) without taking a slot.

Chunked prefill: a prompt longer than the prefill length (max_prefill_predict_length, C) takes its slot and books
its pages at once, then is prefilled in pieces between generate steps (a few per round, see max_prefills_per_step),
so a long prompt does not stall the running requests' next tokens: first its remainder (1..C tokens, a padded
prefill into a context-long cache), then whole C-token chunks, each attending over the cache so far (Engine.extend).
After the last chunk it is inserted into its slot and decodes like any other. Prompt logprobs (`echo`) cover prompts
up to C tokens.

Prefix caching (`prefix_caching`, paged cache only): the full KV pages of every prefilled prompt stay registered
under their tokens (page_manager); a new prompt that starts with registered blocks shares those pages, gathers them
into its prefix (Engine.gather) and computes only the rest (Engine.extend, in chunks of at most C).
"""

import collections
import logging
import queue
import threading
import time
from typing import Callable, Optional, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from MaxText.inference import engine as engine_lib
from MaxText.inference import page_manager
from MaxText.inference import request as request_lib
from MaxText.inference import sampling as sampling_lib

logger = logging.getLogger("MaxText")
BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"  # jax's event for each XLA compile
# ... and for an executable loaded from the persistent compilation cache instead (jax_compilation_cache_dir)
CACHE_LOAD_EVENT = "/jax/compilation_cache/cache_retrieval_time_sec"


def cheapest_buckets(seconds: dict[int, float], slots: int, margin: float = 0.9) -> list[int]:
  """For each highest occupied slot h < slots: the row bucket (of `seconds`, a step's time per bucket) to step, the
  smallest above h unless a wider one takes under `margin` of its time (so timing noise keeps the smallest)."""
  chosen = []
  for highest in range(slots):
    covering = sorted(b for b in seconds if b > highest)
    choice = covering[0]
    for wider in covering[1:]:
      if seconds[wider] < margin * seconds[choice]:
        choice = wider
    chosen.append(choice)
  return chosen


class Scheduler:
  """Continuous batching of Requests on an engine (paged or contiguous cache); see the module doc.

  `decode`: ids -> text (the tokenizer's), for stop strings and text deltas; None: token ids only (no text, no stop
  strings). `max_prefills_per_step` bounds the prefill pieces (chunks of long prompts already in a slot, oldest
  first, then newly admitted prompts) between two generate steps while others decode, so running requests keep
  streaming.
  """

  def __init__(
      self,
      engine: engine_lib.Engine,
      params,
      decode: Optional[Callable[[Sequence[int]], str]] = None,
      *,
      max_prefills_per_step: int = 4,
      prefix_caching: bool = False,
  ):
    self.engine, self.params, self.decode = engine, params, decode
    spec, slots = engine.page_spec, engine.dims.num_slots
    self.pages = None  # attention=paged: pages are taken as sequences grow and returned when they finish
    if spec is not None:
      self.pages = page_manager.PageManager(spec.num_pages, spec.tokens_per_page, spec.max_pages_per_slot, slots)
    self.max_prefills_per_step = max_prefills_per_step
    self.prefix_caching = prefix_caching and self.pages is not None
    self.stats = request_lib.SchedulerStats()
    self._inbox: "queue.Queue[request_lib.Request]" = queue.Queue()
    self._wake = threading.Event()
    self._stop = threading.Event()
    self._waiting: collections.deque[request_lib.Request] = collections.deque()
    self._slots: list[Optional[request_lib.Request]] = [None] * slots
    self._state = engine.init_decode_state()
    self._table_version = None  # (pages.version, slots still prefilling) of the table on the device
    # Generate steps only slots [0, rows) for one of these covering every occupied slot (slots are filled lowest
    # first), so a few requests do not pay for a full batch; each size compiles once, in warmup. bucket_for[h]: the
    # bucket that steps when h is the highest occupied slot (the smallest covering one until warmup times them).
    self.row_buckets = sorted({min(2**i, slots) for i in range(slots.bit_length() + 1)})
    self.bucket_for = [next(b for b in self.row_buckets if b > h) for h in range(slots)]
    self._thread: Optional[threading.Thread] = None

  # ------------------------------------------------------------------ client side (any thread)

  def submit(self, request: request_lib.Request) -> request_lib.Request:
    """Queues a request; ValueError for an empty prompt or one the prefill or the context cannot hold."""
    dims = self.engine.dims
    if not request.prompt:
      raise ValueError("the prompt is empty")
    if request.echo and len(request.prompt) > dims.max_prefill_length:
      raise ValueError(
          f"echo: prompt logprobs cover prompts of up to {dims.max_prefill_length} tokens (max_prefill_predict_length);"
          f" this one has {len(request.prompt)}"
      )
    if request.logprobs is not None and not 0 <= request.logprobs <= sampling_lib.MAX_TOP_LOGPROBS:
      raise ValueError(f"logprobs {request.logprobs} must be in [0, {sampling_lib.MAX_TOP_LOGPROBS}]")
    least = 0 if request.echo else 1  # echo with max_tokens 0 scores the prompt only
    if request.max_tokens < least or len(request.prompt) + request.max_tokens > dims.max_cache_length:
      raise ValueError(
          f"max_tokens {request.max_tokens} with a prompt of {len(request.prompt)} tokens does not fit the context of"
          f" {dims.max_cache_length} tokens"
      )
    request.submitted_at = time.monotonic()
    self._inbox.put(request)
    self._wake.set()
    return request

  def cancel(self, request: request_lib.Request):
    """Stops a request (e.g. its client disconnected); its slot and pages are freed before the next step."""
    request.cancelled.set()
    self._wake.set()

  @property
  def queue_length(self) -> int:
    return self._inbox.qsize() + len(self._waiting)

  @property
  def running(self) -> int:
    """Occupied slots: requests decoding or still being prefilled in chunks."""
    return sum(r is not None for r in self._slots)

  @property
  def decoding(self) -> int:
    return sum(r is not None and r._prefix is None for r in self._slots)  # pylint: disable=protected-access

  def warmup(self, logprobs: bool = False):
    """Compiles what requests will run, so none compiles at serving time: a generate step for every row bucket,
    prefill and insert for every prefill bucket, the chunked prefill of longer prompts (their first piece per
    bucket, and a chunk), and a page-table update (a request that grows past a page).
    `logprobs`: the logprob variants of generate and prefill too (requests that ask for logprobs or echo)."""
    buckets = engine_lib.prefill_buckets(self.engine.dims.max_prefill_length)
    self.warmup_for(buckets + [b + self.engine.dims.max_prefill_length for b in buckets], logprobs)

  def warmup_for(self, prompt_lengths: Sequence[int], logprobs: bool = False):
    """warmup for prompts of these lengths only (the decode CLI knows its prompts)."""
    for rows in self.row_buckets:  # empty slots step harmlessly (at stale or scratch cache entries)
      self._step_rows(rows)
      if logprobs:
        self._step_rows(rows, logprobs=True)
    self._rank_buckets()
    dims = self.engine.dims
    chunk = dims.max_prefill_length
    # The warm-up prompts repeat one token: with prefix caching on they would hit each other's pages and take the
    # cached path instead of the prefills being compiled; that path is compiled on its own below.
    caching, self.prefix_caching = self.prefix_caching, False
    if self.pages is not None:  # grows past a page: the page-table update
      self.submit(request_lib.Request([1], min(self.pages.tokens_per_page + 1, dims.max_cache_length - 1)))
    for bucket in sorted({engine_lib.bucket_length(n, chunk) for n in prompt_lengths if n <= chunk}):
      self.submit(request_lib.Request([1] * bucket, 1))
      if logprobs:
        self.submit(request_lib.Request([1] * bucket, 0, echo=True))
    # Chunked prefill: the first piece (a prefill into a context-long cache) per bucket, then one chunk.
    room = dims.max_cache_length - 1 - chunk  # the longest first piece that leaves room for a chunk and a token
    long = [n for n in prompt_lengths if n > chunk] if room > 0 else []
    for bucket in sorted({engine_lib.bucket_length(min(n - (n - 1) // chunk * chunk, room), chunk) for n in long}):
      self.submit(request_lib.Request([1] * (min(bucket, room) + chunk), 1))
    self.run_until_idle()
    self.prefix_caching = caching
    if self.prefix_caching:  # a cache hit: gather, then a padded piece of every bucket
      prefix = None
      for bucket in engine_lib.prefill_buckets(chunk):
        cached = min(self.pages.tokens_per_page, dims.max_cache_length - bucket)
        if cached > 0:
          prefix = self.engine.gather(self._state, self.pages.table[0], cached, cache_length=self._gather_length)
          prefix = self.engine.extend(self.params, prefix, np.ones((bucket,), np.int32), 1)
      if prefix is not None:  # insert from a prefix that long (slot 0 is empty: its writes go to the scratch page)
        self._state = self.engine.insert(prefix, self._state, 0)
      self.pages.hit_tokens = 0
    self.stats = request_lib.SchedulerStats()  # the warm-up's compile time is no one's throughput

  # ------------------------------------------------------------------ engine thread

  def start(self) -> "Scheduler":
    self._thread = threading.Thread(target=self._loop, name="maxtext-engine", daemon=True)
    self._thread.start()
    return self

  def stop(self):
    self._stop.set()
    self._wake.set()
    if self._thread is not None:
      self._thread.join()

  def _loop(self):
    while not self._stop.is_set():
      if not self.step():
        self._wake.wait(0.05)
        self._wake.clear()

  def run_until_idle(self):
    """Steps on the calling thread until no request is waiting or running (tests, offline use)."""
    while self.step() or self.queue_length or self.running:
      pass

  def step(self) -> bool:
    """One round: new requests, cancellations, admissions, one generate step. False when there was nothing to do."""
    while True:
      try:
        self._waiting.append(self._inbox.get_nowait())
      except queue.Empty:
        break
    for slot, request in enumerate(self._slots):
      if request is not None and request.cancelled.is_set():
        self._finish(slot, request, "cancelled")
    # Prefill pieces share one budget per round: chunks of prompts that already hold a slot first (oldest slot
    # first), then admissions; a prompt admitted now had its first piece this round.
    chunks = self._prefill_chunks(self.max_prefills_per_step)
    admitted = self._admit(self.max_prefills_per_step - chunks)
    if self.decoding == 0:
      return admitted or chunks > 0
    try:
      self._generate()
    except Exception as e:  # pylint: disable=broad-exception-caught
      logger.exception("generate step failed")
      for slot, request in enumerate(self._slots):
        if request is not None:
          self._finish(slot, request, "error", error=str(e))
    return True

  def _admit(self, budget: int) -> bool:
    """Admits waiting requests in order while slots (and pages) allow: at most `budget` while others run."""
    admitted = 0
    while self._waiting and None in self._slots:
      if self.running and admitted >= budget:
        break
      request = self._waiting[0]
      if request.cancelled.is_set():
        self._waiting.popleft()
        self._close(request, "cancelled")
        continue
      if request.max_tokens == 0:  # echo only: the prompt's logprobs, no slot
        self._waiting.popleft()
        try:
          self._score(request)
        except Exception as e:  # pylint: disable=broad-exception-caught
          logger.exception("prefill failed")
          self._close(request, "error", str(e))
        admitted += 1
        continue
      total = len(request.prompt) + request.max_tokens
      # Echo needs every prompt position's logits: a full prefill, never a cached start.
      shared = self.pages.match(request.prompt) if self.prefix_caching and not request.echo else []
      if self.pages is not None and not self._fits(total, shared):
        break  # backpressure: wait (in order) until running requests release pages
      self._waiting.popleft()
      slot = self._slots.index(None)
      try:
        if shared:
          self._start_cached(slot, request, total, shared)
        elif len(request.prompt) > self.engine.dims.max_prefill_length:
          self._start_chunked(slot, request, total)
        else:
          self._prefill_into(slot, request, total)
      except Exception as e:  # pylint: disable=broad-exception-caught
        logger.exception("prefill failed")
        self._finish(slot, request, "error", error=str(e))
      admitted += 1
    return admitted > 0

  @property
  def _gather_length(self) -> int:
    # A chunk longer than the context: the last piece is padded to its bucket, and the padding must not wrap.
    # Insert sends tokens past the page table's capacity to the scratch page.
    return self.engine.dims.max_cache_length + self.engine.dims.max_prefill_length

  def _fits(self, total: int, shared: list[int]) -> bool:
    pages = self.pages
    need = pages.new_pages_for(total, shared)
    return pages.pages_for(total) <= pages.max_pages_per_slot and need <= pages.available

  def _start_cached(self, slot: int, request: request_lib.Request, total: int, shared: list[int]):
    """Shares the cached pages of the prompt's leading blocks, gathers them into a prefix and computes the first
    piece of the rest (the rest of it, chunk by chunk, in the next rounds)."""
    start = time.perf_counter()
    self._slots[slot] = request
    self.pages.share(slot, shared)
    self.pages.reserve(slot, total)
    cached = len(shared) * self.pages.tokens_per_page
    request._prefix = self.engine.gather(  # pylint: disable=protected-access
        self._state, self.pages.table[slot], cached, cache_length=self._gather_length
    )
    request._cached = cached  # pylint: disable=protected-access
    self.stats.prefill_seconds += time.perf_counter() - start
    self._extend(slot, request)

  def _start_chunked(self, slot: int, request: request_lib.Request, total: int):
    """Takes the slot and books the pages of a long prompt, and prefills its first piece: the remainder that leaves
    whole chunks after it (pages are taken only at insert, so until then the slot steps into the scratch page)."""
    start = time.perf_counter()
    chunk = self.engine.dims.max_prefill_length
    self._slots[slot] = request
    if self.pages is not None:
      self.pages.reserve(slot, total)
    n = len(request.prompt)
    first = n - (n - 1) // chunk * chunk
    tokens = self._bucketed(request.prompt[:first])
    request._prefix = self.engine.prefill(  # pylint: disable=protected-access
        self.params, tokens, first, sampling_params=request.sampling, cache_length=self.engine.dims.max_cache_length
    )
    request._cached = first  # pylint: disable=protected-access
    self.stats.prefill_calls += 1
    self.stats.prompt_tokens += first
    self.stats.prefill_seconds += time.perf_counter() - start

  def _prefill_chunks(self, budget: int) -> int:
    """Up to `budget` chunks of chunked prefills, the oldest request first (a request's pieces run in order); a
    request is inserted once its prompt is in. Returns the chunks run."""
    done = 0
    while done < budget:
      pending = [(r.submitted_at, slot) for slot, r in enumerate(self._slots) if r is not None and r._prefix is not None]  # pylint: disable=protected-access
      if not pending:
        break
      slot = min(pending)[1]
      request = self._slots[slot]
      try:
        self._extend(slot, request)
      except Exception as e:  # pylint: disable=broad-exception-caught
        logger.exception("chunked prefill failed")
        request._prefix = None  # pylint: disable=protected-access
        self._finish(slot, request, "error", error=str(e))
      done += 1
    return done

  def _extend(self, slot: int, request: request_lib.Request):
    """The next piece (at most a chunk, the last one padded to its bucket) of a prompt whose prefix is cached."""
    start = time.perf_counter()
    chunk, done = self.engine.dims.max_prefill_length, request._cached  # pylint: disable=protected-access
    piece = request.prompt[done : done + chunk]
    prefix = self.engine.extend(
        self.params, request._prefix, self._bucketed(piece), len(piece), sampling_params=request.sampling  # pylint: disable=protected-access
    )
    request._cached = done + len(piece)  # pylint: disable=protected-access
    self.stats.prefill_calls += 1
    self.stats.prompt_tokens += len(piece)
    if request._cached < len(request.prompt):  # pylint: disable=protected-access
      request._prefix = prefix  # pylint: disable=protected-access
      self.stats.prefill_seconds += time.perf_counter() - start
      return
    request._prefix = None  # pylint: disable=protected-access
    if self.pages is not None:
      self.pages.ensure(slot, len(request.prompt))
      self._push_table()
    self._state = self.engine.insert(prefix, self._state, slot)
    if self.prefix_caching:
      self.pages.register(slot, request.prompt)
    self.stats.prefill_seconds += time.perf_counter() - start
    self._accept_first(slot, request, prefix)

  def _push_table(self):
    """The host page table to the device, where it changed. Rows of slots still prefilling (chunked or from cached
    pages) go as the scratch page: generate steps every slot, and such a slot writes at its previous occupant's
    position, which may fall in a shared cached page."""
    if self.pages is None:
      return
    prefilling = tuple(i for i, r in enumerate(self._slots) if r is not None and r._prefix is not None)  # pylint: disable=protected-access
    if (self.pages.version, prefilling) != self._table_version:
      table = self.pages.table.copy()
      table[list(prefilling)] = page_manager.NULL_PAGE
      self._state = self.engine.set_page_table(self._state, table)
      self._table_version = (self.pages.version, prefilling)

  def _bucketed(self, ids) -> np.ndarray:
    """Token ids zero-padded to their prefill bucket (prefill and extend compile once per bucket)."""
    tokens = np.zeros((engine_lib.bucket_length(len(ids), self.engine.dims.max_prefill_length),), np.int32)
    tokens[: len(ids)] = ids
    return tokens

  def _prefill(self, request: request_lib.Request) -> engine_lib.Prefix:
    """The request's prompt prefilled (with the logprobs it asks for); prompt_logprobs recorded for echo."""
    n = len(request.prompt)
    prefix = self.engine.prefill(
        self.params, self._bucketed(request.prompt), n, sampling_params=request.sampling, prompt_logprobs=request.echo
    )
    if request.echo:
      host = jax.tree.map(np.asarray, prefix.prompt_logprobs)
      request.prompt_logprobs = [request_lib.token_logprob(host, (0, i), request.logprobs or 0) for i in range(n - 1)]
    self.stats.prefill_calls += 1
    self.stats.prompt_tokens += n
    return prefix

  def _score(self, request: request_lib.Request):
    start = time.perf_counter()
    self._prefill(request)
    self.stats.prefill_seconds += time.perf_counter() - start
    self._close(request, "length")

  def _prefill_into(self, slot: int, request: request_lib.Request, total: int):
    n = len(request.prompt)
    start = time.perf_counter()
    self._slots[slot] = request
    if self.pages is not None:
      self.pages.reserve(slot, total)
      self.pages.ensure(slot, n)
      self._push_table()
    prefix = self._prefill(request)
    self._state = self.engine.insert(prefix, self._state, slot)
    if self.prefix_caching:
      self.pages.register(slot, request.prompt)
    request._cached = n  # pylint: disable=protected-access
    self.stats.prefill_seconds += time.perf_counter() - start
    self._accept_first(slot, request, prefix)

  def _accept_first(self, slot: int, request: request_lib.Request, prefix: engine_lib.Prefix):
    """The token the prefill sampled (with its logprob when the request asked)."""
    logprob = None
    if request.logprobs is not None:
      logprob = request_lib.token_logprob(jax.tree.map(np.asarray, prefix.logprobs), (0,), request.logprobs)
    self._accept(slot, request, int(np.asarray(prefix["tokens"])[0]), logprob)

  def _generate(self):
    start = time.perf_counter()
    # Slots still prefilling in chunks step too (their rows are stale, their pages not yet taken: the writes land in
    # the scratch page or the stale row, both rewritten by insert), but their tokens are dropped.
    active = {i: r for i, r in enumerate(self._slots) if r is not None and r._prefix is None}  # pylint: disable=protected-access
    if self.pages is not None:
      for slot, request in active.items():  # the step writes the fed-back token at position _cached
        self.pages.ensure(slot, request._cached + 1)  # pylint: disable=protected-access
      self._push_table()
    highest = max(active)
    with_logprobs = any(r.logprobs is not None for r in active.values())
    host, stats = self._step_rows(self.bucket_for[highest], with_logprobs)
    self.stats.generate_seconds += time.perf_counter() - start
    self.stats.generate_steps += 1
    self.stats.step_tokens += len(active)
    self.stats.recent_tokens.append((time.monotonic(), len(active)))
    for slot, request in active.items():
      if self._slots[slot] is request:
        request._cached += 1  # pylint: disable=protected-access
        logprob = None if request.logprobs is None else request_lib.token_logprob(stats, (slot,), request.logprobs)
        self._accept(slot, request, int(host[slot]), logprob)

  def _rank_buckets(self, repeats: int = 3):
    """Times a step of each row bucket (compiled) and sets bucket_for to the cheapest covering ones: a narrower
    step is not always cheaper. On CPU a narrow step copies its rows of the cache before attention reads them
    (XLA:CPU's dots take no slices): a 16-of-32-row llama-small step measured 1.1-1.2x a full one."""
    seconds = {}
    for rows in self.row_buckets:
      times = []
      for _ in range(repeats):
        start = time.perf_counter()
        self._step_rows(rows)
        times.append(time.perf_counter() - start)
      seconds[rows] = min(times)
    if jax.process_count() > 1:  # every process must step the same programs: process 0's timings decide
      seconds = dict(zip(seconds, multihost_utils.broadcast_one_to_all(np.asarray(list(seconds.values())))))
    self.bucket_for = cheapest_buckets(seconds, len(self._slots))
    logger.info(
        "generate step by row bucket: %s ms; a highest occupied slot below each steps: %s",
        ", ".join(f"{rows}: {1000 * t:.1f}" for rows, t in seconds.items()),
        ", ".join(f"{rows}: {self.bucket_for[rows - 1]}" for rows in self.row_buckets),
    )

  def _step_rows(self, rows: int, logprobs: bool = False) -> tuple[np.ndarray, Optional[dict]]:
    """One generate step of slots [0, rows), each sampled with its occupant's settings: their new tokens (and
    with `logprobs`, the host copy of the tokens' sampling.token_logprobs)."""
    if not logprobs:
      self._state, tokens = self.engine.generate(self.params, self._state, rows=rows)
      return np.asarray(tokens), None
    self._state, tokens, stats = self.engine.generate_with_logprobs(self.params, self._state, rows=rows)
    return np.asarray(tokens), jax.tree.map(np.asarray, stats)

  def _accept(
      self, slot: int, request: request_lib.Request, token: int, logprob: Optional[request_lib.TokenLogprob] = None
  ):
    """Records a new token (and its logprob when the request asked): text delta, stop checks, finish."""
    if request.first_token_at is None:
      request.first_token_at = time.monotonic()
      self.stats.ttft_seconds.append(request.first_token_at - request.submitted_at)
    self.stats.generated_tokens += 1
    request.output_ids.append(token)
    logprobs = [] if logprob is None else [logprob]
    request.output_logprobs.extend(logprobs)
    reason = None
    if token in request.stop_ids:
      reason = "stop"
    elif len(request.output_ids) >= request.max_tokens:
      reason = "length"
    if self.decode is None:
      request.emit(request_lib.Event([token], "", reason, logprobs=logprobs))
      if reason is not None:
        self._release(slot, request, reason)
      return
    text = self.decode(request.output_ids[:-1] if reason == "stop" else request.output_ids)
    for stop in request.stop:
      cut = text.find(stop)
      if cut >= 0:
        text, reason = text[:cut], "stop"
    request.text = text
    if reason is None:
      # Hold back what may be the start of a stop string or an incomplete UTF-8 character.
      hold = max((len(s) - 1 for s in request.stop), default=0)
      safe = len(text) - hold
      while safe > request._emitted and text[safe - 1] == "\ufffd":  # pylint: disable=protected-access
        safe -= 1
      if safe > request._emitted:  # pylint: disable=protected-access
        request.emit(request_lib.Event([token], text[request._emitted : safe], logprobs=logprobs))  # pylint: disable=protected-access
        request._emitted = safe  # pylint: disable=protected-access
      else:
        request.emit(request_lib.Event([token], "", logprobs=logprobs))
      return
    request.emit(request_lib.Event([token], text[request._emitted :], reason, logprobs=logprobs))  # pylint: disable=protected-access
    request._emitted = len(text)  # pylint: disable=protected-access
    self._release(slot, request, reason)

  def _release(self, slot: int, request: request_lib.Request, reason: str):
    request._prefix = None  # pylint: disable=protected-access
    self._slots[slot] = None
    if self.pages is not None:
      self.pages.release(slot)
    request.finish_reason = reason
    self.stats.finished_requests += 1
    request.done.set()

  def _finish(self, slot: int, request: request_lib.Request, reason: str, error: str = ""):
    request.emit(request_lib.Event([], "", reason, error))
    self._release(slot, request, reason)

  def _close(self, request: request_lib.Request, reason: str, error: str = ""):
    request.finish_reason = reason
    self.stats.finished_requests += 1
    request.emit(request_lib.Event([], "", reason, error))
    request.done.set()


def decode_prompts(
    scheduler: Scheduler,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: Optional[int] = None,
    stop_ids: Sequence[int] = (),
    sampling_params: Optional[Sequence[sampling_lib.SamplingParams]] = None,
) -> list[list[int]]:
  """Synchronous decoding of a list of prompts through the scheduler (the decode CLI and the Python API).

  New token ids per prompt: up to `max_new_tokens` (default and at most: until the cache, max_target_length, is
  full), ending at a stop id, which is then the last id of that prompt's list. `sampling_params`: one per prompt
  (default: the engine's, decode_sampling_*).
  """
  dims = scheduler.engine.dims
  sampling_params = sampling_params or [scheduler.engine.default_sampling] * len(prompts)
  requests = []
  for i, ids in enumerate(prompts):
    if not ids:
      raise ValueError(f"prompt {i} is empty")
    budget = dims.max_cache_length - len(ids)
    budget = budget if max_new_tokens is None else min(budget, max_new_tokens)
    request = request_lib.Request(list(ids), budget, sampling_params[i], stop_ids=tuple(stop_ids))
    requests.append(request)
    if budget > 0:
      scheduler.submit(request)
  scheduler.run_until_idle()
  return [r.output_ids for r in requests]


class CompileCounter:
  """Counts executables built while active (`with CompileCounter() as c: ...; c.count`): XLA compiles and loads
  from the persistent compilation cache, either of which means a new shape or program reached the backend
  (`c.loaded` of them came from the cache)."""

  def __init__(self):
    self.count = 0
    self.loaded = 0

  def _listen(self, event: str, _duration: float, **_):
    if event in (BACKEND_COMPILE_EVENT, CACHE_LOAD_EVENT):
      self.count += 1
      self.loaded += event == CACHE_LOAD_EVENT

  def __enter__(self) -> "CompileCounter":
    jax.monitoring.register_event_duration_secs_listener(self._listen)
    return self

  def __exit__(self, *exc):
    jax.monitoring.unregister_event_duration_listener(self._listen)
