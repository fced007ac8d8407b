"""Serving load test on loopback: throughput and time to first token at 1, 8 and 32 concurrent clients.

    python3 benchmarks/serving_benchmark.py [--model llama-small] [--requests 32] [--duration 60] [--prompt 24]
        [--max-tokens 32] [--slots 32]
    python3 benchmarks/serving_benchmark.py --system-prompt 256 [--requests 16]
    python3 benchmarks/serving_benchmark.py --mixed [--rates 0.5,2] [--requests 32] [--clients 32] [--chunk 256]

Starts MaxText.serve's app in-process (random weights, attention=paged, continuous batching) on a free port and runs
closed-loop clients from a separate process (each sends its next streaming /v1/completions request when the previous
one ends) until `--requests` requests finished or `--duration` seconds passed, per concurrency level. The baseline
is static batching through the same Scheduler (scheduler.decode_prompts, contiguous cache): the same prompts in
waves of `concurrency`, each wave decoded to the end before the next starts, so a request's first token waits for
its wave's prefill and its latency for the wave's longest request. Prints a table of medians (ms/token: from a
request's first token to its last, per token after the first). Greedy decoding with max_tokens fixed and EOS
ignored (token ids prompts), so both sides generate the same token counts.

`--system-prompt N`: prefix caching instead. One client sends `--requests` requests one after another, each a shared
N-token system prompt followed by its own `--prompt` tokens, to a server with enable_prefix_caching on and to one
with it off; prints the median time to first token of each (the first request, which fills the cache, excluded).

`--mixed`: a mixed workload instead. `--requests` requests with prompt lengths drawn in 16..512 and output lengths in
8..256 (fixed seed) arrive as a Poisson process at each of `--rates` requests/s; at most `--clients` are in flight
(later arrivals wait for a client). Continuous batching: the server (chunked prefill in `--chunk`-token pieces, prefix
caching) gets each request at its arrival. Static batching: the offline engine decodes waves of `--clients` requests
in arrival order, a wave starting when its last request has arrived and the previous wave is done. Prints tokens/s
over the whole run and the median and p99 time to first token (from arrival) of each; `--rounds N` alternates the
two N times (a new draw of the workload each round) and prints the median of the per-round ratios (a shared
machine's speed drifts by 10-20% over minutes).
"""

import argparse
import concurrent.futures
import json
import multiprocessing
import socket
import statistics
import sys
import threading
import time
import urllib.request

import jax
import numpy as np
import uvicorn
from flax import nnx

from MaxText import pyconfig, serve, startup
from MaxText.inference import engine as engine_lib
from MaxText.inference import request as request_lib
from MaxText.inference import scheduler as scheduler_lib
from MaxText.layers import model_creation


def _config(model: str, slots: int, prompt: int, max_tokens: int, **kw):
  keys = dict(
      model_name=model,
      run_name="serving_benchmark",
      per_device_batch_size=slots / jax.device_count(),
      max_prefill_predict_length=max(16, prompt),
      max_target_length=prompt + max_tokens + 16,
      decode_sampling_strategy="greedy",
      dtype="float32",
      log_config=False,
  )
  return pyconfig.initialize(["", str(pyconfig.CONFIGS_DIR / "base.yml")], **{**keys, **kw})


def _stream_one(url: str, prompt: list[int], max_tokens: int) -> tuple[float, float, int]:
  """(time to first token, latency, tokens) of one streaming request."""
  body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
  request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
  start, first, tokens = time.perf_counter(), None, 0
  with urllib.request.urlopen(request, timeout=600) as response:
    for line in response:
      if line.startswith(b"data: {"):
        first = first or time.perf_counter()
        chunk = json.loads(line[6:])
        tokens = chunk.get("usage", {}).get("completion_tokens", tokens)
  return first - start, time.perf_counter() - start, tokens


