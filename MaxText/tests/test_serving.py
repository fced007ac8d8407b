"""Continuous batching and the OpenAI-compatible server: batched == alone, no recompilation, page backpressure,
the official `openai` client on loopback (streaming and not), chat templates, bad requests, metrics, disconnects."""

import concurrent.futures
import http.client
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import openai
import pytest
import transformers
import uvicorn
from flax import nnx

from MaxText import api, pyconfig, serve
from MaxText.inference import sampling
from MaxText.inference import engine as engine_lib
from MaxText.inference import request as request_lib
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
    return request_lib.Request(prompt, int(rng.integers(1, 17)), settings or sampling.SamplingParams())

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
  again = [request_lib.Request(r.prompt, r.max_tokens, r.sampling) for r in sampled]
  for r in again:  # alone, one after another
    scheduler.submit(r)
    scheduler.run_until_idle()
  assert [r.output_ids for r in again] == [r.output_ids for r in sampled]
  assert any(r.output_ids != reference(r.prompt, r.max_tokens) for r in sampled)


def test_row_buckets_step_the_cheapest_covering_bucket(warm, reference):
  """Which row bucket steps for a highest occupied slot: the smallest covering one, unless a wider one is clearly
  (under 90% of its time) faster, as on CPU, where 16 and 8 of 32 rows measured slower than all 32. The scheduler
  steps what bucket_for says, and a request stepped in a wider bucket gets the tokens it gets alone."""
  cpu = {1: 0.012, 2: 0.025, 4: 0.045, 8: 0.078, 16: 0.143, 32: 0.066}
  assert scheduler_lib.cheapest_buckets(cpu, 32) == [1, 2, 4, 4] + [32] * 28
  monotone = {1: 0.01, 2: 0.011, 4: 0.012, 8: 0.02, 16: 0.03, 32: 0.05}
  assert scheduler_lib.cheapest_buckets(monotone, 32) == [1, 2, 4, 4] + [8] * 4 + [16] * 8 + [32] * 16
  noisy = {1: 0.010, 2: 0.0105, 4: 0.0098, 8: 0.02}  # 4 is faster than 1 and 2, but not by 10%
  assert scheduler_lib.cheapest_buckets(noisy, 8) == [1, 2, 4, 4, 8, 8, 8, 8]
  scheduler, _ = warm
  stepped, step_rows, bucket_for = [], scheduler._step_rows, scheduler.bucket_for  # pylint: disable=protected-access
  scheduler.bucket_for = [8] * 8
  scheduler._step_rows = lambda rows, logprobs=False: stepped.append(rows) or step_rows(rows, logprobs)  # pylint: disable=protected-access
  try:
    request = scheduler.submit(request_lib.Request([3, 1, 4], 6))
    scheduler.run_until_idle()
  finally:
    scheduler._step_rows, scheduler.bucket_for = step_rows, bucket_for  # pylint: disable=protected-access
  assert stepped == [8] * 5 and request.output_ids == reference([3, 1, 4], 6)


