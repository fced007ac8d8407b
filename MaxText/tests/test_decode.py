"""Decode: KV-cache logits equal the full forward, batching through the Scheduler, int8 cache, train -> decode CLI,
the CLI = api.generate = the server on greedy tokens, bad input."""

import functools
import logging
import os
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from MaxText import api, decode, serve, sharding, train
from MaxText.inference import engine as engine_lib
from MaxText.inference import sampling
from MaxText.inference import scheduler as scheduler_lib
from MaxText.layers import cache as cache_lib
from MaxText.tests import model_test_utils as mtu

REPO = pathlib.Path(__file__).resolve().parents[2]
SEQ = 28  # longer than tiny-mistral's 8-token window and than the 16-token prefill
PROMPT_LENGTHS = (3, 9, 16)


@functools.lru_cache(maxsize=None)
def setup(model_name="tests/tiny-llama", num_slots=3, **kw):
  """(model with numpy-random params, engine, params on the engine's mesh) for a tiny config; greedy by default."""
  kw.setdefault("decode_sampling_strategy", "greedy")
  model = mtu.build(model_name=model_name, **kw)
  engine = engine_lib.Engine(mtu.config_of(model_name=model_name, **kw), num_slots=num_slots)
  return model, engine, engine.place_params(nnx.state(model, nnx.Param).to_pure_dict())


def decode_prompts(engine, params, prompts, **kw):
  """Prompts through a fresh Scheduler on `engine` (what the decode CLI and api.generate run)."""
  scheduler = scheduler_lib.Scheduler(engine, params, max_prefills_per_step=engine.dims.num_slots)
  return scheduler_lib.decode_prompts(scheduler, prompts, **kw)


def tokens(batch=3, seed=0, vocab=256):
  return np.random.default_rng(seed).integers(0, vocab, (batch, SEQ)).astype(np.int32)


def full_logits(model, toks):
  positions = np.broadcast_to(np.arange(toks.shape[1], dtype=np.int32), toks.shape)
  return np.asarray(mtu.forward(model, toks, positions, None))


def teacher_forced_logits(engine, params, toks, lengths, steps):
  """Prefill row i's first lengths[i] tokens into slot i, then feed the true next tokens for `steps` steps.

  Returns (prefill logits [rows, vocab], step logits [steps, rows, vocab]).
  """
  state = engine.init_decode_state()
  first = []
  for slot, n in enumerate(lengths):
    padded = np.zeros((engine.dims.max_prefill_length,), np.int32)
    padded[:n] = toks[slot, :n]
    prefix = engine.prefill(params, padded, n)
    first.append(np.asarray(prefix["logits"][0]))
    state = engine.insert(prefix, state, slot)
  rows, lengths = np.arange(len(lengths)), np.asarray(lengths)
  step_logits = []
  for t in range(steps):
    state["tokens"] = jnp.asarray(toks[rows, lengths + t])
    state, _, logits = engine.generate_with_logits(params, state)
    step_logits.append(np.asarray(logits))
  return np.stack(first), np.stack(step_logits)


TINY_MODELS = sorted(f"tests/{p.stem}" for p in (REPO / "MaxText" / "configs" / "models" / "tests").glob("*.yml"))


@pytest.mark.parametrize("model_name", TINY_MODELS)
def test_engine_logits_equal_full_forward(model_name):
  """Every tiny family (GQA, sliding windows shorter than the sequence, local/global layers, soft caps, ...):
  prompts of 3, 9 and 16 tokens in three slots, each decoded 12 tokens with the true next token fed back.
  Params come in the scanned layout."""
  model, engine, params = setup(model_name)
  toks = tokens(vocab=engine.config.vocab_size)
  full = full_logits(model, toks)
  steps = SEQ - max(PROMPT_LENGTHS)
  first, step_logits = teacher_forced_logits(engine, params, toks, PROMPT_LENGTHS, steps)
  lengths = np.asarray(PROMPT_LENGTHS)
  np.testing.assert_allclose(first, full[np.arange(3), lengths - 1], atol=1e-4, rtol=0)
  for t in range(steps):
    np.testing.assert_allclose(step_logits[t], full[np.arange(3), lengths + t], atol=1e-4, rtol=0)