def run_server(url: str, prompts, concurrency: int, max_tokens: int, requests: int, duration: float) -> dict:
  results, lock, deadline = [], threading.Lock(), time.perf_counter() + duration
  counter = iter(range(requests))

  def client():
    while time.perf_counter() < deadline:
      with lock:
        i = next(counter, None)
      if i is None:
        return
      outcome = _stream_one(url, prompts[i % len(prompts)], max_tokens)
      with lock:
        results.append(outcome)

  start = time.perf_counter()
  with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
    for future in [pool.submit(client) for _ in range(concurrency)]:
      future.result()
  elapsed = time.perf_counter() - start
  return {
      "requests": len(results),
      "tokens/s": sum(r[2] for r in results) / elapsed,
      "ttft_ms": 1000 * statistics.median(r[0] for r in results),
      "latency_ms": 1000 * statistics.median(r[1] for r in results),
      "token_ms": 1000 * statistics.median((r[1] - r[0]) / max(1, r[2] - 1) for r in results),
  }


def run_static(scheduler, prompts, concurrency: int, max_tokens: int, requests: int, duration: float) -> dict:
  ttft, latency, per_token, tokens, start = [], [], [], 0, time.perf_counter()
  for wave_start in range(0, requests, concurrency):
    if time.perf_counter() - start > duration:
      break
    wave = [prompts[i % len(prompts)] for i in range(wave_start, min(wave_start + concurrency, requests))]
    t0 = time.perf_counter()
    scheduler.stats = request_lib.SchedulerStats()
    outputs = scheduler_lib.decode_prompts(scheduler, wave, max_new_tokens=max_tokens)
    stats = scheduler.stats
    # Static batching: all prompts are prefilled before the first decode step, so the wave's first tokens arrive
    # with its prefill; every request of the wave completes with the wave.
    ttft += [stats.prefill_seconds] * len(wave)
    latency += [time.perf_counter() - t0] * len(wave)
    per_token += [(latency[-1] - ttft[-1]) / max(1, max_tokens - 1)] * len(wave)
    tokens += sum(len(o) for o in outputs)
  elapsed = time.perf_counter() - start
  return {
      "requests": len(latency),
      "tokens/s": tokens / elapsed,
      "ttft_ms": 1000 * statistics.median(ttft),
      "latency_ms": 1000 * statistics.median(latency),
      "token_ms": 1000 * statistics.median(per_token),
  }


def _serve(config, params):
  """MaxText.serve's app for `config` on a free loopback port: (server, uvicorn server, completions url)."""
  server = serve.build_server(config, params, decode=lambda ids: " ".join(map(str, ids)))  # ids past the tokenizer
  server.tokenizer.eos_id = None  # random weights: ignore EOS so every request generates max_tokens
  sock = socket.socket()
  sock.bind(("127.0.0.1", 0))
  http = uvicorn.Server(uvicorn.Config(serve.create_app(server), log_level="warning"))
  threading.Thread(target=http.run, kwargs={"sockets": [sock]}, daemon=True).start()
  while not http.started:
    time.sleep(0.05)
  return server, http, f"http://127.0.0.1:{sock.getsockname()[1]}/v1/completions"