def test_page_exhaustion_queues_instead_of_failing(warm, reference):
  """Pages for five 32-token sequences: eight such requests on eight slots, three wait their turn (FIFO) and all
  get their tokens."""
  scheduler, _ = warm
  prompts = [np.random.default_rng(i).integers(0, 256, 10).tolist() for i in range(8)]
  requests = [scheduler.submit(request_lib.Request(p, 22)) for p in prompts]
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
  by_id = scheduler.submit(request_lib.Request(prompt, 10, stop_ids=(out[4],)))
  by_text = scheduler.submit(request_lib.Request(prompt, 10, stop=(f" {out[3]} ",)))
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
      ("/v1/completions", {"prompt": "the cat", "n": 17}, "n"),
      ("/v1/completions", {"prompt": "the cat", "n": 3, "best_of": 2}, "best_of"),
      ("/v1/completions", {"prompt": "the cat", "best_of": 2, "stream": True}, "best_of"),
      ("/v1/completions", {"prompt": "the cat", "max_tokens": 0}, "max_tokens"),
      ("/v1/completions", {"prompt": "the cat", "logprobs": 21}, "logprobs"),
      ("/v1/completions", {"prompt": [[1, 2], [3, 9999]]}, "prompt"),
      ("/v1/completions", {"prompt": [[1, 2]] * 20, "n": 16}, "prompt"),  # 320 samples
      ("/v1/completions", {"prompt": [[1, 2]] * 65}, "prompt"),
      ("/v1/completions", {"prompt": "the cat", "presence_penalty": 2.5}, "presence_penalty"),
      ("/v1/completions", {"prompt": "the cat", "stop_token_ids": [-1]}, "stop_token_ids"),
      ("/v1/completions", {"prompt": "x" * 100_000}, "prompt"),
      ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, "top_logprobs"),
      ("/v1/completions", {"prompt": "the cat", "temperature": -1}, "temperature"),
      ("/v1/chat/completions", {"messages": []}, "messages"),
  ]
  for path, body, param in cases:
    status, error = post(url + path, body)
    assert status == 400, (body, error)
    assert error["error"]["param"] == param and error["error"]["message"], error
  # A tokenizer without a chat template (SentencePiece) renders chat with the documented default template.
  config = mtu.config_of(**MODEL, vocab_size=4096, **PAGED)
  tok = serve.build_tokenizer(config)
  sp_server = serve.Server(server.scheduler, tok, config, "sp")
  ids = sp_server.encode_chat([serve.ChatMessage(role="user", content="hi")])
  assert ids == [tok.bos_id] + tok.encode("<|user|>\nhi\n<|assistant|>\n")


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
      "maxtext_kv_pages_cached",
      "maxtext_generation_tokens_total",
      "maxtext_prefix_cache_hit_tokens_total",
  ):
    assert name in text, name


def test_a_repeated_prompt_reuses_its_cached_pages(live):
  """The same 40-token prompt twice (longer than a prefill chunk): the second starts from the first's cached pages
  (the hit counter on /metrics grows) and answers the same greedy text."""
  server, url = live
  body = {"prompt": list(range(100, 140)), "max_tokens": 4, "temperature": 0}
  before = server.scheduler.pages.hit_tokens
  replies = [post(f"{url}/v1/completions", body)[1]["choices"][0]["text"] for _ in range(2)]
  assert replies[0] == replies[1]
  with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
    text = response.read().decode()
  hits = float(re.search(r"^maxtext_prefix_cache_hit_tokens_total (\S+)$", text, re.M).group(1))
  assert hits - before >= server.scheduler.pages.tokens_per_page


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


# ------------------------------------------------------------------------------------------- logprobs, n, scoring


@pytest.fixture(scope="module")
def reference_logprobs(live):
  """ids -> float64 log-softmax [len(ids), vocab] of the model's full forward pass (api.Model.logits, no cache)."""
  server, _ = live
  model = api.Model(mtu.config_of(**MODEL, **SERVER_DIMS), server.scheduler.params)

  def logprobs(ids):
    logits = model.logits(np.asarray(ids)).astype(np.float64)
    return logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)

  return logprobs


