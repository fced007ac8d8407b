"""Continuous batching over a paged Engine: requests join and leave the running batch between generate steps.

One thread owns the engine and loops: take new requests and cancellations, admit waiting requests (prefill, then
insert into a free slot) while slots and KV pages allow, then run one generate step for every occupied slot. A
request books the pages it may need (prompt + max_tokens) when admitted, so a running request never runs out;
one that does not fit waits in the queue (FIFO) until pages are released. Shapes are fixed (slots, prefill buckets),
so after warm-up no request compiles anything.

Each request has its own sampling settings, token budget, stop token ids and stop strings; its output arrives as
`Event`s (text and token deltas, then a finish reason) through its callback, from the engine thread.
"""

import collections
import dataclasses
import itertools
import logging
import queue
import threading
import time
from typing import Callable, Optional, Sequence

import jax
import numpy as np

from MaxText.inference import batch_sampling, offline, page_manager
from MaxText.inference import engine as engine_lib

logger = logging.getLogger("MaxText")
_IDS = itertools.count()
BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"  # jax's event for each XLA compile


@dataclasses.dataclass
class Event:
  """New output of a request: token ids and the text they completed; `finish_reason` on the last event
  ("stop": stop token or string, "length": max_tokens or the context, "cancelled", "error")."""

  token_ids: list[int]
  text: str
  finish_reason: Optional[str] = None
  error: str = ""


@dataclasses.dataclass(eq=False)
class Request:
  """A prompt (token ids) to continue by at most `max_tokens` tokens."""

  prompt: Sequence[int]
  max_tokens: int
  sampling: batch_sampling.RowSettings = dataclasses.field(default_factory=batch_sampling.RowSettings)
  stop: tuple[str, ...] = ()
  stop_ids: tuple[int, ...] = ()
  on_event: Optional[Callable[[Event], None]] = None  # called on the engine thread; default: the `events` queue
  id: int = dataclasses.field(default_factory=lambda: next(_IDS))
  # Filled in by the scheduler.
  output_ids: list[int] = dataclasses.field(default_factory=list)
  text: str = ""
  finish_reason: Optional[str] = None
  submitted_at: float = 0.0
  first_token_at: Optional[float] = None
  events: "queue.Queue[Event]" = dataclasses.field(default_factory=queue.Queue)
  cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)
  done: threading.Event = dataclasses.field(default_factory=threading.Event)
  _emitted: int = 0
  _cached: int = 0  # tokens in the KV cache

  def emit(self, event: Event):
    (self.on_event or self.events.put)(event)


@dataclasses.dataclass
class SchedulerStats:
  """Counters the server exports as metrics (read from other threads; each field is updated atomically)."""

  prompt_tokens: int = 0
  generated_tokens: int = 0
  finished_requests: int = 0
  ttft_seconds: collections.deque = dataclasses.field(default_factory=lambda: collections.deque(maxlen=1000))
  recent_tokens: collections.deque = dataclasses.field(default_factory=lambda: collections.deque(maxlen=4096))

  def tokens_per_second(self, window: float = 10.0) -> float:
    """Generated tokens per second over the last `window` seconds."""
    now = time.monotonic()
    recent = [(t, n) for t, n in list(self.recent_tokens) if now - t <= window]
    return sum(n for _, n in recent) / window if recent else 0.0


