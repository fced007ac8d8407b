"""Chunked prefill: prompts longer than the prefill length are prefilled chunk by chunk (each chunk attending over
the cache so far), with logits equal to the unchunked forward, decoding after it equal to an engine that prefills
the whole prompt at once, and running requests still getting a token every scheduler round while a long prompt is
being prefilled."""

import numpy as np
import pytest
from flax import nnx

from MaxText.inference import engine as engine_lib
from MaxText.inference import request as request_lib
from MaxText.inference import scheduler as scheduler_lib
from MaxText.tests import model_test_utils as mtu

CHUNK, CONTEXT = 8, 48
PAGED = {"attention": "paged", "pagedattn_num_pages": 40, "pagedattn_tokens_per_page": 4}


def _model_and_params(model_name):
  kw = {"model_name": model_name, "decode_sampling_strategy": "greedy"}
  model = mtu.build(**kw)
  return kw, model, nnx.state(model, nnx.Param).to_pure_dict()


@pytest.mark.parametrize("model_name", ["tests/tiny-llama", "tests/tiny-gemma3", "tests/tiny-deepseek2"])
def test_chunked_prefill_logits_equal_the_full_forward(model_name):
  """A 27-token prompt as a 3-token piece and three 8-token chunks: the last logits, and every decode step after
  the insert (teacher-forced), equal the full forward's (f32). Gemma 3: sliding-window layers (window 8); DeepSeek
  V2: MLA's latent cache."""
  kw, model, params = _model_and_params(model_name)
  engine = engine_lib.Engine(mtu.config_of(**kw), num_slots=2, max_prefill_length=CHUNK, max_cache_length=CONTEXT)
  params = engine.place_params(params)
  seq = 34
  toks = np.random.default_rng(1).integers(0, engine.config.vocab_size, (1, seq)).astype(np.int32)
  full = np.asarray(mtu.forward(model, toks, np.arange(seq, dtype=np.int32)[None], None))
  n = 27
  padded = np.zeros((CHUNK,), np.int32)
  padded[:3] = toks[0, :3]
  prefix = engine.prefill(params, padded, 3, cache_length=CONTEXT)
  np.testing.assert_allclose(np.asarray(prefix.logits)[0], full[0, 2], atol=1e-4, rtol=0)
  for start in range(3, n, CHUNK):
    prefix = engine.extend(params, prefix, toks[0, start : start + CHUNK])
    np.testing.assert_allclose(np.asarray(prefix.logits)[0], full[0, start + CHUNK - 1], atol=1e-4, rtol=0)
  assert int(np.asarray(prefix.lengths)[0]) == n
  state = engine.insert(prefix, engine.init_decode_state(), 1)
  for t in range(n, seq):
    state["tokens"] = state["tokens"].at[1].set(toks[0, t])
    state, _, logits = engine.generate_with_logits(params, state)
    np.testing.assert_allclose(np.asarray(logits)[1], full[0, t], atol=1e-4, rtol=0)


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_long_prompts_decode_as_with_one_prefill(paged):
  """Prompts of 5..45 tokens through 3 slots with 8-token chunks give the greedy ids of an engine whose prefill
  takes the whole prompt at once (mixed with short prompts, slots reused)."""
  kw, _, params = _model_and_params("tests/tiny-llama")
  config = mtu.config_of(**kw, **(PAGED if paged else {}))
  chunked = engine_lib.Engine(config, num_slots=3, max_prefill_length=CHUNK, max_cache_length=CONTEXT)
  whole = engine_lib.Engine(config, num_slots=3, max_prefill_length=CONTEXT, max_cache_length=CONTEXT)
  rng = np.random.default_rng(2)
  prompts = [rng.integers(1, 256, n).tolist() for n in (40, 5, 17, 45, 9, 24, 33)]
  runs = []
  for engine in (chunked, whole):
    scheduler = scheduler_lib.Scheduler(engine, engine.place_params(params))
    runs.append(scheduler_lib.decode_prompts(scheduler, prompts, max_new_tokens=3))
    if engine is chunked:
      assert scheduler.stats.prefill_calls == sum(-(-len(p) // CHUNK) for p in prompts)
      if scheduler.pages is not None:
        assert scheduler.pages.used == 0
  assert runs[0] == runs[1]
  assert all(len(ids) == 3 for ids in runs[0])


@pytest.mark.parametrize("pieces, rounds", [(1, 4), (2, 3), (4, 2)])
def test_running_requests_keep_decoding_while_a_long_prompt_prefills(pieces, rounds):
  """A short request decoding when a 4-piece prompt arrives gets a new token in every scheduler round while the
  long prompt is prefilled: its first piece when admitted, then at most `max_prefills_per_step` chunks per round;
  the long one then decodes alongside it."""
  kw, _, params = _model_and_params("tests/tiny-llama")
  engine = engine_lib.Engine(mtu.config_of(**kw), num_slots=2, max_prefill_length=CHUNK, max_cache_length=CONTEXT)
  scheduler = scheduler_lib.Scheduler(engine, engine.place_params(params), max_prefills_per_step=pieces)
  short = scheduler.submit(request_lib.Request([3, 4, 5], 20))
  scheduler.step()
  before = len(short.output_ids)
  long = scheduler.submit(request_lib.Request(list(range(1, 33)), 4))  # 32 tokens: 8 + three more chunks
  produced = []
  while not long.output_ids:
    scheduler.step()
    produced.append(len(short.output_ids))
  assert len(produced) == rounds  # one round admits the long prompt (its first piece), the rest extend it
  assert np.all(np.diff([before] + produced) == 1), produced  # the short request never waited
  scheduler.run_until_idle()
  assert len(long.output_ids) == 4 and len(short.output_ids) == 20


def test_echo_is_limited_to_one_prefill():
  kw, _, params = _model_and_params("tests/tiny-llama")
  engine = engine_lib.Engine(mtu.config_of(**kw), num_slots=2, max_prefill_length=CHUNK, max_cache_length=CONTEXT)
  scheduler = scheduler_lib.Scheduler(engine, engine.place_params(params))
  with pytest.raises(ValueError, match="echo: prompt logprobs cover prompts of up to 8 tokens"):
    scheduler.submit(request_lib.Request([1] * 9, 0, echo=True))
  with pytest.raises(ValueError, match="does not fit the context of 48 tokens"):
    scheduler.submit(request_lib.Request([1] * 47, 2))
