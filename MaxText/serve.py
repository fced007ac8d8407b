"""OpenAI-compatible HTTP server: `python3 -m MaxText.serve CONFIG load_parameters_path=... port=8000`.

Endpoints: POST /v1/completions and /v1/chat/completions (streaming as server-sent events, or not), GET /v1/models,
/health and /metrics (Prometheus text). The model runs on one background thread that owns a continuous-batching
Scheduler (the decode CLI's and the API's) over a paged Engine (attention is forced to "paged", so requests
share KV memory by the page); HTTP handlers (FastAPI on uvicorn) hand it requests
and read their events through asyncio queues. A client that disconnects cancels its request, which frees its slot
and KV pages. Bad requests get HTTP 400 with an OpenAI-style JSON error.

Chat requests are rendered with the tokenizer's chat template (a Hugging Face tokenizer's `chat_template.jinja` or
the `chat_template` of its tokenizer_config.json); a tokenizer without one answers chat requests with a 400.
"""

import asyncio
import json
import logging
import sys
import time
import uuid
from typing import Any, Optional, Sequence, Union

import fastapi
import jinja2.sandbox
import pydantic
import uvicorn
from etils import epath
from fastapi import responses
from prometheus_client import CollectorRegistry, exposition
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from MaxText import pyconfig, startup
from MaxText.config_schema import ConfigError
from MaxText.inference import loading, sampling
from MaxText.inference import engine as engine_lib
from MaxText.inference import scheduler as scheduler_lib
from MaxText.input_pipeline.tokenizer import Tokenizer, build_tokenizer

logger = logging.getLogger("MaxText")


class RequestError(Exception):
  """A client error: HTTP 400 with an OpenAI-style error body naming the parameter."""

  def __init__(self, message: str, param: Optional[str] = None, code: Optional[str] = None):
    super().__init__(message)
    self.param, self.code = param, code