def test_greedy_logprobs_and_echo_equal_the_models_log_softmax(live, reference_logprobs):
  """logprobs=5 + echo on a token-id prompt: every prompt token after the first and every generated token has the
  logprob of the full forward pass's log-softmax, the top alternatives are its 5 largest, text_offset adds up."""
  server, url = live
  prompt = [5, 17, 42, 99, 3, 250, 7]
  status, body = post(
      f"{url}/v1/completions", {"prompt": prompt, "max_tokens": 6, "temperature": 0, "logprobs": 5, "echo": True}
  )
  assert status == 200, body
  choice = body["choices"][0]
  out = choice["logprobs"]
  generated = body["usage"]["completion_tokens"]
  # The generated ids: greedy argmax of the reference, step by step (the server stops at eos).
  ids = list(prompt)
  for _ in range(generated):
    ids.append(int(np.argmax(reference_logprobs(ids)[-1])))
  assert len(out["tokens"]) == len(ids) and out["tokens"] == [server.tokenizer.decode([t]) for t in ids]
  ref = reference_logprobs(ids)
  assert out["token_logprobs"][0] is None and out["top_logprobs"][0] is None
  for i in range(1, len(ids)):
    np.testing.assert_allclose(out["token_logprobs"][i], ref[i - 1, ids[i]], atol=1e-4)
    top = np.argsort(-ref[i - 1])[:5]
    shown = out["top_logprobs"][i]
    expected = {server.tokenizer.decode([t]): ref[i - 1, t] for t in top}
    expected.setdefault(out["tokens"][i], ref[i - 1, ids[i]])
    assert shown.keys() == expected.keys()
    np.testing.assert_allclose([shown[k] for k in expected], list(expected.values()), atol=1e-4)
  assert out["text_offset"] == list(np.cumsum([0] + [len(t) for t in out["tokens"]])[:-1])
  assert (
      choice["text"]
      == server.tokenizer.decode(prompt) + server.tokenizer.decode(ids[len(prompt) :]).split("<|im_end|>")[0]
  )


def test_max_tokens_0_scores_a_batch_of_prompts(live, reference_logprobs):
  """echo + max_tokens 0 + a list of prompts (lm-evaluation-harness's log-likelihood call): one choice per prompt,
  its prompt's logprobs, nothing generated."""
  _, url = live
  prompts = [[1, 2, 3, 4, 5], [9, 8, 7]]
  status, body = post(f"{url}/v1/completions", {"prompt": prompts, "max_tokens": 0, "echo": True, "logprobs": 1})
  assert status == 200, body
  assert body["usage"]["completion_tokens"] == 0 and body["usage"]["prompt_tokens"] == 8
  assert [c["index"] for c in body["choices"]] == [0, 1]
  for prompt, choice in zip(prompts, body["choices"]):
    ref = reference_logprobs(prompt)
    got = choice["logprobs"]["token_logprobs"]
    assert got[0] is None and len(got) == len(prompt)
    np.testing.assert_allclose(got[1:], [ref[i - 1, prompt[i]] for i in range(1, len(prompt))], atol=1e-4)
    assert choice["finish_reason"] == "length"


def test_n_samples_are_seeded_and_best_of_keeps_the_most_likely(live):
  """n=3 gives the three samples of seeds s, s+1, s+2 (each equal to that seed alone); best_of=3, n=1 returns the
  one with the highest mean token logprob, with logprobs hidden as asked."""
  _, url = live
  body = {"prompt": [11, 12, 13], "max_tokens": 8, "temperature": 1.0, "seed": 7}
  status, many = post(f"{url}/v1/completions", {**body, "n": 3, "logprobs": 0})
  assert status == 200, many
  assert [c["index"] for c in many["choices"]] == [0, 1, 2]
  for j, choice in enumerate(many["choices"]):
    status, alone = post(f"{url}/v1/completions", {**body, "seed": 7 + j, "logprobs": 0})
    assert alone["choices"][0]["text"] == choice["text"]
    got, expected = alone["choices"][0]["logprobs"]["token_logprobs"], choice["logprobs"]["token_logprobs"]
    np.testing.assert_allclose(got, expected, atol=1e-5)  # batched with others or alone: f32 rounding only
  assert len({c["text"] for c in many["choices"]}) > 1
  mean = lambda c: np.mean(c["logprobs"]["token_logprobs"])
  best = max(many["choices"], key=mean)
  status, chosen = post(f"{url}/v1/completions", {**body, "best_of": 3})
  assert status == 200 and len(chosen["choices"]) == 1
  assert chosen["choices"][0]["text"] == best["text"] and chosen["choices"][0]["logprobs"] is None
  assert chosen["usage"]["completion_tokens"] == sum(len(c["logprobs"]["tokens"]) for c in many["choices"])


