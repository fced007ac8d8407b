"""Prefix caching over the paged KV cache: page bookkeeping (sharing, reference counts, LRU eviction), logits of a
prompt computed over another prompt's cached pages equal the full forward, and decoding with the cache equals
decoding without it (float and int8 pages, under page pressure that forces evictions)."""

import numpy as np
import pytest
from flax import nnx

from MaxText.inference import engine as engine_lib
from MaxText.inference import page_manager
from MaxText.inference import request as request_lib
from MaxText.inference import scheduler as scheduler_lib
from MaxText.tests import model_test_utils as mtu

CHUNK, CONTEXT = 8, 48
PAGED = {"attention": "paged", "pagedattn_tokens_per_page": 4}


def test_page_manager_shares_counts_and_evicts_least_recently_used():
  pm = page_manager.PageManager(num_pages=9, tokens_per_page=2, max_pages_per_slot=4, num_slots=2)
  a = [1, 2, 3, 4, 5, 6, 7]
  pm.reserve(0, len(a) + 1)
  pm.ensure(0, len(a) + 1)
  pm.register(0, a)  # blocks [1, 2], [3, 4], [5, 6]; the 7 is not a full block
  assert pm.cached == 3 and pm.used == 4
  assert pm.match([1, 2, 3, 4, 9]) == list(pm.table[0, :2])  # a shared prefix of two blocks
  assert pm.match([1, 2, 3, 4]) == list(pm.table[0, :1])  # the last token is always computed
  assert pm.match([2, 2, 3, 4, 9]) == []  # a block is known only after the same blocks before it
  shared = pm.match([1, 2, 3, 4, 5, 6, 0])
  pm.share(1, shared)
  pm.reserve(1, 8)
  pm.ensure(1, 8)
  assert list(pm.table[1, :3]) == list(pm.table[0, :3]) and pm.table[1, 3] not in pm.table[0]
  pm.release(0)  # slot 1 still holds the shared pages
  assert pm.used == 4 and pm.cached == 3
  pm.release(1)  # now idle: cached, reusable, not used
  assert pm.used == 0 and pm.cached == 3 and pm.available == 8
  assert pm.match([1, 2, 3, 4, 5, 6, 0]) == shared
  # Taking every free page evicts idle cached pages, least recently used (the deepest block of the chain went idle
  # first here) first; an evicted block is no longer matched, nor are blocks after it.
  pm.reserve(0, 8)
  pm.ensure(0, 8)
  pm.reserve(1, 2 * 4)
  pm.ensure(1, 2 * 4)
  assert pm.available == 0 and pm.cached == 0
  assert pm.match([1, 2, 3, 4, 5, 6, 0]) == []


def _setup(**extra):
  kw = {"model_name": "tests/tiny-llama", "decode_sampling_strategy": "greedy", **PAGED, **extra}
  model = mtu.build(**{k: v for k, v in kw.items() if k not in PAGED and k != "quantize_kvcache"})
  return kw, model, nnx.state(model, nnx.Param).to_pure_dict()


