"""Continuous batching and the OpenAI-compatible server: batched == alone, no recompilation, page backpressure,
the official `openai` client on loopback (streaming and not), chat templates, bad requests, metrics, disconnects."""

import http.client
import json
import socket
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import openai
import pytest
import uvicorn
from flax import nnx

from MaxText import serve
from MaxText.inference import sampling
from MaxText.inference import engine as engine_lib
from MaxText.inference import scheduler as scheduler_lib
from MaxText.tests import model_test_utils as mtu

MODEL = {"model_name": "tests/tiny-llama", "decode_sampling_strategy": "greedy"}
PAGED = {"attention": "paged", "pagedattn_tokens_per_page": 4}


@pytest.fixture(scope="module")
def reference():
  """Greedy decode of one prompt alone: the contiguous engine with one slot."""
  engine = engine_lib.Engine(mtu.config_of(**MODEL), num_slots=1)
  scheduler = scheduler_lib.Scheduler(
      engine, engine.place_params(nnx.state(mtu.build(**MODEL), nnx.Param).to_pure_dict())
  )
  return lambda prompt, n: scheduler_lib.decode_prompts(scheduler, [prompt], max_new_tokens=n)[0]


@pytest.fixture(scope="module")
def warm():
  """(scheduler, compiles its warm-up ran): 8 slots, 47 usable pages of 4 tokens (5 full 32-token sequences)."""
  model_params = nnx.state(mtu.build(**MODEL), nnx.Param).to_pure_dict()
  engine = engine_lib.Engine(mtu.config_of(**MODEL, **PAGED, pagedattn_num_pages=48), num_slots=8)
  scheduler = scheduler_lib.Scheduler(engine, engine.place_params(model_params), lambda ids: " ".join(map(str, ids)))
  with scheduler_lib.CompileCounter() as warmup:
    scheduler.warmup()
  return scheduler, warmup.count


def test_32_concurrent_requests_equal_decoding_alone(warm, reference):
  """32 requests (prompts of 1..16 tokens, budgets of 1..16, greedy and sampled) through 8 slots: each greedy one
  gets the tokens it gets alone, each sampled one the tokens the same request gets alone; nothing compiles."""
  scheduler, warmup_compiles = warm
  assert warmup_compiles > 0  # the counter sees compiles
  rng = np.random.default_rng(0)

  def request(i):
    prompt = rng.integers(0, 256, int(rng.integers(1, 17))).tolist()
    sampled = i % 4 == 3
    settings = sampling.SamplingParams(temperature=0.9, top_k=20, top_p=0.9, seed=i) if sampled else None
    return scheduler_lib.Request(prompt, int(rng.integers(1, 17)), settings or sampling.SamplingParams())

  requests = [request(i) for i in range(32)]
  with scheduler_lib.CompileCounter() as serving:
    for r in requests:
      scheduler.submit(r)
    scheduler.run_until_idle()
  assert serving.count == 0
  assert scheduler.pages.used == 0 and scheduler.running == 0
  for r in requests:
    assert r.finish_reason == "length" and len(r.output_ids) == r.max_tokens
    if r.sampling.temperature == 0:
      assert r.output_ids == reference(r.prompt, r.max_tokens)
  sampled = [r for r in requests if r.sampling.temperature > 0]
  again = [scheduler_lib.Request(r.prompt, r.max_tokens, r.sampling) for r in sampled]
  for r in again:  # alone, one after another
    scheduler.submit(r)
    scheduler.run_until_idle()
  assert [r.output_ids for r in again] == [r.output_ids for r in sampled]
  assert any(r.output_ids != reference(r.prompt, r.max_tokens) for r in sampled)