def prefix_caching_rows(args, params) -> list[tuple[str, dict]]:
  """Median TTFT of requests sharing an N-token system prompt, prefix caching off and on (one client)."""
  rng = np.random.default_rng(2)
  length = args.system_prompt + args.prompt
  system = rng.integers(3, 256, args.system_prompt).tolist()
  prompts = [system + rng.integers(3, 256, args.prompt).tolist() for _ in range(args.requests)]
  pages = -(-(length + args.max_tokens + 16) // 16) * args.slots + 1
  rows = []
  for caching in (False, True):
    config = _config(
        args.model,
        args.slots,
        length,
        args.max_tokens,
        attention="paged",
        pagedattn_num_pages=pages,
        enable_prefix_caching=caching,
    )
    server, http, url = _serve(config, params)
    outcomes = [_stream_one(url, p, args.max_tokens) for p in prompts]
    http.should_exit = True
    server.scheduler.stop()
    hits = server.scheduler.pages.hit_tokens
    ttft = [o[0] for o in outcomes[1:]]
    rows.append(
        (f"prefix caching {'on' if caching else 'off'}", {"ttft_ms": 1000 * statistics.median(ttft), "hits": hits})
    )
  return rows


def _mixed_workload(args, rate: float, rng) -> list[tuple[float, list[int], int]]:
  """(arrival time s, prompt ids, max_tokens) per request: Poisson arrivals, lengths drawn uniformly."""
  gaps = rng.exponential(1.0 / rate, args.requests)
  return [
      (float(t), rng.integers(3, 256, int(rng.integers(16, 513))).tolist(), int(rng.integers(8, 257)))
      for t in np.cumsum(gaps) - gaps[0]
  ]


def _percentile(values, q: float) -> float:
  return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def in_client_process(fn, *args):
  """fn(*args) in a fresh process: the load generator's threads (HTTP, SSE and JSON parsing) must not compete with
  the server's engine thread for this process's GIL, as real clients do not."""
  with multiprocessing.get_context("spawn").Pool(1) as pool:
    return pool.apply(fn, args)


def run_mixed_server(url: str, workload, clients: int, duration: float) -> dict:
  results, lock = [], threading.Lock()
  start = time.perf_counter()
  deadline = start + duration

  def one(item):
    arrival, prompt, max_tokens = item
    time.sleep(max(0.0, start + arrival - time.perf_counter()))
    if time.perf_counter() > deadline:
      return
    sent = time.perf_counter()
    ttft, _, tokens = _stream_one(url, prompt, max_tokens)
    with lock:  # TTFT from arrival: waiting for a free client counts
      results.append((sent - start - arrival + ttft, tokens))

  with concurrent.futures.ThreadPoolExecutor(clients) as pool:
    list(pool.map(one, workload))
  elapsed = time.perf_counter() - start
  ttft = [r[0] for r in results]
  return {
      "requests": len(results),
      "tokens/s": sum(r[1] for r in results) / elapsed,
      "ttft_ms": 1000 * _percentile(ttft, 50),
      "p99_ttft_ms": 1000 * _percentile(ttft, 99),
  }


def run_mixed_static(scheduler, workload, clients: int, duration: float) -> dict:
  ttft, tokens, start = [], 0, time.perf_counter()
  for wave_start in range(0, len(workload), clients):
    wave = workload[wave_start : wave_start + clients]
    time.sleep(max(0.0, start + wave[-1][0] - time.perf_counter()))  # the wave is complete when its last arrives
    if time.perf_counter() - start > duration:
      break
    requests = [request_lib.Request(p, m) for _, p, m in wave]
    for r in requests:
      scheduler.submit(r)
    # Static batching: every prompt of the wave is prefilled before the first decode step.
    while any(not r.output_ids for r in requests):
      scheduler.step()
    first = time.perf_counter() - start
    scheduler.run_until_idle()
    ttft += [first - arrival for arrival, _, _ in wave]
    tokens += sum(len(r.output_ids) for r in requests)
  elapsed = time.perf_counter() - start
  return {
      "requests": len(ttft),
      "tokens/s": tokens / elapsed,
      "ttft_ms": 1000 * _percentile(ttft, 50),
      "p99_ttft_ms": 1000 * _percentile(ttft, 99),
  }


def mixed_rows(args, params, config, paged) -> list[tuple[str, float, int, dict]]:
  """(mode, rate, round, result) per run."""
  server, http, url = _serve(paged, params)
  static_engine = engine_lib.Engine(config, num_slots=args.clients)
  static = scheduler_lib.Scheduler(static_engine, static_engine.place_params(params), max_prefills_per_step=args.clients)
  static.warmup_for(list(range(16, 513, 16)))
  modes = (
      ("static", static, lambda w: run_mixed_static(static, w, args.clients, args.duration)),
      (
          "continuous",
          server.scheduler,
          lambda w: in_client_process(run_mixed_server, url, w, args.clients, args.duration),
      ),
  )
  rows = []
  for rate in [float(r) for r in args.rates.split(",")]:
    # Rounds alternate the modes, so a drift in the machine's speed (shared hosts) reaches both alike; each round
    # draws its own workload (the server's prefix cache would hold a repeated one).
    for round_ in range(args.rounds):
      workload = _mixed_workload(args, rate, np.random.default_rng(3 + round_))
      for mode, scheduler, run in modes:
        scheduler.stats = request_lib.SchedulerStats()
        rows.append((mode, rate, round_, run(workload)))
        print(f"{mode} at {rate}/s, round {round_ + 1}: {scheduler.stats.summary()}", flush=True)
  http.should_exit = True
  server.scheduler.stop()
  return rows


def main(argv):
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("--model", default="llama-small")
  parser.add_argument("--requests", type=int, default=32, help="requests per concurrency level (at most)")
  parser.add_argument("--duration", type=float, default=60.0, help="seconds per concurrency level (at most)")
  parser.add_argument("--prompt", type=int, default=24, help="prompt tokens")
  parser.add_argument("--max-tokens", type=int, default=32)
  parser.add_argument("--slots", type=int, default=32)
  parser.add_argument("--levels", default="1,8,32")
  parser.add_argument("--system-prompt", type=int, default=0, help="measure prefix caching with this shared prefix")
  parser.add_argument("--mixed", action="store_true", help="the mixed workload with Poisson arrivals")
  parser.add_argument("--rates", default="0.5,2", help="--mixed: arrival rates, requests/s")
  parser.add_argument("--clients", type=int, default=32, help="--mixed: requests in flight at most")
  parser.add_argument("--chunk", type=int, default=256, help="--mixed: the server's prefill chunk (tokens)")
  parser.add_argument("--rounds", type=int, default=1, help="--mixed: static and continuous runs, alternated")
  args = parser.parse_args(argv)
  # The process set up as MaxText.serve's is (reuse_host_memory on CPU) before anything starts JAX: without it
  # XLA:CPU's temporaries are fresh zero-filled pages every call (a 16-of-32-row llama-small step 134 vs 72 ms).
  startup.start(["", str(pyconfig.CONFIGS_DIR / "base.yml"), f"model_name={args.model}", "log_config=False"])
  levels = [int(c) for c in args.levels.split(",")]
  if args.mixed:
    context = 512 + 256 + 16
    config = _config(args.model, args.clients, 512, 256 + 16)  # static: whole prompts in one prefill
    pages = -(-context // 16) * args.clients + 1
    served = _config(
        args.model,
        args.clients,
        512,
        256 + 16,
        max_prefill_predict_length=args.chunk,
        attention="paged",
        pagedattn_num_pages=pages,
    )
    model = model_creation.abstract_model(config)
    params = jax.tree.map(
        lambda a: np.random.default_rng(0).standard_normal(a.shape).astype(a.dtype) * 0.02,
        nnx.state(model, nnx.Param).to_pure_dict(),
    )
    rows = mixed_rows(args, params, config, served)
    print(
        f"\n{args.model}, random weights, float32, {jax.device_count()} {jax.default_backend()} device(s), mixed"
        f" workload: {args.requests} requests, prompts 16..512, outputs 8..256 tokens, Poisson arrivals,"
        f" {args.clients} clients"
    )
    print(f"{'mode':<11} {'rate/s':>6} {'round':>5} {'requests':>8} {'tokens/s':>9} {'TTFT ms':>9} {'p99 TTFT ms':>11}")
    for mode, rate, round_, r in rows:
      print(
          f"{mode:<11} {rate:>6} {round_ + 1:>5} {r['requests']:>8} {r['tokens/s']:>9.1f} {r['ttft_ms']:>9.1f}"
          f" {r['p99_ttft_ms']:>11.1f}"
      )
    for rate in sorted({row[1] for row in rows}):
      by_mode = {m: [r for mode, rr, _, r in rows if mode == m and rr == rate] for m in ("static", "continuous")}
      ratios = [c["tokens/s"] / s["tokens/s"] for s, c in zip(by_mode["static"], by_mode["continuous"])]
      ttft = {
          m: {k: statistics.median(r[k] for r in runs) for k in ("ttft_ms", "p99_ttft_ms")} for m, runs in by_mode.items()
      }
      print(
          f"at {rate}/s, continuous / static over {len(ratios)} round(s): tokens/s {statistics.median(ratios):.2f}x"
          f" (rounds: {', '.join(f'{x:.2f}' for x in ratios)}), median TTFT"
          f" {ttft['continuous']['ttft_ms'] / ttft['static']['ttft_ms']:.2f}x, p99 TTFT"
          f" {ttft['continuous']['p99_ttft_ms'] / ttft['static']['p99_ttft_ms']:.2f}x"
      )
    return
  if args.system_prompt:
    length = args.system_prompt + args.prompt
    config = _config(args.model, args.slots, length, args.max_tokens)
    model = model_creation.abstract_model(config)
    params = jax.tree.map(
        lambda a: np.random.default_rng(0).standard_normal(a.shape).astype(a.dtype) * 0.02,
        nnx.state(model, nnx.Param).to_pure_dict(),
    )
    rows = prefix_caching_rows(args, params)
    print(
        f"\n{args.model}, random weights, float32, {jax.device_count()} {jax.default_backend()} device(s), one client,"
        f" {args.system_prompt}-token shared system prompt + {args.prompt} own tokens, {args.max_tokens} new tokens"
    )
    print(f"{'mode':<18} {'median TTFT ms':>14} {'cached tokens':>13}")
    for mode, r in rows:
      print(f"{mode:<18} {r['ttft_ms']:>14.1f} {r['hits']:>13}")
    print(f"TTFT ratio off/on: {rows[0][1]['ttft_ms'] / rows[1][1]['ttft_ms']:.2f}x")
    return

  pages = -(-(args.prompt + args.max_tokens + 16) // 16) * args.slots + 1
  config = _config(args.model, args.slots, args.prompt, args.max_tokens)
  paged = _config(args.model, args.slots, args.prompt, args.max_tokens, attention="paged", pagedattn_num_pages=pages)
  model = model_creation.abstract_model(config)
  params = jax.tree.map(
      lambda a: np.random.default_rng(0).standard_normal(a.shape).astype(a.dtype) * 0.02,
      nnx.state(model, nnx.Param).to_pure_dict(),
  )
  rng = np.random.default_rng(1)
  prompts = [rng.integers(3, config.vocab_size, args.prompt).tolist() for _ in range(args.requests)]

  server, http, url = _serve(paged, params)

  rows = []
  for concurrency in levels:
    static_engine = engine_lib.Engine(config, num_slots=concurrency)
    static_params = static_engine.place_params(params)
    static = scheduler_lib.Scheduler(static_engine, static_params, max_prefills_per_step=concurrency)
    static.warmup_for([args.prompt])
    rows.append(
        ("static", concurrency, run_static(static, prompts, concurrency, args.max_tokens, args.requests, args.duration))
    )
    rows.append(
        (
            "continuous",
            concurrency,
            in_client_process(run_server, url, prompts, concurrency, args.max_tokens, args.requests, args.duration),
        )
    )
  http.should_exit = True
  server.scheduler.stop()

  print(
      f"\n{args.model}, random weights, float32, {jax.device_count()} {jax.default_backend()} device(s),"
      f" prompt {args.prompt} tokens, {args.max_tokens} new tokens, {args.slots} server slots (medians)"
  )
  print(
      f"{'mode':<11} {'clients':>7} {'requests':>8} {'tokens/s':>9} {'TTFT ms':>9} {'latency ms':>10}" f" {'ms/token':>8}"
  )
  for mode, concurrency, r in rows:
    print(
        f"{mode:<11} {concurrency:>7} {r['requests']:>8} {r['tokens/s']:>9.1f} {r['ttft_ms']:>9.1f}"
        f" {r['latency_ms']:>10.1f} {r['token_ms']:>8.1f}"
    )


if __name__ == "__main__":
  main(sys.argv[1:])
