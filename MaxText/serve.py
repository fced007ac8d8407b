"""OpenAI-compatible HTTP server: `python3 -m MaxText.serve CONFIG load_parameters_path=... port=8000`.

Endpoints: POST /v1/completions and /v1/chat/completions (streaming as server-sent events, or not), GET /v1/models,
/health and /metrics (Prometheus text). Completions take one prompt or a list (text or token ids), `n` and
`best_of` samples (sample j seeded seed + j), `logprobs` (the chosen token's and up to 20 alternatives, of the
distribution the sampler drew from), `echo` (the prompt and its logprobs first; with max_tokens 0 the prompt is only
scored, which is how evaluation harnesses compute log-likelihoods), stop strings and token ids, presence and
frequency penalties; chat takes `n`, `logprobs` and `top_logprobs`.

The model runs on one background thread that owns a continuous-batching Scheduler (the decode CLI's and the API's)
over a paged Engine (attention is forced to "paged", so requests share KV memory by the page); HTTP handlers (FastAPI
on uvicorn) hand it requests and read their events through asyncio queues. A client that disconnects cancels its
requests, which frees their slots and KV pages. Bad requests get HTTP 400 with an OpenAI-style JSON error.

With serve_api_key (or the MAXTEXT_SERVE_API_KEY environment variable) every /v1 route and /metrics require
`Authorization: Bearer <key>` (a 401 otherwise); /health stays open for load balancers. Bodies over
serve_max_request_bytes are refused (413) before they are parsed.

Chat requests are rendered with the chat template fine-tuning uses (input_pipeline/chat.py): chat_template_path,
else the tokenizer's own, else the documented default.
"""

import asyncio
import dataclasses
import functools
import hmac
import json
import logging
import os
import sys
import time
import uuid
from typing import Any, Optional, Sequence, Union

import fastapi
import jax
import pydantic
import uvicorn
from fastapi import responses
from prometheus_client import CollectorRegistry, exposition
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from MaxText import pyconfig, startup
from MaxText.config.serve import API_KEY_ENV
from MaxText.config_schema import ConfigError
from MaxText.inference import loading, sampling
from MaxText.inference import engine as engine_lib
from MaxText.inference import request as request_lib
from MaxText.inference import scheduler as scheduler_lib
from MaxText.input_pipeline import chat
from MaxText.input_pipeline.tokenizer import Tokenizer, build_tokenizer

logger = logging.getLogger("MaxText")


MAX_CHOICES = 16  # n and best_of
MAX_PROMPTS = 64  # prompts in one /v1/completions request
MAX_SAMPLES = 256  # prompts x best_of of one request
MAX_STOP = 16  # stop strings (OpenAI allows 4)
CHARS_PER_TOKEN_BOUND = 64  # a prompt string longer than this x the context is refused untokenized
LOGPROB_FLOOR = -9999.0  # JSON has no -inf: a token the sampler's filters removed reports this


class RequestError(Exception):
  """A client error: HTTP 400 (or `status`) with an OpenAI-style error body naming the parameter."""

  def __init__(self, message: str, param: Optional[str] = None, code: Optional[str] = None, status: int = 400):
    super().__init__(message)
    self.param, self.code, self.status = param, code, status


def _error(status: int, message: str, param=None, code=None, kind="invalid_request_error") -> responses.JSONResponse:
  body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
  return responses.JSONResponse(body, status_code=status)


class _Sampling(pydantic.BaseModel):
  """Fields both endpoints share (OpenAI names; top_k and stop_token_ids are vLLM's extensions)."""

  model_config = pydantic.ConfigDict(extra="ignore")
  model: Optional[str] = None  # one model is served, whatever this names
  max_tokens: Optional[int] = None
  temperature: float = pydantic.Field(1.0, ge=0.0, le=2.0)
  top_p: float = pydantic.Field(1.0, gt=0.0, le=1.0)
  top_k: int = pydantic.Field(0, ge=0)
  seed: Optional[int] = None
  presence_penalty: float = pydantic.Field(0.0, ge=-2.0, le=2.0)
  frequency_penalty: float = pydantic.Field(0.0, ge=-2.0, le=2.0)
  stop: Union[str, list[str], None] = None
  stop_token_ids: Optional[list[int]] = None
  stream: bool = False
  n: int = pydantic.Field(1, ge=1, le=MAX_CHOICES)