def test_logprobs_echo_scoring_and_penalties_compile_nothing_after_warmup(live):
  """The server warms up the logprob variants too: none of these requests compiles anything."""
  _, url = live
  bodies = [
      {"prompt": [1] * 20, "max_tokens": 3, "logprobs": 5, "echo": True},
      {"prompt": [[1, 2], [3] * 30], "max_tokens": 0, "logprobs": 1, "echo": True},
      {"prompt": [4, 5], "max_tokens": 6, "temperature": 0.9, "top_p": 0.8, "n": 3, "frequency_penalty": 1.0},
      {"prompt": "the cat", "max_tokens": 4, "best_of": 2, "stream": False, "presence_penalty": 0.5},
  ]
  with scheduler_lib.CompileCounter() as serving:
    for body in bodies:
      status, reply = post(f"{url}/v1/completions", body)
      assert status == 200, reply
  assert serving.count == 0


def run_alone(scheduler, request):
  """A request through the running server's scheduler (engine thread), waited for."""
  scheduler.submit(request)
  assert request.done.wait(60)
  return request


def test_sampled_logprobs_are_those_of_the_filtered_tempered_distribution(live, reference_logprobs):
  """temperature 0.7, top_k 3: each reported distribution is log-softmax(logits / 0.7) over the 3 most likely
  tokens (the others -inf), and the chosen token is one of them."""
  server, _ = live
  prompt = [21, 22, 23, 24]
  params = sampling.SamplingParams(temperature=0.7, top_k=3, seed=3)
  request = run_alone(server.scheduler, request_lib.Request(prompt, 5, params, logprobs=4))
  ids = prompt + request.output_ids
  for i, entry in enumerate(request.output_logprobs):
    ref = reference_logprobs(ids[: len(prompt) + i])[-1] / 0.7
    top3 = np.argsort(-ref)[:3]
    tempered = ref[top3] - np.logaddexp.reduce(ref[top3])
    assert [t for t, _ in entry.top[:3]] == top3.tolist()
    np.testing.assert_allclose([lp for _, lp in entry.top[:3]], tempered, atol=1e-4)
    assert entry.top[3][1] == -np.inf
    assert ids[len(prompt) + i] in top3
    np.testing.assert_allclose(entry.logprob, tempered[top3.tolist().index(ids[len(prompt) + i])], atol=1e-4)


def test_frequency_and_presence_penalties_follow_openais_formula(live, reference_logprobs):
  """Greedy with penalties = argmax of logits - frequency x count - presence x (count > 0) over the generated
  tokens, step by step from the full forward pass; the HTTP fields reach the sampler."""
  server, url = live
  prompt = [1, 2, 3]  # greedy repeats itself from the 4th token
  outputs = []
  for presence, frequency in ((0.0, 2.0), (1.5, 0.0), (-0.5, 0.5)):
    params = sampling.SamplingParams(presence_penalty=presence, frequency_penalty=frequency)
    request = run_alone(server.scheduler, request_lib.Request(prompt, 10, params))
    ids, counts = list(prompt), np.zeros(512)
    for _ in range(10):
      logits = reference_logprobs(ids)[-1] - frequency * counts - presence * (counts > 0)
      ids.append(int(np.argmax(logits)))
      counts[ids[-1]] += 1
    assert request.output_ids == ids[len(prompt) :], (presence, frequency)
    outputs.append(request.output_ids)
  plain = run_alone(server.scheduler, request_lib.Request(prompt, 10))
  assert all(out != plain.output_ids for out in outputs)  # the penalties changed the greedy output
  body = {"prompt": prompt, "max_tokens": 10, "temperature": 0, "presence_penalty": -0.5, "frequency_penalty": 0.5}
  _, http = post(f"{url}/v1/completions", {**body, "stop_token_ids": []})
  eos = server.tokenizer.eos_id
  expected = request.output_ids[: request.output_ids.index(eos)] if eos in request.output_ids else request.output_ids
  assert http["choices"][0]["text"] == server.tokenizer.decode(expected)