class Scheduler:
  """Continuous batching of Requests on a paged engine (attention: paged); see the module doc.

  `decode`: ids -> text (the tokenizer's), for stop strings and text deltas. `max_prefills_per_step` bounds how many
  prompts are prefilled between two generate steps while others decode, so running requests keep streaming.
  """

  def __init__(
      self,
      engine: engine_lib.Engine,
      params,
      decode: Callable[[Sequence[int]], str],
      *,
      max_prefills_per_step: int = 4,
  ):
    if engine.page_spec is None:
      raise ValueError("attention: continuous batching needs the paged KV cache (attention=paged)")
    self.engine, self.params, self.decode = engine, params, decode
    spec, slots = engine.page_spec, engine.dims.num_slots
    self.pages = page_manager.PageManager(spec.num_pages, spec.tokens_per_page, spec.max_pages_per_slot, slots)
    self.max_prefills_per_step = max_prefills_per_step
    self.stats = SchedulerStats()
    self._inbox: "queue.Queue[Request]" = queue.Queue()
    self._wake = threading.Event()
    self._stop = threading.Event()
    self._waiting: collections.deque[Request] = collections.deque()
    self._slots: list[Optional[Request]] = [None] * slots
    self._state = engine.init_decode_state()
    self._table_version = -1
    # Generate steps only slots [0, rows) for the smallest of these covering every occupied slot (slots are filled
    # lowest first), so a few requests do not pay for a full batch; each size compiles once, in warmup.
    self.row_buckets = sorted({min(2**i, slots) for i in range(slots.bit_length() + 1)})
    self._thread: Optional[threading.Thread] = None

  # ------------------------------------------------------------------ client side (any thread)

  def submit(self, request: Request) -> Request:
    """Queues a request; ValueError for an empty prompt or one the prefill or the context cannot hold."""
    dims = self.engine.dims
    if not request.prompt:
      raise ValueError("the prompt is empty")
    if len(request.prompt) > dims.max_prefill_length:
      raise ValueError(f"the prompt is {len(request.prompt)} tokens, more than the {dims.max_prefill_length} allowed")
    if request.max_tokens < 1 or len(request.prompt) + request.max_tokens > dims.max_cache_length:
      raise ValueError(
          f"max_tokens {request.max_tokens} with a prompt of {len(request.prompt)} tokens does not fit the context of"
          f" {dims.max_cache_length} tokens"
      )
    request.submitted_at = time.monotonic()
    self._inbox.put(request)
    self._wake.set()
    return request

  def cancel(self, request: Request):
    """Stops a request (e.g. its client disconnected); its slot and pages are freed before the next step."""
    request.cancelled.set()
    self._wake.set()

  @property
  def queue_length(self) -> int:
    return self._inbox.qsize() + len(self._waiting)

  @property
  def running(self) -> int:
    return sum(r is not None for r in self._slots)

  def warmup(self):
    """Compiles what requests will run, so none compiles at serving time: a generate step for every row bucket,
    prefill and insert for every prefill bucket, and a page-table update (a request that grows past a page)."""
    for rows in self.row_buckets:  # empty slots step harmlessly (their page table rows point at scratch)
      self._step_rows(rows)
    grow = min(self.pages.tokens_per_page + 1, self.engine.dims.max_cache_length - 1)
    self.submit(Request([1], grow, batch_sampling.RowSettings(temperature=1.0)))
    for bucket in engine_lib.prefill_buckets(self.engine.dims.max_prefill_length):
      self.submit(Request([1] * bucket, 1))
    self.run_until_idle()

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
    admitted = self._admit()
    if self.running == 0:
      return admitted
    try:
      self._generate()
    except Exception as e:  # pylint: disable=broad-exception-caught
      logger.exception("generate step failed")
      for slot, request in enumerate(self._slots):
        if request is not None:
          self._finish(slot, request, "error", error=str(e))
    return True

  def _admit(self) -> bool:
    admitted = 0
    while self._waiting and None in self._slots:
      if self.running and admitted >= self.max_prefills_per_step:
        break
      request = self._waiting[0]
      if request.cancelled.is_set():
        self._waiting.popleft()
        self._close(request, "cancelled")
        continue
      total = len(request.prompt) + request.max_tokens
      if not self.pages.can_reserve(total):
        break  # backpressure: wait (in order) until running requests release pages
      self._waiting.popleft()
      slot = self._slots.index(None)
      try:
        self._prefill_into(slot, request, total)
      except Exception as e:  # pylint: disable=broad-exception-caught
        logger.exception("prefill failed")
        self._finish(slot, request, "error", error=str(e))
      admitted += 1
    return admitted > 0

  def _push_table(self):
    if self.pages.version != self._table_version:
      self._state = self.engine.set_page_table(self._state, self.pages.table)
      self._table_version = self.pages.version

  def _prefill_into(self, slot: int, request: Request, total: int):
    n = len(request.prompt)
    self._slots[slot] = request
    self.pages.reserve(slot, total)
    self.pages.ensure(slot, n)
    self._push_table()
    tokens = np.zeros((offline.bucket_length(n, self.engine.dims.max_prefill_length),), np.int32)
    tokens[:n] = request.prompt
    settings = batch_sampling.settings_arrays([request.sampling], [0])
    prefix = self.engine.prefill(self.params, tokens, n, row_settings=settings)
    self._state = self.engine.insert(prefix, self._state, slot)
    request._cached = n  # pylint: disable=protected-access
    self.stats.prompt_tokens += n
    self._accept(slot, request, int(np.asarray(prefix["tokens"])[0]))

  def _generate(self):
    for slot, request in enumerate(self._slots):
      if request is not None:  # the step writes the fed-back token at position _cached
        self.pages.ensure(slot, request._cached + 1)  # pylint: disable=protected-access
    self._push_table()
    highest = max(i for i, r in enumerate(self._slots) if r is not None)
    host = self._step_rows(next(b for b in self.row_buckets if b > highest))
    self.stats.recent_tokens.append((time.monotonic(), self.running))
    for slot, request in enumerate(self._slots):
      if request is not None:
        request._cached += 1  # pylint: disable=protected-access
        self._accept(slot, request, int(host[slot]))

  def _step_rows(self, rows: int) -> np.ndarray:
    """One generate step of slots [0, rows), sampled with each occupant's settings; their new tokens."""
    occupants = self._slots[:rows]
    settings = batch_sampling.settings_arrays(
        [r.sampling if r else None for r in occupants], [len(r.output_ids) if r else 0 for r in occupants]
    )
    self._state, tokens = self.engine.generate(self.params, self._state, rows=rows, row_settings=settings)
    return np.asarray(tokens)

  def _accept(self, slot: int, request: Request, token: int):
    """Records a new token: text delta, stop checks, finish."""
    if request.first_token_at is None:
      request.first_token_at = time.monotonic()
      self.stats.ttft_seconds.append(request.first_token_at - request.submitted_at)
    self.stats.generated_tokens += 1
    request.output_ids.append(token)
    reason = None
    if token in request.stop_ids:
      reason = "stop"
    elif len(request.output_ids) >= request.max_tokens:
      reason = "length"
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
        request.emit(Event([token], text[request._emitted : safe]))  # pylint: disable=protected-access
        request._emitted = safe  # pylint: disable=protected-access
      else:
        request.emit(Event([token], ""))
      return
    request.emit(Event([token], text[request._emitted :], reason))  # pylint: disable=protected-access
    request._emitted = len(text)  # pylint: disable=protected-access
    self._release(slot, request, reason)

  def _release(self, slot: int, request: Request, reason: str):
    self._slots[slot] = None
    self.pages.release(slot)
    request.finish_reason = reason
    self.stats.finished_requests += 1
    request.done.set()

  def _finish(self, slot: int, request: Request, reason: str, error: str = ""):
    request.emit(Event([], "", reason, error))
    self._release(slot, request, reason)

  def _close(self, request: Request, reason: str):
    request.finish_reason = reason
    request.emit(Event([], "", reason))
    request.done.set()


class CompileCounter:
  """Counts XLA backend compilations while active (`with CompileCounter() as c: ...; c.count`)."""

  def __init__(self):
    self.count = 0

  def _listen(self, event: str, _duration: float, **_):
    if event == BACKEND_COMPILE_EVENT:
      self.count += 1

  def __enter__(self) -> "CompileCounter":
    jax.monitoring.register_event_duration_secs_listener(self._listen)
    return self

  def __exit__(self, *exc):
    jax.monitoring.unregister_event_duration_listener(self._listen)