def test_page_exhaustion_queues_instead_of_failing(warm, reference):
  """Pages for five 32-token sequences: eight such requests on eight slots, three wait their turn (FIFO) and all
  get their tokens."""
  scheduler, _ = warm
  prompts = [np.random.default_rng(i).integers(0, 256, 10).tolist() for i in range(8)]
  requests = [scheduler.submit(scheduler_lib.Request(p, 22)) for p in prompts]
  scheduler.step()  # admits 4 (max_prefills_per_step), then steps them
  assert scheduler.running == 4
  scheduler.step()
  assert scheduler.running == 5 and scheduler.queue_length == 3  # slots are free, pages are not
  assert scheduler.pages.used <= scheduler.pages.capacity
  scheduler.run_until_idle()
  assert [r.output_ids for r in requests] == [reference(p, 22) for p in prompts]
  assert scheduler.pages.used == 0


def test_stop_strings_and_stop_ids(warm, reference):
  scheduler, _ = warm
  prompt = [5, 6, 7]
  out = reference(prompt, 10)
  by_id = scheduler.submit(scheduler_lib.Request(prompt, 10, stop_ids=(out[4],)))
  by_text = scheduler.submit(scheduler_lib.Request(prompt, 10, stop=(f" {out[3]} ",)))
  scheduler.run_until_idle()
  assert by_id.output_ids == out[: out.index(out[4]) + 1] and by_id.finish_reason == "stop"
  assert by_text.finish_reason == "stop" and by_text.text == " ".join(map(str, out[:3]))
  streamed = []
  while not by_text.events.empty():
    streamed.append(by_text.events.get().text)
  assert "".join(streamed) == by_text.text


# ------------------------------------------------------------------------------------------- server

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def write_hf_tokenizer(folder):
  import tokenizers  # pylint: disable=import-outside-toplevel

  tok = tokenizers.Tokenizer(tokenizers.models.BPE())
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(
      vocab_size=300,
      special_tokens=["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"],
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
  )
  tok.train_from_iterator(["the cat sat on the mat", "hello world, the dog ran"] * 20, trainer)
  tok.save(str(folder / "tokenizer.json"))
  config = {"bos_token": "<s>", "eos_token": "<|im_end|>", "chat_template": CHAT_TEMPLATE}
  (folder / "tokenizer_config.json").write_text(json.dumps(config))


def start_uvicorn(app):
  sock = socket.socket()
  sock.bind(("127.0.0.1", 0))
  server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
  thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
  thread.start()
  while not server.started:
    time.sleep(0.05)
  return server, f"http://127.0.0.1:{sock.getsockname()[1]}"


SERVER_DIMS = {"vocab_size": 512, "max_target_length": 48, "max_prefill_predict_length": 32}


@pytest.fixture(scope="module")
def live(tmp_path_factory):
  """(Server, base url) for tiny-llama (vocab 512) with a Hugging Face tokenizer that has a chat template."""
  folder = tmp_path_factory.mktemp("tok")
  write_hf_tokenizer(folder)
  config = mtu.config_of(
      **MODEL,
      **SERVER_DIMS,
      tokenizer_type="huggingface",
      tokenizer_path=str(folder),
      per_device_batch_size=0.5,  # 4 slots on the 8 test devices
      pagedattn_num_pages=64,
      pagedattn_tokens_per_page=4,
  )
  params = nnx.state(mtu.build(**{**MODEL, "vocab_size": 512}), nnx.Param).to_pure_dict()
  server = serve.build_server(config, params)
  http_server, url = start_uvicorn(serve.create_app(server))
  yield server, url
  http_server.should_exit = True
  server.scheduler.stop()


def post(url, body):
  request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
  try:
    with urllib.request.urlopen(request, timeout=60) as response:
      return response.status, json.loads(response.read())
  except urllib.error.HTTPError as e:
    return e.code, json.loads(e.read())