def test_stop_token_ids_end_the_choice(live, reference_logprobs):
  server, url = live
  ids = [40, 41]
  for _ in range(3):
    ids.append(int(np.argmax(reference_logprobs(ids)[-1])))
  body = {"prompt": [40, 41], "max_tokens": 10, "temperature": 0, "stop_token_ids": [ids[-1]]}
  _, stopped = post(f"{url}/v1/completions", body)
  first = ids.index(ids[-1], 2)  # the stop id's first appearance among the generated tokens
  assert stopped["choices"][0]["finish_reason"] == "stop"
  assert stopped["usage"]["completion_tokens"] == first - 1  # the stop token counts, its text is not shown
  assert stopped["choices"][0]["text"] == server.tokenizer.decode(ids[2:first])


def test_streamed_logprobs_equal_the_whole_response(live):
  """Streaming carries each token's logprobs (and the echoed prompt first); chunks add up to the whole response,
  for completions and for chat through the openai client (n=2, top_logprobs)."""
  _, url = live
  body = {"prompt": [50, 51, 52], "max_tokens": 6, "temperature": 0, "logprobs": 2, "echo": True}
  _, whole = post(f"{url}/v1/completions", body)
  client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
  chunks = [c.model_dump() for c in client.completions.create(model="m", stream=True, **body)]
  logprobs = [c["choices"][0]["logprobs"] for c in chunks if c["choices"]]
  expected = whole["choices"][0]["logprobs"]
  for field in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
    assert sum((lp[field] for lp in logprobs), []) == expected[field], field
  assert "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"]

  messages = [{"role": "user", "content": "the cat"}]
  kw = {"model": "m", "messages": messages, "max_tokens": 5, "temperature": 0.8, "seed": 1, "n": 2}
  reply = client.chat.completions.create(**kw, logprobs=True, top_logprobs=2)
  assert [c.index for c in reply.choices] == [0, 1]
  for choice in reply.choices:
    assert len(choice.logprobs.content) == reply.usage.completion_tokens // 2 or choice.finish_reason == "stop"
    for item in choice.logprobs.content:
      assert len(item.top_logprobs) == 2 and item.logprob <= 0
      assert item.top_logprobs[0].logprob >= item.logprob - 1e-6  # the most likely is listed first
  streamed = {0: [], 1: []}
  texts = {0: "", 1: ""}
  for chunk in client.chat.completions.create(**kw, logprobs=True, top_logprobs=2, stream=True):
    for c in chunk.choices:
      texts[c.index] += c.delta.content or ""
      streamed[c.index] += [(i.token, i.logprob) for i in (c.logprobs.content if c.logprobs else [])]
  for choice in reply.choices:
    assert texts[choice.index] == choice.message.content
    # The repeated prompt's pages come from the prefix cache the first request filled: equal up to float rounding.
    want = [(i.token, i.logprob) for i in choice.logprobs.content]
    assert [t for t, _ in streamed[choice.index]] == [t for t, _ in want]
    np.testing.assert_allclose([lp for _, lp in streamed[choice.index]], [lp for _, lp in want], atol=1e-4)


# ------------------------------------------------------------------------------------------- access control