@pytest.mark.parametrize("scan_layers", [True, False])
@pytest.mark.parametrize("model_name", ["tests/tiny-llama", "tests/tiny-mistral", "tests/tiny-gemma3"])
def test_model_modes_equal_full_forward(model_name, scan_layers):
  """The model API without the engine: prefill then autoregressive steps with the cache as the module's nnx state."""
  model = mtu.build(model_name=model_name, scan_layers=scan_layers)
  config = mtu.config_of(model_name=model_name, scan_layers=scan_layers)
  toks = tokens(batch=2, vocab=config.vocab_size)
  full = full_logits(model, toks)
  with pytest.raises(ValueError, match="init_cache"):
    model(toks[:, :4], np.zeros((2, 4), np.int32), model_mode="prefill")
  model.init_cache(2, SEQ)
  shapes = {v.get_value().shape for v in jax.tree.leaves(nnx.state(model, cache_lib.KVCacheVar), is_leaf=is_variable)}
  stacked = (config.num_decoder_layers,) if scan_layers else ()  # [layers, batch, ...] in the scanned stack
  assert shapes == {stacked + (2, config.num_kv_heads, SEQ, config.head_dim), stacked + (2,)}
  step = nnx.jit(lambda m, t, p, mode: m(t, p, model_mode=mode), static_argnums=3)
  out = step(model, toks[:, :10], np.broadcast_to(np.arange(10, dtype=np.int32), (2, 10)), "prefill")
  np.testing.assert_allclose(out, full[:, :10], atol=1e-4, rtol=0)
  for i in range(10, SEQ):
    out = step(model, toks[:, i : i + 1], np.full((2, 1), i, np.int32), "autoregressive")
    np.testing.assert_allclose(out[:, 0], full[:, i], atol=1e-4, rtol=0)


def is_variable(x):
  return isinstance(x, nnx.Variable)


def test_cache_is_sharded_by_logical_rules():
  _, engine, _ = setup("tests/tiny-llama", num_slots=8)
  state = engine.init_decode_state()
  key = state["cache"]["decoder"]["layers"][1]["self_attention"]["kv_cache"]["key"]
  # [batch, kv_heads, seq, head_dim] (the engine unrolls the layers): cache_batch -> fsdp over 8 simulated devices.
  assert key.shape == (8, 2, 32, 16)
  assert key.sharding.spec == jax.sharding.PartitionSpec("fsdp")
  rules = engine.rules
  assert sharding.logical_to_mesh_spec(
      ("cache_batch", "cache_heads", "cache_sequence", "cache_kv"), rules, engine.mesh, (8, 2, 32, 16)
  ) == jax.sharding.PartitionSpec("fsdp")


def greedy_reference(model, prompt, n):
  """Greedy decode by repeated full forward passes (no cache), padded to one length so it compiles once."""
  ids = list(prompt)
  for _ in range(n):
    padded = np.zeros((1, SEQ), np.int32)
    padded[0, : len(ids)] = ids
    ids.append(int(np.argmax(full_logits(model, padded)[0, len(ids) - 1])))
  return ids[len(prompt) :]


def test_batched_greedy_equals_each_alone_and_full_forward():
  model, engine, params = setup("tests/tiny-mistral")
  toks = tokens()
  prompts = [list(toks[i, :n]) for i, n in enumerate(PROMPT_LENGTHS)]
  batched = decode_prompts(engine, params, prompts, max_new_tokens=12)
  _, one_slot, _ = setup("tests/tiny-mistral", num_slots=1)
  alone = [decode_prompts(one_slot, params, [p], max_new_tokens=12)[0] for p in prompts]
  assert batched == alone
  assert all(len(out) == 12 for out in batched)
  assert batched[2] == greedy_reference(model, prompts[2], 12)
  # More prompts than slots: finished slots take the waiting prompts; greedy makes the result order-independent.
  _, two_slots, _ = setup("tests/tiny-mistral", num_slots=2)
  assert decode_prompts(two_slots, params, prompts + prompts[:1], max_new_tokens=12) == batched + batched[:1]


