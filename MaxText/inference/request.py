"""What a request to the Scheduler is, and what comes back: a Request (prompt, budget, sampling, stop rules,
logprob options) whose output arrives as Events carrying text and token deltas with their TokenLogprobs, and the
SchedulerStats counters the server exports and the decode CLI prints."""

import collections
import dataclasses
import itertools
import queue
import threading
import time
from typing import Callable, Optional, Sequence

from MaxText.inference import engine as engine_lib
from MaxText.inference import sampling as sampling_lib

_IDS = itertools.count()


@dataclasses.dataclass(frozen=True)
class TokenLogprob:
  """A token's logprob and the `top` (token id, logprob) alternatives, most likely first."""

  logprob: float
  top: tuple[tuple[int, float], ...] = ()


@dataclasses.dataclass
class Event:
  """New output of a request: token ids and the text they completed (with their logprobs when the request asked);
  `finish_reason` on the last event ("stop": stop token or string, "length": max_tokens or the context,
  "cancelled", "error")."""

  token_ids: list[int]
  text: str
  finish_reason: Optional[str] = None
  error: str = ""
  logprobs: list[TokenLogprob] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(eq=False)
class Request:
  """A prompt (token ids) to continue by at most `max_tokens` tokens (0: echo only).

  `logprobs`: None, or how many top alternatives (<= sampling.MAX_TOP_LOGPROBS) to report with each new token's
  logprob. `echo`: also the prompt tokens' logprobs (`prompt_logprobs`, one per prompt token after the first).
  """

  prompt: Sequence[int]
  max_tokens: int
  sampling: sampling_lib.SamplingParams = dataclasses.field(default_factory=sampling_lib.SamplingParams)
  stop: tuple[str, ...] = ()
  stop_ids: tuple[int, ...] = ()
  logprobs: Optional[int] = None
  echo: bool = False
  on_event: Optional[Callable[[Event], None]] = None  # called on the engine thread; default: the `events` queue
  id: int = dataclasses.field(default_factory=lambda: next(_IDS))
  # Filled in by the scheduler.
  output_ids: list[int] = dataclasses.field(default_factory=list)
  output_logprobs: list[TokenLogprob] = dataclasses.field(default_factory=list)
  prompt_logprobs: list[TokenLogprob] = dataclasses.field(default_factory=list)
  text: str = ""
  finish_reason: Optional[str] = None
  submitted_at: float = 0.0
  first_token_at: Optional[float] = None
  events: "queue.Queue[Event]" = dataclasses.field(default_factory=queue.Queue)
  cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)
  done: threading.Event = dataclasses.field(default_factory=threading.Event)
  _emitted: int = 0
  _cached: int = 0  # tokens in the KV cache
  _prefix: Optional[engine_lib.Prefix] = None  # a chunked prefill in progress

  def emit(self, event: Event):
    (self.on_event or self.events.put)(event)


@dataclasses.dataclass
class SchedulerStats:
  """Counters the server exports as metrics and the decode CLI prints (read from other threads; each field is
  updated atomically). Times are wall seconds of prefill (with insert) and of generate steps."""

  prompt_tokens: int = 0
  generated_tokens: int = 0  # every new token, the ones prefill samples included
  finished_requests: int = 0
  prefill_calls: int = 0
  prefill_seconds: float = 0.0
  step_tokens: int = 0  # tokens of generate steps
  generate_steps: int = 0
  generate_seconds: float = 0.0
  ttft_seconds: collections.deque = dataclasses.field(default_factory=lambda: collections.deque(maxlen=1000))
  recent_tokens: collections.deque = dataclasses.field(default_factory=lambda: collections.deque(maxlen=4096))

  def summary(self) -> str:
    """The throughput line the decode CLI prints."""

    def rate(tokens, seconds):
      return tokens / seconds if seconds > 0 else 0.0

    return (
        f"prefill: {self.prompt_tokens} tokens in {self.prefill_calls} calls, {self.prefill_seconds:.3f} s"
        f" ({rate(self.prompt_tokens, self.prefill_seconds):.1f} tokens/s); generate: {self.step_tokens} tokens in"
        f" {self.generate_steps} steps, {self.generate_seconds:.3f} s"
        f" ({rate(self.step_tokens, self.generate_seconds):.1f} tokens/s)"
    )

  def tokens_per_second(self, window: float = 10.0) -> float:
    """Generated tokens per second over the last `window` seconds."""
    now = time.monotonic()
    recent = [(t, n) for t, n in list(self.recent_tokens) if now - t <= window]
    return sum(n for _, n in recent) / window if recent else 0.0


def token_logprob(stats: dict, index: tuple, top: int) -> TokenLogprob:
  """The TokenLogprob at `index` of host sampling.token_logprobs arrays, with `top` alternatives."""
  ids, values = stats["top_ids"][index][:top], stats["top_logprobs"][index][:top]
  return TokenLogprob(float(stats["logprob"][index]), tuple(zip(map(int, ids), map(float, values))))