def test_api_key_guards_v1_and_metrics(live, monkeypatch):
  """serve_api_key: the openai client with the right key is served, a wrong or missing key gets 401 with an
  OpenAI-style error; /health stays open; the key may come from MAXTEXT_SERVE_API_KEY instead; oversize bodies
  are 413 before parsing; logged configs redact the key."""
  server, _ = live
  keyed = serve.Server(server.scheduler, server.tokenizer, server.config, "keyed")
  values = {k: getattr(server.config, k) for k in server.config.keys()}
  keyed.config = pyconfig.Config({**values, "serve_api_key": "s3cret", "serve_max_request_bytes": 4096})
  assert "s3cret" not in keyed.config.to_yaml() and "<redacted>" in keyed.config.to_yaml()
  http_server, url = start_uvicorn(serve.create_app(keyed))
  try:
    ok = openai.OpenAI(base_url=f"{url}/v1", api_key="s3cret", max_retries=0)
    assert ok.completions.create(model="m", prompt="the cat", max_tokens=2, temperature=0).choices[0].text is not None
    for key in ("wrong", "s3cre"):
      with pytest.raises(openai.AuthenticationError) as error:
        openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0).models.list()
      assert error.value.body["code"] == "invalid_api_key"
    status, body = post(f"{url}/v1/completions", {"prompt": "the cat"})
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    with urllib.request.urlopen(f"{url}/health", timeout=10) as response:
      assert response.status == 200
    with pytest.raises(urllib.error.HTTPError) as error:
      urllib.request.urlopen(f"{url}/metrics", timeout=10)
    assert error.value.code == 401
    big = urllib.request.Request(
        f"{url}/v1/completions",
        json.dumps({"prompt": "x" * 5000}).encode(),
        {"Content-Type": "application/json", "Authorization": "Bearer s3cret"},
    )
    with pytest.raises(urllib.error.HTTPError) as error:
      urllib.request.urlopen(big, timeout=10)
    assert error.value.code == 413 and json.loads(error.value.read())["error"]["code"] == "request_too_large"
  finally:
    http_server.should_exit = True
  open_config = pyconfig.Config({**values, "serve_host": "0.0.0.0"})
  assert serve.warn_if_open(open_config) and not serve.warn_if_open(server.config)  # loopback: no warning
  monkeypatch.setenv("MAXTEXT_SERVE_API_KEY", "from-env")
  assert serve.api_key(server.config) == "from-env" and not serve.warn_if_open(open_config)
  monkeypatch.delenv("MAXTEXT_SERVE_API_KEY")
  assert serve.api_key(server.config) == ""


# ------------------------------------------------------------------------------------------- lm-evaluation-harness

LL_TASK = """task: maxtext_ll
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}/ll.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""
GEN_TASK = """task: maxtext_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}/gen.jsonl
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["mat"]
  max_gen_toks: 6
metric_list:
  - metric: exact_match