def test_a_prompt_over_cached_pages_has_the_full_forward_logits():
  """Prompt B shares its first 8 tokens (two pages) with prompt A: gathered from A's pages and extended by B's
  other 13 tokens (a chunk and a padded piece), B's logits equal the full forward's, and so does decoding after it."""
  kw, model, params = _setup(pagedattn_num_pages=32)
  engine = engine_lib.Engine(mtu.config_of(**kw), num_slots=2, max_prefill_length=CHUNK, max_cache_length=CONTEXT)
  params = engine.place_params(params)
  rng = np.random.default_rng(3)
  a = rng.integers(1, 256, 12).astype(np.int32)
  b = np.concatenate([a[:8], rng.integers(1, 256, 17)]).astype(np.int32)
  full = np.asarray(mtu.forward(model, b[None], np.arange(len(b), dtype=np.int32)[None], None))
  spec = engine.page_spec
  pages = page_manager.PageManager(spec.num_pages, spec.tokens_per_page, spec.max_pages_per_slot, 2)
  pages.ensure(0, 12)
  pages.register(0, a.tolist())
  state = engine.set_page_table(engine.init_decode_state(), pages.table)
  padded = np.zeros((CHUNK,), np.int32)
  first = engine.prefill(params, a[:8], 8, cache_length=CONTEXT)
  state = engine.insert(engine.extend(params, first, a[8:12]), state, 0)  # A's pages hold its 12 tokens
  shared = pages.match(b[:21].tolist())
  assert len(shared) == 2
  pages.share(1, shared)
  pages.ensure(1, 21)
  state = engine.set_page_table(state, pages.table)
  prefix = engine.gather(state, pages.table[1], 8, cache_length=CONTEXT + CHUNK)
  prefix = engine.extend(params, prefix, b[8:16])
  padded[:5] = b[16:21]
  prefix = engine.extend(params, prefix, padded, 5)
  np.testing.assert_allclose(np.asarray(prefix.logits)[0], full[0, 20], atol=1e-4, rtol=0)
  state = engine.insert(prefix, state, 1)
  for t in range(21, len(b)):
    pages.ensure(1, t + 1)
    state = engine.set_page_table(state, pages.table)
    state["tokens"] = state["tokens"].at[1].set(b[t])
    state, _, logits = engine.generate_with_logits(params, state)
    np.testing.assert_allclose(np.asarray(logits)[1], full[0, t], atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "num_pages,extra",
    [(200, {}), (200, {"quantize_kvcache": True}), (40, {})],
    ids=["float", "int8", "evicting"],
)
def test_decoding_with_prefix_caching_equals_without(num_pages, extra):
  """Prompts that share a 12-token system prefix (two repeat earlier ones, whole or in part), long ones chunked,
  through 3 slots: greedy ids equal the scheduler's without prefix caching, and pages come back. With 40 pages the
  pool runs out and idle cached pages are evicted along the way."""
  kw, _, params = _setup(pagedattn_num_pages=num_pages, **extra)
  engine = engine_lib.Engine(mtu.config_of(**kw), num_slots=3, max_prefill_length=CHUNK, max_cache_length=CONTEXT)
  params = engine.place_params(params)
  rng = np.random.default_rng(4)
  system = rng.integers(1, 256, 12).tolist()
  prompts = [system + rng.integers(1, 256, n).tolist() for n in (3, 20, 9, 1, 30)]
  prompts += [prompts[1], rng.integers(1, 256, 14).tolist(), prompts[4][:25]]
  runs = []
  for caching in (False, True):
    scheduler = scheduler_lib.Scheduler(engine, params, prefix_caching=caching)
    runs.append(scheduler_lib.decode_prompts(scheduler, prompts, max_new_tokens=4))
    assert scheduler.pages.used == 0
  assert runs[1] == runs[0]
  hits = scheduler.pages.hit_tokens
  assert hits >= 3 * 12 if num_pages == 200 else hits > 0, hits  # prompts admitted together cannot share yet
  if num_pages == 200:  # one after another: each finds what the earlier ones left
    scheduler = scheduler_lib.Scheduler(engine, params, prefix_caching=True)
    expected = []
    for prompt, hit in ((prompts[0], 0), (prompts[2], 12), (prompts[1], 12), (prompts[1], 28), (prompts[6], 0)):
      expected.append(scheduler_lib.decode_prompts(scheduler, [prompt], max_new_tokens=4)[0])
      assert scheduler.pages.hit_tokens == hit, (len(prompt), scheduler.pages.hit_tokens)
      scheduler.pages.hit_tokens = 0
    assert expected == [runs[0][i] for i in (0, 2, 1, 1, 6)]


def test_after_warmup_nothing_compiles_with_chunks_and_cache_hits():
  """Warm-up compiles every path a request can take (short prefills, chunked prefills, cached starts): a mix of
  short, long and repeated prompts then runs without a single compile."""
  kw, _, params = _setup(pagedattn_num_pages=200)
  engine = engine_lib.Engine(mtu.config_of(**kw), num_slots=3, max_prefill_length=CHUNK, max_cache_length=CONTEXT)
  scheduler = scheduler_lib.Scheduler(engine, engine.place_params(params), prefix_caching=True)
  scheduler.warmup()
  rng = np.random.default_rng(5)
  prompts = [rng.integers(1, 256, n).tolist() for n in (3, 30, 17, 8, 44)]
  prompts += [prompts[1], prompts[4][:21] + [7], prompts[2] + [9, 9]]
  with scheduler_lib.CompileCounter() as serving:
    outputs = scheduler_lib.decode_prompts(scheduler, prompts, max_new_tokens=3)
  assert serving.count == 0
  assert scheduler.pages.hit_tokens > 0 and all(len(o) == 3 for o in outputs)


def test_a_slot_prefilling_over_shared_pages_never_writes_them():
  """A slot whose last occupant stopped at token 4 takes a prompt sharing 16 cached tokens and needs three rounds
  for the rest, while another request on the same pages decodes: the generate steps of those rounds step every
  slot, and must not write the shared pages at the stale position (the other request reads them). Every token and
  its logprob equal decoding without the cache."""
  kw, _, params = _setup(pagedattn_num_pages=100)
  engine = engine_lib.Engine(mtu.config_of(**kw), num_slots=2, max_prefill_length=CHUNK, max_cache_length=CONTEXT)
  params = engine.place_params(params)
  rng = np.random.default_rng(6)
  system = rng.integers(1, 256, 16).tolist()
  long_prompt = system + rng.integers(1, 256, 20).tolist()
  rounds = [[system + [5]], [[7, 8, 9]], [long_prompt, system + [3, 4]], [system + [6, 1]]]
  runs = []
  for caching in (False, True):
    scheduler = scheduler_lib.Scheduler(engine, params, prefix_caching=caching)
    outputs = []
    for prompts in rounds:  # slot 0: the cache's first request, then one ending at token 4, then the long prompt
      requests = [scheduler.submit(request_lib.Request(p, 6, logprobs=0)) for p in prompts]
      scheduler.run_until_idle()
      outputs += [(r.output_ids, [lp.logprob for lp in r.output_logprobs]) for r in requests]
    runs.append(outputs)
    if caching:
      assert scheduler.pages.hit_tokens == 3 * 16
  for (ids, logprobs), (want_ids, want_logprobs) in zip(runs[1], runs[0]):
    assert ids == want_ids
    np.testing.assert_allclose(logprobs, want_logprobs, atol=1e-4)