def test_openai_client_completions_stream_and_not(live):
  server, url = live
  client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
  kw = {"model": "tiny", "prompt": "the cat sat", "max_tokens": 12, "temperature": 0}
  full = client.completions.create(**kw)
  ids = server.tokenizer.encode("the cat sat")
  assert full.usage.prompt_tokens == len(ids) + 1  # bos + prompt
  assert full.choices[0].finish_reason in ("length", "stop") and full.usage.completion_tokens <= 12
  chunks = list(client.completions.create(**kw, stream=True))
  assert "".join(c.choices[0].text for c in chunks) == full.choices[0].text
  assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason
  # Greedy through the server = the engine alone on the same ids (up to the eos the server stops at).
  contiguous = engine_lib.Engine(mtu.config_of(**MODEL, **SERVER_DIMS), num_slots=1)
  alone = scheduler_lib.decode_prompts(
      scheduler_lib.Scheduler(contiguous, server.scheduler.params), [[server.tokenizer.bos_id] + ids], max_new_tokens=12
  )[0]
  expected = alone[: alone.index(server.tokenizer.eos_id)] if server.tokenizer.eos_id in alone else alone
  assert full.choices[0].text == server.tokenizer.decode(expected)


def test_openai_client_chat_uses_the_template(live):
  server, url = live
  client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
  messages = [{"role": "user", "content": "hello world"}]
  reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0)
  rendered = "<|im_start|>user\nhello world<|im_end|>\n<|im_start|>assistant\n"
  assert reply.usage.prompt_tokens == len(server.tokenizer.encode(rendered))
  assert reply.choices[0].message.role == "assistant"
  stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0, stream=True)
  text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
  assert text == reply.choices[0].message.content


def test_bad_requests_get_400_with_json_error(live):
  server, url = live
  cases = [
      ("/v1/completions", {"model": "m"}, "prompt"),
      ("/v1/completions", {"prompt": "the cat", "max_tokens": 1000}, "max_tokens"),
      ("/v1/completions", {"prompt": "the cat " * 40}, "prompt"),
      ("/v1/completions", {"prompt": "the cat", "n": 2}, "n"),
      ("/v1/completions", {"prompt": "the cat", "temperature": -1}, "temperature"),
      ("/v1/chat/completions", {"messages": []}, "messages"),
  ]
  for path, body, param in cases:
    status, error = post(url + path, body)
    assert status == 400, (body, error)
    assert error["error"]["param"] == param and error["error"]["message"], error
  # A tokenizer without a chat template (SentencePiece): chat is a 400 that says so.
  config = mtu.config_of(**MODEL, vocab_size=4096, **PAGED)
  sp_server = serve.Server(server.scheduler, serve.build_tokenizer(config), config, "sp")
  assert sp_server.chat_template is None
  with pytest.raises(serve.RequestError, match="has no chat template"):
    sp_server.encode_chat([serve.ChatMessage(role="user", content="hi")])


def test_health_and_metrics(live):
  _, url = live
  with urllib.request.urlopen(f"{url}/health", timeout=10) as response:
    assert json.loads(response.read())["status"] == "ok"
  with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
    text = response.read().decode()
  for name in (
      "maxtext_queue_length",
      "maxtext_generation_tokens_per_second",
      'maxtext_time_to_first_token_seconds{quantile="0.5"}',
      "maxtext_kv_pages_used",
      "maxtext_kv_page_usage_ratio",
      "maxtext_generation_tokens_total",
  ):
    assert name in text, name


def test_client_disconnect_frees_pages(live, monkeypatch):
  server, url = live
  scheduler = server.scheduler
  decode = scheduler.decode
  monkeypatch.setattr(scheduler, "decode", lambda ids: (time.sleep(0.05), decode(ids))[1])  # ~0.05 s per token
  host, port = url.removeprefix("http://").split(":")
  conn = http.client.HTTPConnection(host, int(port), timeout=30)
  body = {"prompt": "the cat", "max_tokens": 40, "temperature": 0, "stream": True}
  conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
  response = conn.getresponse()
  assert response.status == 200
  response.fp.readline()  # the first event arrived: the request is running
  generated = scheduler.stats.generated_tokens
  assert scheduler.running == 1 and scheduler.pages.used > 0
  conn.sock.shutdown(socket.SHUT_RDWR)
  conn.close()
  deadline = time.monotonic() + 10
  while (scheduler.running or scheduler.pages.used) and time.monotonic() < deadline:
    time.sleep(0.05)
  assert scheduler.running == 0 and scheduler.pages.used == 0
  assert scheduler.stats.generated_tokens - generated < 39  # stopped early, not run to max_tokens