def test_budget_and_stop_token():
  _, engine, params = setup()
  prompt = list(tokens()[0, :5])
  out = decode_prompts(engine, params, [prompt])[0]
  assert len(out) == engine.dims.max_cache_length - len(prompt)  # the cache (max_target_length) is the limit
  stop = out[3]
  stopped = decode_prompts(engine, params, [prompt], stop_ids=(stop,))[0]
  assert stopped == out[: out.index(stop) + 1]


def test_generate_steps_equals_single_steps():
  _, engine, params = setup()
  prefix = engine.prefill(params, tokens()[0, :16], 7)
  single = engine.insert(prefix, engine.init_decode_state(), 1)
  steps = []
  for _ in range(5):
    single, out = engine.generate(params, single)
    steps.append(np.asarray(out))
  fused, fused_out = engine.generate_steps(params, engine.insert(prefix, engine.init_decode_state(), 1), 5)
  np.testing.assert_array_equal(np.asarray(fused_out), np.stack(steps))
  np.testing.assert_array_equal(fused["positions"], single["positions"])


def test_greedy_deterministic_and_sampling_reproducible():
  _, engine, params = setup()
  prompts = [list(tokens()[i, :n]) for i, n in enumerate(PROMPT_LENGTHS)]
  run = functools.partial(decode_prompts, engine, params, prompts, max_new_tokens=8)
  assert run() == run()
  nucleus = lambda seed: sampling.SamplingParams(temperature=1.5, top_k=50, top_p=0.95, seed=seed).per_prompt(3)
  first, again = run(sampling_params=nucleus(7)), run(sampling_params=nucleus(7))
  assert first == again
  assert first != run(sampling_params=nucleus(8))
  # A request's draws depend on its seed and its own tokens only: prompt 1 alone (seed 7 + 1) draws the same.
  _, one_slot, _ = setup(num_slots=1)
  assert decode_prompts(one_slot, params, prompts[1:2], max_new_tokens=8, sampling_params=nucleus(8)[:1]) == first[1:2]


def kl(p_logits, q_logits):
  p = jax.nn.log_softmax(jnp.asarray(p_logits), -1)
  q = jax.nn.log_softmax(jnp.asarray(q_logits), -1)
  return np.asarray(jnp.sum(jnp.exp(p) * (p - q), -1))


@pytest.mark.parametrize("model_name", ["tests/tiny-llama", "tests/tiny-mistral"])
def test_int8_kv_cache_close_to_float(model_name):
  model, _, _ = setup(model_name)
  _, engine, params = setup(model_name, quantize_kvcache=True)
  toks = tokens()
  steps = SEQ - max(PROMPT_LENGTHS)
  _, quantized = teacher_forced_logits(engine, params, toks, PROMPT_LENGTHS, steps)
  full = full_logits(model, toks)
  lengths = np.asarray(PROMPT_LENGTHS)
  reference = np.stack([full[np.arange(3), lengths + t] for t in range(steps)])
  divergence = kl(reference, quantized)
  print(f"{model_name} int8 KV cache: KL(f32 || int8) mean {divergence.mean():.2e} max {divergence.max():.2e}")
  assert divergence.max() < 1e-3
  assert (reference.argmax(-1) == quantized.argmax(-1)).mean() > 0.95
  cache = engine.init_decode_state()["cache"]["decoder"]["layers"][0]["self_attention"]["kv_cache"]
  assert cache["key"].dtype == jnp.int8 and cache["key_scale"].shape[-1] == 1


def test_int8_quantization_round_trip():
  x = jax.random.normal(jax.random.key(0), (2, 5, 3, 16)) * 3
  q, scale = cache_lib.quantize_int8(x)
  assert q.dtype == jnp.int8 and scale.shape == (2, 5, 3, 1)
  assert float(jnp.max(jnp.abs(cache_lib.dequantize_int8(q, scale, jnp.float32) - x) / scale)) <= 0.5 + 1e-5
  zeros_q, zeros_scale = cache_lib.quantize_int8(jnp.zeros((1, 4)))
  assert not jnp.any(zeros_q) and jnp.all(jnp.isfinite(zeros_scale))