class CompletionRequest(_Sampling):
  prompt: Union[str, list[int], list[str], list[list[int]]]
  logprobs: Optional[int] = pydantic.Field(None, ge=0, le=sampling.MAX_TOP_LOGPROBS)
  echo: bool = False
  best_of: Optional[int] = pydantic.Field(None, ge=1, le=MAX_CHOICES)


class ChatMessage(pydantic.BaseModel):
  model_config = pydantic.ConfigDict(extra="allow")
  role: str
  content: Union[str, list[dict[str, Any]], None] = None


class ChatRequest(_Sampling):
  messages: list[ChatMessage] = pydantic.Field(min_length=1)
  max_completion_tokens: Optional[int] = None
  logprobs: bool = False
  top_logprobs: Optional[int] = pydantic.Field(None, ge=0, le=sampling.MAX_TOP_LOGPROBS)


@dataclasses.dataclass
class _Choice:
  """One scheduler request answered as one choice: what its response has shown so far."""

  request: request_lib.Request
  index: int
  top: Optional[int]  # logprobs shown with this many alternatives; None: no logprobs in the response
  echo: bool = False
  started: bool = False  # the echoed prompt went out (streaming)
  offset: int = 0  # text_offset of the next token


def _finite(logprob: float) -> float:
  return max(logprob, LOGPROB_FLOOR)