def _error(status: int, message: str, param=None, code=None) -> responses.JSONResponse:
  body = {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": code}}
  return responses.JSONResponse(body, status_code=status)


class _Sampling(pydantic.BaseModel):
  """Fields both endpoints share (OpenAI names; top_k is an extension)."""

  model_config = pydantic.ConfigDict(extra="ignore")
  model: str = ""
  max_tokens: Optional[int] = None
  temperature: float = pydantic.Field(1.0, ge=0.0, le=2.0)
  top_p: float = pydantic.Field(1.0, gt=0.0, le=1.0)
  top_k: int = pydantic.Field(0, ge=0)
  seed: Optional[int] = None
  stop: Union[str, list[str], None] = None
  stream: bool = False
  n: int = pydantic.Field(1, ge=1, le=1)


class CompletionRequest(_Sampling):
  prompt: Union[str, list[str], list[int]]


class ChatMessage(pydantic.BaseModel):
  model_config = pydantic.ConfigDict(extra="allow")
  role: str
  content: Union[str, list[dict[str, Any]], None] = None


class ChatRequest(_Sampling):
  messages: list[ChatMessage] = pydantic.Field(min_length=1)
  max_completion_tokens: Optional[int] = None


def load_chat_template(config) -> Optional[str]:
  """The tokenizer's chat template (Jinja source), or None when it has none (SentencePiece and tiktoken never do)."""
  if config.tokenizer_type != "huggingface" or not config.tokenizer_path:
    return None
  path = epath.Path(config.tokenizer_path)
  folder = path if path.is_dir() else path.parent
  if (folder / "chat_template.jinja").exists():
    return (folder / "chat_template.jinja").read_text()
  if (folder / "tokenizer_config.json").exists():
    template = json.loads((folder / "tokenizer_config.json").read_text()).get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
      template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    return template if isinstance(template, str) else None
  return None


class Server:
  """Request handling between HTTP and the scheduler: encoding, validation, events -> OpenAI responses."""

  def __init__(self, scheduler: scheduler_lib.Scheduler, tokenizer: Tokenizer, config, model_name: str):
    self.scheduler, self.tokenizer, self.config, self.model_name = scheduler, tokenizer, config, model_name
    source = load_chat_template(config)
    self.chat_template = None
    if source:
      env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
      env.globals["raise_exception"] = self._template_error
      self.chat_template = env.from_string(source)

  @staticmethod
  def _template_error(message: str):
    raise RequestError(f"chat template: {message}", "messages")

  def _token_text(self, token_id: Optional[int]) -> str:
    return "" if token_id is None else self.tokenizer.decode([token_id])

  def encode_completion(self, prompt) -> list[int]:
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
      ids = list(prompt)
      if any(t < 0 or t >= self.config.vocab_size for t in ids):
        raise RequestError(f"prompt: token ids must be in [0, {self.config.vocab_size})", "prompt")
      return ids
    if isinstance(prompt, list):
      if len(prompt) != 1:
        raise RequestError("prompt: one prompt per request is supported (got a list of several)", "prompt")
      prompt = prompt[0]
    bos = [self.tokenizer.bos_id] if self.config.add_bos and self.tokenizer.bos_id is not None else []
    return bos + self.tokenizer.encode(prompt)

  def encode_chat(self, messages: list[ChatMessage]) -> list[int]:
    if self.chat_template is None:
      raise RequestError(
          f"the tokenizer ({self.config.tokenizer_type}: {self.config.tokenizer_path}) has no chat template;"
          " use /v1/completions",
          "messages",
          "no_chat_template",
      )
    rendered = self.chat_template.render(
        messages=[m.model_dump(exclude_none=True) for m in messages],
        add_generation_prompt=True,
        bos_token=self._token_text(self.tokenizer.bos_id),
        eos_token=self._token_text(self.tokenizer.eos_id),
    )
    return self.tokenizer.encode(rendered)

  def make_request(self, body: _Sampling, prompt: list[int], max_tokens: Optional[int]) -> scheduler_lib.Request:
    """Validates lengths against the engine and builds the scheduler request."""
    dims = self.scheduler.engine.dims
    if not prompt:
      raise RequestError("the prompt encodes to no tokens", "prompt")
    if len(prompt) > dims.max_prefill_length:
      raise RequestError(
          f"the prompt is {len(prompt)} tokens, more than the {dims.max_prefill_length} this server accepts"
          " (max_prefill_predict_length)",
          "prompt",
          "context_length_exceeded",
      )
    room = dims.max_cache_length - len(prompt)
    if max_tokens is None:
      max_tokens = room
    if max_tokens < 1 or max_tokens > room:
      raise RequestError(
          f"max_tokens {max_tokens} must be in [1, {room}]: the context holds {dims.max_cache_length} tokens and"
          f" the prompt is {len(prompt)}",
          "max_tokens",
          "context_length_exceeded",
      )
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > 4 or any(not s for s in stop):
      raise RequestError("stop: up to 4 non-empty strings", "stop")
    seed = body.seed if body.seed is not None else uuid.uuid4().int & 0x7FFFFFFF
    return scheduler_lib.Request(
        prompt=prompt,
        max_tokens=max_tokens,
        sampling=sampling.SamplingParams(body.temperature, body.top_k, body.top_p, seed),
        stop=tuple(stop),
        stop_ids=() if self.tokenizer.eos_id is None else (self.tokenizer.eos_id,),
    )

  async def run(self, http: fastapi.Request, request: scheduler_lib.Request, chat: bool, stream: bool):
    """Submits the request and answers with one JSON response or an SSE stream of chunks."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    request.on_event = lambda event: loop.call_soon_threadsafe(events.put_nowait, event)
    self.scheduler.submit(request)
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    created = int(time.time())
    base = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created}
    base["model"] = self.model_name
    usage = lambda: {
        "prompt_tokens": len(request.prompt),
        "completion_tokens": len(request.output_ids),
        "total_tokens": len(request.prompt) + len(request.output_ids),
    }
    if stream:
      return responses.StreamingResponse(
          self._stream(http, request, events, base, chat, usage), media_type="text/event-stream"
      )
    try:
      while True:
        try:
          event = await asyncio.wait_for(events.get(), timeout=0.5)
        except asyncio.TimeoutError:
          if await http.is_disconnected():
            self.scheduler.cancel(request)
            return responses.Response(status_code=499)
          continue
        if event.finish_reason is not None:
          break
    except asyncio.CancelledError:
      self.scheduler.cancel(request)
      raise
    if event.finish_reason == "error":
      return _error(500, f"generation failed: {event.error}")
    if chat:
      choice = {"index": 0, "message": {"role": "assistant", "content": request.text}}
    else:
      choice = {"index": 0, "text": request.text, "logprobs": None}
    choice["finish_reason"] = event.finish_reason
    return {**base, "choices": [choice], "usage": usage()}

  async def _stream(self, http, request, events, base, chat, usage):
    base = {**base, "object": "chat.completion.chunk" if chat else "text_completion"}
    try:
      if chat:
        yield _sse({**base, "choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]})
      while True:
        try:
          event = await asyncio.wait_for(events.get(), timeout=0.5)
        except asyncio.TimeoutError:
          if await http.is_disconnected():
            return
          continue
        reason = event.finish_reason
        if reason == "error":
          yield _sse({"error": {"message": f"generation failed: {event.error}", "type": "server_error"}})
          return
        if event.text or reason:
          if chat:
            choice = {"index": 0, "delta": {"content": event.text} if event.text else {}, "finish_reason": reason}
          else:
            choice = {"index": 0, "text": event.text, "logprobs": None, "finish_reason": reason}
          chunk = {**base, "choices": [choice]}
          if reason:
            chunk["usage"] = usage()
          yield _sse(chunk)
        if reason:
          yield "data: [DONE]\n\n"
          return
    finally:  # client gone (or done): a running request is cancelled so its pages are freed
      if not request.done.is_set():
        self.scheduler.cancel(request)


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
        "maxtext_generation_tokens_per_second": ("Generated tokens per second over 10 s", s.stats.tokens_per_second()),
    }
    for name, (doc, value) in gauges.items():
      yield GaugeMetricFamily(name, doc, value=value)
    counters = {
        "maxtext_prompt_tokens": ("Prompt tokens prefilled", s.stats.prompt_tokens),
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


def create_app(server: Server) -> fastapi.FastAPI:
  """The FastAPI app of `server` (its scheduler must be running: Scheduler.start)."""
  app = fastapi.FastAPI(title="MaxText", docs_url=None, redoc_url=None)
  registry = CollectorRegistry()
  registry.register(_MetricsCollector(server.scheduler))

  @app.exception_handler(fastapi.exceptions.RequestValidationError)
  async def invalid(_, exc: fastapi.exceptions.RequestValidationError):
    first = exc.errors()[0] if exc.errors() else {}
    param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
    return _error(400, f"{param or 'body'}: {first.get('msg', 'invalid request')}", param)

  @app.exception_handler(RequestError)
  async def bad_request(_, exc: RequestError):
    return _error(400, str(exc), exc.param, exc.code)

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
    request = server.make_request(body, server.encode_completion(body.prompt), body.max_tokens)
    return await server.run(http, request, chat=False, stream=body.stream)

  @app.post("/v1/chat/completions")
  async def chat_completions(body: ChatRequest, http: fastapi.Request):
    request = server.make_request(body, server.encode_chat(body.messages), body.max_completion_tokens or body.max_tokens)
    return await server.run(http, request, chat=True, stream=body.stream)

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
  scheduler = scheduler_lib.Scheduler(engine, params, decode or tokenizer.decode)
  logger.info("MaxText.serve: compiling (%d slots, %d KV pages)...", engine.dims.num_slots, scheduler.pages.capacity)
  scheduler.warmup()
  return Server(scheduler.start(), tokenizer, config, config.model_name or config.run_name or "maxtext")


def main(argv: Sequence[str]):
  logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr, force=True)
  logging.getLogger("absl").setLevel(logging.WARNING)
  config = startup.start(argv, "serve")
  try:
    server = build_server(config)
  except ConfigError as e:
    pyconfig.exit_with_config_error(e)
  logger.info("MaxText.serve: listening on http://%s:%d", config.serve_host, config.port)
  uvicorn.run(create_app(server), host=config.serve_host, port=config.port, log_level="info")


if __name__ == "__main__":
  main(sys.argv)