"""


def test_lm_eval_harness_scores_equal_direct_computation(live, reference_logprobs, tmp_path):
  """`lm_eval --model local-completions` against the server (the command docs/decoding-and-serving.md shows), a
  log-likelihood task and a generate-until task defined locally: every per-request log-likelihood, greedy flag and
  generation equals one computed from the model's logits directly, and so do the scores."""
  server, url = live
  hf = transformers.AutoTokenizer.from_pretrained(server.config.tokenizer_path)
  encode = lambda text: hf(text, add_special_tokens=False)["input_ids"]

  def greedy_text(question):  # what the server should generate: 6 greedy tokens, cut at eos and at "mat"
    ids = encode(question)
    start = len(ids)
    for _ in range(6):
      ids.append(int(np.argmax(reference_logprobs(ids)[-1])))
    generated = ids[start:]
    if server.tokenizer.eos_id in generated:
      generated = generated[: generated.index(server.tokenizer.eos_id)]
    return server.tokenizer.decode(generated).split("mat")[0]

  def scored(question, choice):  # (log-likelihood, greedy) of the choice after the question, lm-eval's way
    context, whole = encode(question), encode(f"{question} {choice}")  # the context's tokens, then the rest
    rows = reference_logprobs(whole)[len(context) - 1 : -1]
    continuation = whole[len(context) :]
    loglik = sum(rows[i, t] for i, t in enumerate(continuation))
    return loglik, all(np.argmax(rows[i]) == t for i, t in enumerate(continuation))

  words = ["the cat", "the dog", "hello world", "the mat", "cat sat on", "dog ran"]
  choices = ["the mat", "the dog", "hello"]
  ll_docs = []
  for i, w in enumerate(words):  # half the answers are the model's pick, so acc is neither 0 nor 1
    pick = int(np.argmax([scored(f"{w} sat on", c)[0] for c in choices]))
    ll_docs.append({"question": f"{w} sat on", "choices": choices, "answer": pick if i % 2 else (pick + 1) % 3})
  # Half the answers are the model's own greedy continuation, so exact_match is neither 0 nor 1.
  gen_docs = [{"question": w, "answer": greedy_text(w) if i % 2 else "sat on the"} for i, w in enumerate(words)]
  (tmp_path / "ll.jsonl").write_text("".join(json.dumps(d) + "\n" for d in ll_docs))
  (tmp_path / "gen.jsonl").write_text("".join(json.dumps(d) + "\n" for d in gen_docs))
  (tmp_path / "ll.yaml").write_text(LL_TASK.format(data=tmp_path))
  (tmp_path / "gen.yaml").write_text(GEN_TASK.format(data=tmp_path))
  model_args = f"base_url={url}/v1/completions,tokenizer={server.config.tokenizer_path},tokenizer_backend=huggingface"
  command = [
      sys.executable,
      "-m",
      "lm_eval",
      "--model",
      "local-completions",
      "--model_args",
      model_args + ",max_length=48",
  ]
  command += ["--tasks", "maxtext_ll,maxtext_gen", "--include_path", str(tmp_path), "--log_samples", "--batch_size", "4"]
  command += ["--output_path", str(tmp_path / "out")]
  env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "OPENAI_API_KEY": "unused"}
  done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  out = tmp_path / "out"
  samples = {
      t: [json.loads(line) for line in next(out.rglob(f"samples_{t}_*.jsonl")).open()]
      for t in ("maxtext_ll", "maxtext_gen")
  }
  results = json.loads(next(out.rglob("results_*.json")).read_text())["results"]

  correct = 0
  for sample in samples["maxtext_ll"]:
    doc = ll_docs[sample["doc_id"]]
    scores = []
    for choice, ((loglik, greedy),) in zip(doc["choices"], sample["resps"]):
      expected, expected_greedy = scored(doc["question"], choice)
      np.testing.assert_allclose(float(loglik), expected, atol=1e-3)
      assert greedy == str(expected_greedy)
      scores.append(expected)
    correct += int(np.argmax(scores) == doc["answer"])
  assert correct == len(ll_docs) // 2
  np.testing.assert_allclose(results["maxtext_ll"]["acc,none"], correct / len(ll_docs))

  matches = 0
  for sample in samples["maxtext_gen"]:
    doc = gen_docs[sample["doc_id"]]
    assert sample["resps"][0][0] == greedy_text(doc["question"])
    matches += int(greedy_text(doc["question"]) == doc["answer"])
  assert 0 < matches < len(gen_docs)
  np.testing.assert_allclose(results["maxtext_gen"]["exact_match,none"], matches / len(gen_docs))


# The soak's size: CI runs the short form (96 requests, 16 clients); MAXTEXT_SOAK_SECONDS=60
# MAXTEXT_SOAK_CLIENTS=64 runs the long one (clients send requests until the time is up).
SOAK_SECONDS = float(os.environ.get("MAXTEXT_SOAK_SECONDS", "0"))
SOAK_CLIENTS = int(os.environ.get("MAXTEXT_SOAK_CLIENTS", "16"))