class Server:
  """Request handling between HTTP and the scheduler: encoding, validation, events -> OpenAI responses."""

  def __init__(self, scheduler: scheduler_lib.Scheduler, tokenizer: Tokenizer, config, model_name: str):
    self.scheduler, self.tokenizer, self.config, self.model_name = scheduler, tokenizer, config, model_name
    self.chat = chat.from_config(config, tokenizer)

  def _token_text(self, token_id: Optional[int]) -> str:
    return "" if token_id is None else self.tokenizer.decode([token_id])

  # ------------------------------------------------------------------ prompts

  def _check_ids(self, ids: list[int], param: str) -> list[int]:
    if any(t < 0 or t >= self.config.vocab_size for t in ids):
      raise RequestError(f"{param}: token ids must be in [0, {self.config.vocab_size})", "prompt")
    return list(ids)

  def _encode_text(self, text: str, param: str) -> list[int]:
    bound = CHARS_PER_TOKEN_BOUND * self.scheduler.engine.dims.max_cache_length
    if len(text) > bound:  # refused before the tokenizer spends time on it
      raise RequestError(
          f"{param} is {len(text)} characters, more than this server tokenizes ({bound})",
          "prompt",
          "context_length_exceeded",
      )
    bos = [self.tokenizer.bos_id] if self.config.add_bos and self.tokenizer.bos_id is not None else []
    return bos + self.tokenizer.encode(text)

  def encode_prompts(self, prompt) -> list[list[int]]:
    """The prompts of /v1/completions as token ids: a string, a token-id list, or a list of either."""
    if isinstance(prompt, str):
      return [self._encode_text(prompt, "prompt")]
    if prompt and all(isinstance(t, int) for t in prompt):
      return [self._check_ids(prompt, "prompt")]
    if not prompt or len(prompt) > MAX_PROMPTS:
      raise RequestError(f"prompt: 1 to {MAX_PROMPTS} prompts per request (got {len(prompt)})", "prompt")
    encode = (
        lambda i, p: self._encode_text(p, f"prompt[{i}]") if isinstance(p, str) else self._check_ids(p, f"prompt[{i}]")
    )
    return [encode(i, p) for i, p in enumerate(prompt)]

  def encode_chat(self, messages: list[ChatMessage]) -> list[int]:
    try:
      return self.chat.encode_prompt([m.model_dump(exclude_none=True) for m in messages])
    except chat.ChatError as e:
      raise RequestError(str(e), "messages") from None

  # ------------------------------------------------------------------ requests

  def make_request(
      self,
      body: _Sampling,
      prompt: list[int],
      max_tokens: Optional[int],
      *,
      sample: int = 0,
      logprobs: Optional[int] = None,
      echo: bool = False,
  ) -> request_lib.Request:
    """Validates lengths against the engine and builds the scheduler request (`sample` j of n draws with seed + j)."""
    dims = self.scheduler.engine.dims
    if not prompt:
      raise RequestError("the prompt encodes to no tokens", "prompt")
    # Longer prompts than a prefill chunk (max_prefill_predict_length) are prefilled chunk by chunk; echo's prompt
    # logprobs come from a single prefill.
    limit = dims.max_prefill_length if echo else dims.max_cache_length - (0 if echo else 1)
    if len(prompt) > limit:
      what = "with echo (max_prefill_predict_length)" if echo else "leaving room for one new token (max_target_length)"
      raise RequestError(
          f"the prompt is {len(prompt)} tokens, more than the {limit} this server accepts {what}",
          "prompt",
          "context_length_exceeded",
      )
    room = dims.max_cache_length - len(prompt)
    if max_tokens is None:
      max_tokens = room
    least = 0 if echo else 1
    if max_tokens < least or max_tokens > room:
      raise RequestError(
          f"max_tokens {max_tokens} must be in [{least}, {room}]: the context holds {dims.max_cache_length} tokens"
          f" and the prompt is {len(prompt)}" + ("" if echo else " (0 only with echo)"),
          "max_tokens",
          "context_length_exceeded",
      )
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > MAX_STOP or any(not s for s in stop):
      raise RequestError(f"stop: up to {MAX_STOP} non-empty strings", "stop")
    stop_ids = list(body.stop_token_ids or [])
    if any(t < 0 or t >= self.config.vocab_size for t in stop_ids):
      raise RequestError(f"stop_token_ids: token ids must be in [0, {self.config.vocab_size})", "stop_token_ids")
    if self.tokenizer.eos_id is not None:
      stop_ids.append(self.tokenizer.eos_id)
    seed = body.seed if body.seed is not None else uuid.uuid4().int & 0x7FFFFFFF
    params = sampling.SamplingParams(
        body.temperature, body.top_k, body.top_p, seed + sample, body.presence_penalty, body.frequency_penalty
    )
    return request_lib.Request(
        prompt=prompt,
        max_tokens=max_tokens,
        sampling=params,
        stop=tuple(stop),
        stop_ids=tuple(dict.fromkeys(stop_ids)),
        logprobs=logprobs,
        echo=echo,
    )

  def completion_choices(self, body: CompletionRequest) -> tuple[list[_Choice], int]:
    """The choices of a /v1/completions request (prompts x best_of, in that order) and how many to answer with."""
    best_of = body.best_of or body.n
    if best_of < body.n:
      raise RequestError(f"best_of ({best_of}) must be >= n ({body.n})", "best_of")
    if best_of > body.n and body.stream:
      raise RequestError("best_of > n cannot be streamed", "best_of")
    if body.max_tokens == 0 and not body.echo:
      raise RequestError("max_tokens 0 scores the prompt and needs echo: true", "max_tokens")
    # Ranking best_of samples needs their logprobs, shown or not.
    logprobs = body.logprobs if body.logprobs is not None or best_of == body.n else 0
    prompts = self.encode_prompts(body.prompt)
    if len(prompts) * best_of > MAX_SAMPLES:
      raise RequestError(f"{len(prompts)} prompts x {best_of} samples exceed {MAX_SAMPLES} per request", "prompt")
    choices = []
    for ids in prompts:
      for j in range(best_of):
        request = self.make_request(body, ids, body.max_tokens, sample=j, logprobs=logprobs, echo=body.echo)
        choices.append(_Choice(request, len(choices), body.logprobs, echo=body.echo))
    return choices, body.n

  def chat_choices(self, body: ChatRequest) -> list[_Choice]:
    if body.top_logprobs is not None and not body.logprobs:
      raise RequestError("top_logprobs needs logprobs: true", "top_logprobs")
    ids = self.encode_chat(body.messages)
    max_tokens = body.max_completion_tokens or body.max_tokens
    top = (body.top_logprobs or 0) if body.logprobs else None
    return [_Choice(self.make_request(body, ids, max_tokens, sample=j, logprobs=top), j, top) for j in range(body.n)]

  # ------------------------------------------------------------------ responses

  def _top(self, entry: request_lib.TokenLogprob, token: int, top: int) -> dict[str, float]:
    """OpenAI's top_logprobs entry of /v1/completions: {token text: logprob}, the chosen token included."""
    shown = {self._token_text(t): _finite(lp) for t, lp in entry.top[:top]}
    shown.setdefault(self._token_text(token), _finite(entry.logprob))
    return shown

  def _completion_logprobs(self, choice: _Choice, ids: Sequence[int], entries: Sequence) -> dict:
    """OpenAI's logprobs object of /v1/completions for these tokens (entries None: the echoed first token)."""
    tokens = [self._token_text(t) for t in ids]
    offsets = []
    for text in tokens:
      offsets.append(choice.offset)
      choice.offset += len(text)
    return {
        "tokens": tokens,
        "token_logprobs": [None if e is None else _finite(e.logprob) for e in entries],
        "top_logprobs": [None if e is None else self._top(e, t, choice.top) for e, t in zip(entries, ids)],
        "text_offset": offsets,
    }

  def _chat_logprobs(self, choice: _Choice, ids: Sequence[int], entries: Sequence) -> dict:
    """OpenAI's chat logprobs object ({"content": [...]}) for these tokens."""

    def item(token: int, logprob: float) -> dict:
      text = self._token_text(token)
      return {"token": text, "logprob": _finite(logprob), "bytes": list(text.encode("utf-8"))}

    content = [
        {**item(t, e.logprob), "top_logprobs": [item(a, lp) for a, lp in e.top[: choice.top]]}
        for t, e in zip(ids, entries)
    ]
    return {"content": content}

  def _delta(self, choice: _Choice, chat: bool, text: str, ids: Sequence[int], entries: Sequence) -> dict:
    """The choice's fields for new text and tokens (a whole response's, or one chunk's)."""
    request = choice.request
    if choice.echo and not choice.started:  # the prompt comes first
      text = self.tokenizer.decode(request.prompt) + text
      ids, entries = [*request.prompt, *ids], [None, *request.prompt_logprobs, *entries]
    choice.started = True
    out = {"index": choice.index}
    if chat:
      out["logprobs"] = None if choice.top is None else self._chat_logprobs(choice, ids, entries)
      return {**out, "text": text}
    out["text"] = text
    out["logprobs"] = None if choice.top is None else self._completion_logprobs(choice, ids, entries)
    return out

  async def run(self, http: fastapi.Request, choices: list[_Choice], chat: bool, stream: bool, n: int = 0):
    """Submits the choices' requests and answers with one JSON response or an SSE stream of chunks; `n` < the
    number of choices per prompt keeps each prompt's n best (highest mean token logprob)."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    for choice in choices:
      choice.request.on_event = functools.partial(
          lambda i, event: loop.call_soon_threadsafe(events.put_nowait, (i, event)), choice.index
      )
      self.scheduler.submit(choice.request)
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    base = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time())}
    base["model"] = self.model_name
    prompts = {id(c.request.prompt): len(c.request.prompt) for c in choices}

    def usage():
      completion = sum(len(c.request.output_ids) for c in choices)
      prompt = sum(prompts.values())
      return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    if stream:
      return responses.StreamingResponse(
          self._stream(http, choices, events, base, chat, usage), media_type="text/event-stream"
      )
    pending, error = len(choices), None
    try:
      while pending:
        try:
          _, event = await asyncio.wait_for(events.get(), timeout=0.5)
        except asyncio.TimeoutError:
          if await http.is_disconnected():
            self._cancel(choices)
            return responses.Response(status_code=499)
          continue
        if event.finish_reason is not None:
          pending -= 1
          error = error or (event.error if event.finish_reason == "error" else None)
    except asyncio.CancelledError:
      self._cancel(choices)
      raise
    if error is not None:
      return _error(500, f"generation failed: {error}", kind="server_error")
    return {**base, "choices": [self._final(c, chat) for c in self._best(choices, n)], "usage": usage()}

  @staticmethod
  def _best(choices: list[_Choice], n: int) -> list[_Choice]:
    """Each prompt's n choices of highest mean token logprob (all of them when there are n), indexed anew."""
    per_prompt = len(choices) // max(len({id(c.request.prompt) for c in choices}), 1)
    if not n or n >= per_prompt:
      return choices
    kept = []
    for start in range(0, len(choices), per_prompt):
      group = choices[start : start + per_prompt]
      mean = lambda c: sum(e.logprob for e in c.request.output_logprobs) / max(len(c.request.output_logprobs), 1)
      kept.extend(sorted(group, key=mean, reverse=True)[:n])
    for i, choice in enumerate(kept):
      choice.index = i
    return kept

  def _final(self, choice: _Choice, chat: bool) -> dict:
    request = choice.request
    out = self._delta(choice, chat, request.text, request.output_ids, request.output_logprobs)
    if chat:
      out["message"] = {"role": "assistant", "content": out.pop("text")}
    out["finish_reason"] = request.finish_reason
    return out

  def _cancel(self, choices: list[_Choice]):
    for choice in choices:
      if not choice.request.done.is_set():
        self.scheduler.cancel(choice.request)

  async def _stream(self, http, choices, events, base, chat, usage):
    base = {**base, "object": "chat.completion.chunk" if chat else "text_completion"}
    pending = len(choices)
    try:
      if chat:
        for choice in choices:
          first = {"index": choice.index, "delta": {"role": "assistant"}, "logprobs": None, "finish_reason": None}
          yield _sse({**base, "choices": [first]})
      while pending:
        try:
          index, event = await asyncio.wait_for(events.get(), timeout=0.5)
        except asyncio.TimeoutError:
          if await http.is_disconnected():
            return
          continue
        reason = event.finish_reason
        if reason == "error":
          yield _sse({"error": {"message": f"generation failed: {event.error}", "type": "server_error"}})
          return
        choice = choices[index]
        shows_tokens = event.token_ids and choice.top is not None  # a token's logprobs, even with its text held
        if event.text or reason or shows_tokens or (choice.echo and not choice.started):
          out = self._delta(choice, chat, event.text, event.token_ids, event.logprobs)
          if chat:
            text = out.pop("text")
            out["delta"] = {"content": text} if text else {}
          out["finish_reason"] = reason
          chunk = {**base, "choices": [out]}
          pending -= reason is not None
          if not pending:
            chunk["usage"] = usage()
          yield _sse(chunk)
      yield "data: [DONE]\n\n"
    finally:  # client gone (or done): running requests are cancelled so their pages are freed
      self._cancel(choices)