# ------------------------------------------------------------------------------------------- CLI

# A tiny Llama with the quickstart tokenizer's vocab, so the CLI can encode text.
CLI_ARGS = ["model_name=tests/tiny-llama", "vocab_size=4096", "log_config=false", "enable_tensorboard=false"]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
  """A finished 6-step training run (synthetic data) with its checkpoint: (base_output_directory, run_name)."""
  out = tmp_path_factory.mktemp("runs")
  config = train.pyconfig.initialize(
      ["", "base.yml", f"base_output_directory={out}", "run_name=tiny", "steps=6", "dataset_type=synthetic", *CLI_ARGS]
  )
  train.train(config)
  return out, "tiny"


def run_cli(args, out_dir, **env_vars):
  env = dict(os.environ, JAX_PLATFORMS="cpu", **env_vars)
  cmd = [sys.executable, "-m", "MaxText.decode", "MaxText/configs/base.yml", f"base_output_directory={out_dir}"]
  return subprocess.run(
      cmd + CLI_ARGS + args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False
  )


def test_train_then_decode_cli(trained_run, tmp_path):
  out_dir, run_name = trained_run
  prompts = tmp_path / "prompts.txt"
  prompts.write_text("The list type\n\nA dictionary maps\nfor loops\n")
  proc = run_cli([f"run_name={run_name}", f"prompts_file={prompts}", "per_device_batch_size=2"], out_dir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  # Outputs may span lines (the default sampling draws newlines too), so match across them.
  results = re.findall(r"^Input `(.*?)` -> `(.*?)`$", proc.stdout, flags=re.MULTILINE | re.DOTALL)
  assert [prompt for prompt, _ in results] == ["The list type", "A dictionary maps", "for loops"]
  assert any(output for _, output in results)
  assert re.search(r"^prefill: .* tokens/s\); generate: .* tokens/s\)$", proc.stdout, flags=re.MULTILINE)


def test_jax_cache_dir_lets_a_second_run_load_the_first_runs_programs(trained_run, tmp_path, capsys):
  """jax_cache_dir: a first decode run stores its compiled programs there, a second run of the same command loads
  its prefill and generate programs from it instead of compiling them (JAX's own cache log) and prints the same
  greedy text. A directory that cannot be created, or a URL, is a CONFIG ERROR."""
  out_dir, run_name = trained_run
  cache = tmp_path / "jax-cache"
  args = [f"run_name={run_name}", "prompt=The list type", "decode_sampling_strategy=greedy", f"jax_cache_dir={cache}"]
  # JAX stores only programs that took >= 1 s to compile; the tiny model's may take less on a fast host.
  env = {"JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_DEBUG_LOG_MODULES": "jax._src.compiler"}
  runs = [run_cli(args, out_dir, **env) for _ in range(2)]
  assert all(run.returncode == 0 for run in runs), runs[0].stderr[-3000:] + runs[1].stderr[-3000:]
  hit, miss = r"Persistent compilation cache hit for '(\w+)'", r"PERSISTENT COMPILATION CACHE MISS for '(\w+)'"
  decode_programs = {"jit__prefill_impl", "jit__generate_impl"}
  assert not decode_programs & set(re.findall(hit, runs[0].stderr)) and any(p.is_file() for p in cache.iterdir())
  assert decode_programs <= set(re.findall(miss, runs[0].stderr)), runs[0].stderr[-3000:]
  assert decode_programs <= set(re.findall(hit, runs[1].stderr)), runs[1].stderr[-3000:]
  assert not decode_programs & set(re.findall(miss, runs[1].stderr))
  text = [re.findall(r"^Input `.*?` -> `(.*?)`$", run.stdout, flags=re.MULTILINE | re.DOTALL) for run in runs]
  assert text[0] == text[1] and len(text[0]) == 1
  (tmp_path / "a_file").write_text("")
  for value, error in (
      (tmp_path / "a_file" / "cache", "jax_cache_dir: cannot create"),
      ("gs://b/c", "jax_cache_dir: a local directory, not a URL"),
  ):
    code, err = cli_error(capsys, f"base_output_directory={out_dir}", f"run_name={run_name}", f"jax_cache_dir={value}")
    assert code == 2 and f"CONFIG ERROR: {error}" in err, err


def test_cli_api_and_server_give_the_same_greedy_tokens(trained_run, tmp_path, capsys):
  """One Scheduler behind all three: the decode CLI (contiguous cache), api.generate and the server (paged cache)
  continue the same prompts with the same greedy tokens, each until EOS or the 32-token context is full."""
  out_dir, run_name = trained_run
  texts = ["The list type", "A dictionary maps", "for loops"]
  (tmp_path / "prompts.txt").write_text("\n".join(texts))
  keys = dict(
      base_output_directory=str(out_dir),
      run_name=run_name,
      decode_sampling_strategy="greedy",
      per_device_batch_size=0.5,  # 4 slots for 3 prompts: fewer row buckets to compile
      prompts_file=str(tmp_path / "prompts.txt"),
  )
  config = train.pyconfig.initialize(["", "base.yml", *CLI_ARGS], **keys)
  decode.run(config)
  cli = re.findall(r"^Input `(.*?)` -> `(.*?)`$", capsys.readouterr().out, flags=re.MULTILINE | re.DOTALL)
  model = api.load("base.yml", **dict(arg.split("=") for arg in CLI_ARGS), **keys)
  prompts = decode.encode_prompts(config, model.tokenizer, "prompts_file", texts)
  length, eos = config.max_target_length, model.tokenizer.eos_id
  via_api = [model.generate([ids], max_new_tokens=length - len(ids))[0] for ids in prompts]
  server = serve.build_server(config)
  try:
    requests = [server.make_request(serve.CompletionRequest(prompt=ids, temperature=0), ids, None) for ids in prompts]
    for request in requests:
      server.scheduler.submit(request)
    assert all(request.done.wait(120) for request in requests)
  finally:
    server.scheduler.stop()
  via_server = [request.output_ids for request in requests]
  assert via_api == via_server
  strip = lambda ids: ids[:-1] if ids and ids[-1] == eos else ids
  assert cli == [(text, model.tokenizer.decode(strip(ids))) for text, ids in zip(texts, via_api)]
  assert any(len(strip(ids)) > 2 for ids in via_api)  # something was generated, not only an early eos


def cli_error(capsys, *args):
  root = logging.getLogger()
  handlers, level = root.handlers[:], root.level
  try:
    with pytest.raises(SystemExit) as exit_info:
      decode.main(["decode", "base.yml", *CLI_ARGS, *args])
  finally:  # main() points logging at the captured stderr; later tests must not log into it
    root.handlers[:], root.level = handlers, level
  return exit_info.value.code, capsys.readouterr().err


def test_bad_inputs(trained_run, tmp_path, capsys):
  out_dir, run_name = trained_run
  run = [f"base_output_directory={out_dir}", f"run_name={run_name}"]
  long_prompt = "prompt=" + " ".join(["a much longer prompt than the context"] * 20)
  code, err = cli_error(capsys, *run, long_prompt)
  assert code == 2 and "CONFIG ERROR: prompt:" in err and "leaving no room to generate within max_target_length" in err
  code, err = cli_error(capsys, *run, "prompt=   ")
  assert code == 2 and "CONFIG ERROR: prompt: the prompt is empty" in err
  code, err = cli_error(capsys, *run, f"prompts_file={tmp_path / 'missing.txt'}")
  assert code == 2 and "CONFIG ERROR: prompts_file:" in err
  code, err = cli_error(capsys, f"base_output_directory={out_dir}", "run_name=never_trained")
  assert code == 2 and "no checkpoint found for run 'never_trained'" in err
  assert not (out_dir / "never_trained").exists()  # looking did not create the run
  code, err = cli_error(capsys, *run, "base_emb_dim=32")
  assert code == 2 and "does not match this config's model" in err and "checkpoint (64, 2) vs config (32, 2)" in err
  code, err = cli_error(capsys, f"load_parameters_path={tmp_path / 'nothing'}")
  assert code == 2 and "CONFIG ERROR: load_parameters_path: no checkpoint at" in err