def test_short_soak_with_bad_clients_leaves_the_server_clean(live):
  """96 requests from 16 concurrent clients (or as many as SOAK_CLIENTS send in SOAK_SECONDS), mixed: greedy
  completions (streamed or not), streams dropped after the first event, malformed JSON, prompts past the limit,
  invalid sampling values. Every bad request gets a 4xx JSON error, the server stays up, slots and pages return to
  zero (/metrics), and every completed greedy request equals decoding its prompt alone."""
  server, url = live
  host, port = url.removeprefix("http://").split(":")

  def request_of(i):  # (kind, prompt) of request i, the same on every run
    rng = np.random.default_rng(i)
    kind = str(rng.choice(["greedy", "stream", "drop", "malformed", "oversize", "invalid"]))
    return kind, rng.integers(1, 300, int(rng.integers(2, 20))).tolist()

  def raw(body: bytes, stream: bool = False, drop: bool = False):
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    response = conn.getresponse()
    if drop:
      response.fp.readline()
      conn.sock.shutdown(socket.SHUT_RDWR)
      conn.close()
      return response.status, None
    data = response.read().decode()
    conn.close()
    if stream:
      events = [json.loads(line[6:]) for line in data.splitlines() if line.startswith("data: {")]
      return response.status, "".join(e["choices"][0]["text"] for e in events)
    return response.status, json.loads(data)

  def client(i):
    kind, prompt = request_of(i)
    body = {"prompt": prompt, "max_tokens": 8, "temperature": 0}
    if kind == "greedy":
      status, reply = raw(json.dumps(body).encode())
      return kind, status, reply["choices"][0]["text"] if status == 200 else reply
    if kind in ("stream", "drop"):
      return kind, *raw(json.dumps({**body, "stream": True}).encode(), stream=True, drop=kind == "drop")
    if kind == "malformed":
      return (kind, *raw(b'{"prompt": [1, 2, '))
    if kind == "oversize":
      return (kind, *raw(json.dumps({**body, "prompt": [5] * 60}).encode()))
    return (kind, *raw(json.dumps({**body, "temperature": 7, "top_p": 0}).encode()))

  counter, lock, deadline = iter(range(10**9)), threading.Lock(), time.monotonic() + SOAK_SECONDS

  def worker():
    outcomes = []
    while True:
      with lock:
        i = next(counter)
      if (time.monotonic() > deadline) if SOAK_SECONDS > 0 else i >= 96:
        return outcomes
      outcomes.append((i, *client(i)))

  with concurrent.futures.ThreadPoolExecutor(SOAK_CLIENTS) as pool:
    futures = [pool.submit(worker) for _ in range(SOAK_CLIENTS)]
    results = sorted(r for f in futures for r in f.result())
  counts = {k: sum(r[1] == k for r in results) for k in sorted({r[1] for r in results})}
  print(f"soak: {len(results)} requests from {SOAK_CLIENTS} clients: {counts}")
  prompts = {i: request_of(i)[1] for i, _, _, _ in results}
  results = {i: outcome for i, *outcome in results}
  contiguous = engine_lib.Engine(mtu.config_of(**MODEL, **SERVER_DIMS), num_slots=8)
  alone = scheduler_lib.Scheduler(contiguous, server.scheduler.params)
  done = [i for i, (kind, _, _) in results.items() if kind in ("greedy", "stream")]
  expected = scheduler_lib.decode_prompts(alone, [prompts[i] for i in done], max_new_tokens=8)
  eos = server.tokenizer.eos_id
  for i, ids in zip(done, expected):
    kind, status, text = results[i]
    assert status == 200, (kind, text)
    assert text == server.tokenizer.decode(ids[: ids.index(eos)] if eos in ids else ids), kind
  for kind, status, reply in results.values():
    if kind in ("malformed", "oversize", "invalid"):
      assert 400 <= status < 500 and reply["error"]["message"], (kind, status, reply)
    if kind == "drop":
      assert status == 200
  deadline = time.monotonic() + 20
  while (server.scheduler.running or server.scheduler.pages.used) and time.monotonic() < deadline:
    time.sleep(0.05)
  with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
    metrics = response.read().decode()
  assert "maxtext_running_requests 0.0" in metrics and "maxtext_kv_pages_used 0.0" in metrics
  with urllib.request.urlopen(f"{url}/health", timeout=10) as response:
    assert json.loads(response.read())["status"] == "ok"