def _sse(payload: dict) -> str:
  return f"data: {json.dumps(payload)}\n\n"


class _MetricsCollector:
  """Prometheus metrics read from the scheduler at scrape time."""

  def __init__(self, scheduler: scheduler_lib.Scheduler):
    self.scheduler = scheduler

  def collect(self):
    s, pages = self.scheduler, self.scheduler.pages
    gauges = {
        "maxtext_queue_length": ("Requests waiting for a slot or KV pages", s.queue_length),
        "maxtext_running_requests": ("Requests in the running batch", s.running),
        "maxtext_kv_pages_used": ("KV cache pages held by requests", pages.used),
        "maxtext_kv_pages_total": ("KV cache pages that can be allocated", pages.capacity),
        "maxtext_kv_page_usage_ratio": ("Fraction of KV pages in use", pages.used / pages.capacity),
        "maxtext_kv_pages_cached": ("KV pages holding cached prompt blocks (prefix caching)", pages.cached),
        "maxtext_generation_tokens_per_second": ("Generated tokens per second over 10 s", s.stats.tokens_per_second()),
    }
    for name, (doc, value) in gauges.items():
      yield GaugeMetricFamily(name, doc, value=value)
    counters = {
        "maxtext_prompt_tokens": ("Prompt tokens prefilled", s.stats.prompt_tokens),
        "maxtext_prefix_cache_hit_tokens": ("Prompt tokens served from cached KV pages", pages.hit_tokens),
        "maxtext_generation_tokens": ("Tokens generated", s.stats.generated_tokens),
        "maxtext_requests_finished": ("Requests finished (any reason)", s.stats.finished_requests),
    }
    for name, (doc, value) in counters.items():
      yield CounterMetricFamily(name, doc, value=value)
    ttft = sorted(s.stats.ttft_seconds)
    family = GaugeMetricFamily(
        "maxtext_time_to_first_token_seconds", "Time to first token of recent requests", labels=["quantile"]
    )
    for q in (0.5, 0.9, 0.99):
      family.add_metric([str(q)], ttft[min(int(q * len(ttft)), len(ttft) - 1)] if ttft else 0.0)
    yield family


class _Guard:
  """ASGI middleware in front of the app: the API key on /v1 and /metrics, and the request body size limit
  (counted as it arrives, so a chunked body without Content-Length is bounded too)."""

  def __init__(self, app, api_key: str, max_bytes: int):
    self.app, self.api_key, self.max_bytes = app, api_key.encode(), max_bytes

  async def __call__(self, scope, receive, send):
    if scope["type"] != "http":
      return await self.app(scope, receive, send)
    path = scope["path"]
    if self.api_key and (path.startswith("/v1") or path == "/metrics"):
      header = dict(scope["headers"]).get(b"authorization", b"")
      scheme, _, key = header.partition(b" ")
      if scheme.lower() != b"bearer" or not hmac.compare_digest(key.strip(), self.api_key):
        message = "missing or wrong API key: send `Authorization: Bearer <key>`"
        return await _error(401, message, code="invalid_api_key")(scope, receive, send)
    length = dict(scope["headers"]).get(b"content-length")
    if length is not None and length.isdigit() and int(length) > self.max_bytes:
      return await self._too_large(scope, receive, send)
    seen = 0

    async def bounded_receive():
      nonlocal seen
      message = await receive()
      seen += len(message.get("body", b""))
      if seen > self.max_bytes:
        raise _TooLarge()
      return message

    try:
      return await self.app(scope, bounded_receive, send)
    except _TooLarge:
      return await self._too_large(scope, receive, send)

  async def _too_large(self, scope, receive, send):
    message = f"the request body exceeds {self.max_bytes} bytes (serve_max_request_bytes)"
    return await _error(413, message, code="request_too_large")(scope, receive, send)


class _TooLarge(Exception):
  pass


def api_key(config) -> str:
  """serve_api_key, else the MAXTEXT_SERVE_API_KEY environment variable, else "" (no authentication)."""
  return config.serve_api_key or os.environ.get(API_KEY_ENV, "")


def warn_if_open(config) -> bool:
  """Logs a warning (and returns True) when serve_host is not loopback and no API key is set."""
  if api_key(config) or config.serve_host in ("127.0.0.1", "localhost", "::1"):
    return False
  logger.warning(
      "MaxText.serve: serving on %s without an API key: anyone who can reach it can use it (set %s)",
      config.serve_host,
      API_KEY_ENV,
  )
  return True


def create_app(server: Server) -> fastapi.FastAPI:
  """The FastAPI app of `server` (its scheduler must be running: Scheduler.start)."""
  app = fastapi.FastAPI(title="MaxText", docs_url=None, redoc_url=None)
  app.add_middleware(_Guard, api_key=api_key(server.config), max_bytes=server.config.serve_max_request_bytes)
  registry = CollectorRegistry()
  registry.register(_MetricsCollector(server.scheduler))

  @app.exception_handler(fastapi.exceptions.RequestValidationError)
  async def invalid(http: fastapi.Request, exc: fastapi.exceptions.RequestValidationError):
    first = exc.errors()[0] if exc.errors() else {}
    param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
    message = f"{param or 'body'}: {first.get('msg', 'invalid request')}"
    logger.info("MaxText.serve: 400 on %s: %s", http.url.path, message)
    return _error(400, message, param)

  @app.exception_handler(RequestError)
  async def bad_request(http: fastapi.Request, exc: RequestError):
    logger.info("MaxText.serve: %d on %s: %s", exc.status, http.url.path, exc)
    return _error(exc.status, str(exc), exc.param, exc.code)

  @app.get("/health")
  async def health():
    return {"status": "ok", "running": server.scheduler.running, "queued": server.scheduler.queue_length}

  @app.get("/metrics")
  async def metrics():
    return responses.Response(exposition.generate_latest(registry), media_type=exposition.CONTENT_TYPE_LATEST)

  @app.get("/v1/models")
  async def models():
    return {"object": "list", "data": [{"id": server.model_name, "object": "model", "owned_by": "maxtext"}]}

  @app.post("/v1/completions")
  async def completions(body: CompletionRequest, http: fastapi.Request):
    choices, n = server.completion_choices(body)
    return await server.run(http, choices, chat=False, stream=body.stream, n=n)

  @app.post("/v1/chat/completions")
  async def chat_completions(body: ChatRequest, http: fastapi.Request):
    return await server.run(http, server.chat_choices(body), chat=True, stream=body.stream)

  return app


def paged_config(config) -> pyconfig.Config:
  """The config with attention=paged (the server's engine always uses the paged KV cache)."""
  if config.attention == "paged":
    return config
  logger.info("MaxText.serve: attention=%s -> paged (requests share the KV pages)", config.attention)
  values = {k: getattr(config, k) for k in config.keys()}
  return pyconfig.Config({**values, "attention": "paged"})


def build_server(config, params=None, decode=None) -> Server:
  """Engine, params (loaded from the config's checkpoint unless given), warmed-up running scheduler, tokenizer.

  `decode` (ids -> text) replaces the tokenizer's for output text (benchmarks on random ids).
  """
  config = paged_config(config)
  tokenizer = build_tokenizer(config)
  engine = engine_lib.Engine(config)
  if params is None:
    params = loading.load_params(config, engine.abstract_params, engine.param_shardings)
  else:
    params = engine.place_params(params)
  scheduler = scheduler_lib.Scheduler(
      engine, params, decode or tokenizer.decode, prefix_caching=config.enable_prefix_caching
  )
  logger.info("MaxText.serve: compiling (%d slots, %d KV pages)...", engine.dims.num_slots, scheduler.pages.capacity)
  start = time.perf_counter()
  with scheduler_lib.CompileCounter() as built:
    scheduler.warmup(logprobs=True)
  logger.info(
      "MaxText.serve: warm-up built %d programs in %.1f s (%d loaded from the persistent compilation cache%s)",
      built.count,
      time.perf_counter() - start,
      built.loaded,
      "" if jax.config.jax_compilation_cache_dir else "; jax_cache_dir=DIR keeps them for the next start",
  )
  return Server(scheduler.start(), tokenizer, config, config.model_name or config.run_name or "maxtext")


def main(argv: Sequence[str]):
  logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr, force=True)
  logging.getLogger("absl").setLevel(logging.WARNING)
  config = startup.start(argv, "serve")
  try:
    server = build_server(config)
  except ConfigError as e:
    pyconfig.exit_with_config_error(e)
  warn_if_open(config)
  logger.info("MaxText.serve: listening on http://%s:%d", config.serve_host, config.port)
  uvicorn.run(create_app(server), host=config.serve_host, port=config.port, log_level="info")


if __name__ == "__main__":
  main(sys.argv)
