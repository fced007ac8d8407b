"""Paged KV cache: logits equal the contiguous cache's and the full forward (MLA's latent cache included), page
bookkeeping, Pallas kernel conventions, config errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.experimental.pallas import tpu as pltpu

from MaxText.config_schema import ConfigError
from MaxText.inference import engine as engine_lib
from MaxText.inference import page_manager
from MaxText.inference import scheduler as scheduler_lib
from MaxText.layers.attentions import attention_mask, dot_product_attention
from MaxText.layers.cache import paged as paged_attention
from MaxText.tests import model_test_utils as mtu

SEQ = 28
PAGED = {"attention": "paged", "pagedattn_num_pages": 24, "pagedattn_tokens_per_page": 4}


def _model_kw(model_name, quantize_kvcache):
  return {"model_name": model_name, "decode_sampling_strategy": "greedy", "quantize_kvcache": quantize_kvcache}


@functools.cache
def contiguous_engine(model_name, quantize_kvcache=False):
  """The contiguous-cache reference engine, its params and model, built once per model and worker: every paged
  kernel's test compares against it, so its compiled steps are shared."""
  kw = _model_kw(model_name, quantize_kvcache)
  model = mtu.build(**kw)
  engine = engine_lib.Engine(mtu.config_of(**kw), num_slots=3)
  return engine, engine.place_params(nnx.state(model, nnx.Param).to_pure_dict()), model


def engines(model_name, kernel="auto", quantize_kvcache=False):
  """The shared contiguous reference engine and a paged engine with `kernel`, for the same model and params."""
  contiguous, params, model = contiguous_engine(model_name, quantize_kvcache)
  kw = _model_kw(model_name, quantize_kvcache)
  paged = engine_lib.Engine(mtu.config_of(**kw, **PAGED, paged_attention_kernel=kernel), num_slots=3)
  return contiguous, paged, params, model


def decode_prompts(engine, params, prompts, **kw):
  scheduler = scheduler_lib.Scheduler(engine, params, max_prefills_per_step=engine.dims.num_slots)
  return scheduler_lib.decode_prompts(scheduler, prompts, **kw)


def assert_mirror_holds_the_pages(engine, state, lengths):
  """kernel mirror: each layer's contiguous copy equals its pages gathered through the table, token for token over
  every slot's prompt, `lengths` (the pages hold the prompts, what prefix caching reads; decode tokens go to the
  copy only)."""
  cache = jax.tree.map(np.asarray, state["cache"])
  checked = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(cache)[0]:
    name = jax.tree_util.keystr(path)
    if not name.endswith("_rows']"):
      continue
    layer = cache
    for entry in path[:-1]:
      layer = layer[entry.key]
    stored = name.split("'")[-2][: -len("_rows")]
    gathered = np.asarray(paged_attention.gather_pages(layer[f"{stored}_pages"], layer["page_table"]))
    for slot, n in lengths.items():
      np.testing.assert_array_equal(leaf[slot, :, :n], gathered[slot, :, :n])
      checked += 1
  assert checked and engine.page_spec.kernel == "mirror"


@pytest.mark.parametrize(
    "model_name, kernel",
    [
        ("tests/tiny-llama", "jax"),
        ("tests/tiny-llama", "mirror"),
        ("tests/tiny-gemma3", "jax"),
        ("tests/tiny-gemma3", "mirror"),
        ("tests/tiny-deepseek2", "jax"),
        ("tests/tiny-deepseek2", "mirror"),
    ],
)
def test_paged_logits_equal_contiguous(model_name, kernel):
  """Three slots whose pages interleave (each grows a page at a time), teacher-forced; then slot 0 is released and
  refilled with a new prompt that reuses freed pages while the others go on. Both caches give the full forward's
  logits (f32). Gemma 3: sliding-window local layers (window 8 < sequence) and global layers; DeepSeek V2: MLA's
  keys-only latent cache, contiguous and paged. Both decode kernels: jax (gathers the pages) and mirror (reads a
  contiguous copy kept beside them, which must equal the pages)."""
  contiguous, paged, params, model = engines(model_name, kernel)
  toks = np.random.default_rng(0).integers(0, contiguous.config.vocab_size, (4, SEQ)).astype(np.int32)
  full = np.asarray(mtu.forward(model, toks, np.broadcast_to(np.arange(SEQ, dtype=np.int32), toks.shape), None))
  spec = paged.page_spec
  pages = page_manager.PageManager(spec.num_pages, spec.tokens_per_page, spec.max_pages_per_slot, 3)
  c_state, p_state = contiguous.init_decode_state(), paged.init_decode_state()
  lengths, prompts = {}, {}  # slot: (row, tokens so far); slot: prompt length

  def start(slot, row, n):
    padded = np.zeros((contiguous.dims.max_prefill_length,), np.int32)
    padded[:n] = toks[row, :n]
    nonlocal c_state, p_state
    prefix = contiguous.prefill(params, padded, n)
    c_state = contiguous.insert(prefix, c_state, slot)
    pages.release(slot)
    pages.ensure(slot, n)
    p_state = paged.set_page_table(p_state, pages.table)
    p_prefix = paged.prefill(params, padded, n)
    np.testing.assert_array_equal(p_prefix["logits"], prefix["logits"])
    p_state = paged.insert(p_prefix, p_state, slot)
    lengths[slot] = (row, n)
    prompts[slot] = n

  for slot, n in enumerate((3, 9, 16)):
    start(slot, slot, n)
  for t in range(10):
    if t == 5:
      start(0, 3, 6)  # slot 0 leaves; a new prompt takes its slot and freed pages
    feed, expected = np.zeros((3,), np.int32), np.zeros((3, full.shape[-1]), np.float32)
    for slot, (row, n) in lengths.items():
      pages.ensure(slot, n + 1)
      feed[slot], expected[slot] = toks[row, n], full[row, n]
      lengths[slot] = (row, n + 1)
    p_state = paged.set_page_table(p_state, pages.table)
    c_state["tokens"], p_state["tokens"] = jnp.asarray(feed), jnp.asarray(feed)
    c_state, _, c_logits = contiguous.generate_with_logits(params, c_state)
    p_state, _, p_logits = paged.generate_with_logits(params, p_state)
    np.testing.assert_allclose(np.asarray(p_logits), np.asarray(c_logits), atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.asarray(c_logits), expected, atol=1e-4, rtol=0)
  if kernel == "mirror":
    assert_mirror_holds_the_pages(paged, p_state, prompts)
  held = pages.table[pages.table > 0]
  assert len(set(held.tolist())) == held.size  # no page is shared by two slots
  assert not np.all(np.diff(pages.table[1, : pages.held(1)]) == 1)  # slot 1's pages are not one contiguous run
  # The Scheduler (decode CLI, API, server) allocates and frees pages itself: 5 prompts through 3 slots.
  prompts = [toks[i % 4, : 3 + 3 * i].tolist() for i in range(5)]
  assert decode_prompts(paged, params, prompts, max_new_tokens=9) == decode_prompts(
      contiguous, params, prompts, max_new_tokens=9
  )


@pytest.mark.parametrize(
    "model_name, kernel", [("tests/tiny-llama", "jax"), ("tests/tiny-llama", "mirror"), ("tests/tiny-deepseek2", "jax")]
)
def test_int8_pages_equal_the_int8_contiguous_cache(model_name, kernel):
  """quantize_kvcache with pages (MLA's latent pages included): int8 pages with float32 scale pages, quantized as
  the contiguous int8 cache quantizes, so both give the same logits and greedy tokens (5 prompts, 3 slots); with
  the mirror kernel its int8 copy equals the pages."""
  contiguous, paged, params, _ = engines(model_name, kernel, quantize_kvcache=True)
  stored = jax.tree.leaves_with_path(paged.init_decode_state()["cache"])
  pages = {jax.tree_util.keystr(path).split("'")[-2]: leaf.dtype for path, leaf in stored}
  assert pages["key_pages"] == jnp.int8 and pages["key_scale_pages"] == jnp.float32
  toks = np.random.default_rng(1).integers(0, contiguous.config.vocab_size, (5, SEQ))
  prompts = [toks[i, : 3 + 3 * i].tolist() for i in range(5)]
  assert decode_prompts(paged, params, prompts, max_new_tokens=9) == decode_prompts(
      contiguous, params, prompts, max_new_tokens=9
  )
  # Teacher-forced: one slot, the same tokens through both caches, logits compared at every step.
  states = {}
  for name, engine in (("contiguous", contiguous), ("paged", paged)):
    manager = (
        page_manager.PageManager(PAGED["pagedattn_num_pages"], 4, engine.page_spec.max_pages_per_slot, 3)
        if engine.page_spec
        else None
    )
    state = engine.init_decode_state()
    if manager:
      manager.ensure(0, SEQ)
      state = engine.set_page_table(state, manager.table)
    padded = np.zeros((engine.dims.max_prefill_length,), np.int32)
    padded[:5] = toks[0, :5]
    state = engine.insert(engine.prefill(params, padded, 5), state, 0)
    logits = []
    for t in range(5, 12):
      state["tokens"] = jnp.asarray([toks[0, t], 0, 0], jnp.int32)
      state, _, step = engine.generate_with_logits(params, state)
      logits.append(np.asarray(step)[0])
    states[name] = np.stack(logits)
    if manager and kernel == "mirror":
      assert_mirror_holds_the_pages(engine, state, {0: 5})
  np.testing.assert_allclose(states["paged"], states["contiguous"], atol=1e-4, rtol=0)


def test_page_manager_allocates_reserves_and_frees():
  pages = page_manager.PageManager(num_pages=6, tokens_per_page=4, max_pages_per_slot=3, num_slots=2)
  assert pages.capacity == 5 and pages.used == 0
  pages.ensure(0, 5)  # 2 pages
  assert pages.held(0) == 2 and page_manager.NULL_PAGE not in pages.table[0, :2]
  assert pages.table[0, 2] == page_manager.NULL_PAGE
  assert pages.can_reserve(12) and not pages.can_reserve(13)  # 3 pages per slot at most
  pages.reserve(1, 12)  # books 3 of the 3 free pages
  assert pages.available == 0 and not pages.can_reserve(1)
  with pytest.raises(ValueError, match="out of KV pages"):
    pages.ensure(0, 9)  # slot 0 may not take pages slot 1 booked
  pages.ensure(1, 12)
  assert pages.used == 5
  pages.release(0)
  assert pages.used == 3 and pages.held(0) == 0 and not pages.table[0].any()
  pages.ensure(0, 8)
  assert sorted(pages.table[pages.table > 0].tolist()) == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("soft_cap", [0.0, 5.0])
def test_pallas_kernel_conventions_match_gathered_attention(soft_cap):
  """The Pallas GPU kernel (Pallas' interpreter on CPU) with our layout, scaling and soft cap equals the portable
  gather path, on scattered pages and ragged lengths."""
  rng = np.random.default_rng(0)
  heads, kv_heads, dim, num_pages, per_page, batch, per_slot = 4, 2, 16, 14, 4, 3, 4
  k_pages = jnp.asarray(rng.standard_normal((kv_heads, num_pages, per_page, dim)), jnp.float32)
  v_pages = jnp.asarray(rng.standard_normal((kv_heads, num_pages, per_page, dim)), jnp.float32)
  table = jnp.asarray(rng.permutation(np.arange(1, num_pages))[: batch * per_slot].reshape(batch, per_slot))
  lengths = jnp.array([3, 9, 16], jnp.int32)
  query = jnp.asarray(rng.standard_normal((batch, heads, dim)), jnp.float32)
  scale = 0.3
  kernel = paged_attention.pallas_decode_attention(
      query, k_pages, v_pages, table, lengths, scale=scale, soft_cap=soft_cap, interpret=True
  )
  np.testing.assert_allclose(kernel, _gathered(query, k_pages, v_pages, table, lengths, scale, soft_cap), atol=1e-5)


def _gathered(query, k_pages, v_pages, table, lengths, scale, soft_cap):
  """The portable path's decode attention over each row's first lengths[b] paged tokens: [B, heads, D]."""
  batch, tokens = table.shape[0], table.shape[1] * k_pages.shape[2]
  index = jnp.broadcast_to(jnp.arange(tokens), (batch, tokens))
  filled = (index < lengths[:, None]).astype(jnp.int32)
  mask = attention_mask(jnp.ones((batch, 1), jnp.int32), filled, (lengths - 1)[:, None], index)
  keys, values = paged_attention.gather_pages(k_pages, table), paged_attention.gather_pages(v_pages, table)
  return dot_product_attention(
      query[:, None], keys, values, mask, scale=scale, attn_logits_soft_cap=soft_cap, kv_heads_first=True
  )[:, 0]


@pytest.mark.parametrize("soft_cap", [0.0, 5.0])
def test_tpu_pallas_kernel_matches_gathered_attention(soft_cap):
  """The Pallas TPU kernel (interpreted on CPU) on scattered pages and ragged lengths equals the gather path. It reads
  keys/values as bfloat16, so they are drawn bfloat16-exact here and only the arithmetic is compared."""
  rng = np.random.default_rng(1)
  heads, kv_heads, dim, num_pages, per_page, batch, per_slot = 4, 2, 128, 14, 8, 3, 4
  draw = lambda shape: jnp.asarray(rng.standard_normal(shape), jnp.bfloat16).astype(jnp.float32)
  k_pages, v_pages = draw((kv_heads, num_pages, per_page, dim)), draw((kv_heads, num_pages, per_page, dim))
  table = jnp.asarray(rng.permutation(np.arange(1, num_pages))[: batch * per_slot].reshape(batch, per_slot), jnp.int32)
  lengths = jnp.array([3, 9, 32], jnp.int32)
  query = jnp.asarray(rng.standard_normal((batch, heads, dim)), jnp.float32)
  scale = 0.1
  with pltpu.force_tpu_interpret_mode():
    kernel = paged_attention.pallas_decode_attention(
        query, k_pages, v_pages, table, lengths, scale=scale, soft_cap=soft_cap, platform="tpu"
    )
  np.testing.assert_allclose(kernel, _gathered(query, k_pages, v_pages, table, lengths, scale, soft_cap), atol=2e-6)


def test_write_tokens_past_the_table_go_to_scratch_page():
  pages = jnp.zeros((1, 4, 2, 1))
  table = jnp.array([[2, 3]], jnp.int32)
  new = jnp.arange(1, 6, dtype=jnp.float32).reshape(1, 5, 1, 1)  # 5 tokens, the table holds 4
  out = np.asarray(paged_attention.write_tokens(pages, table, jnp.array([0]), new))[0, :, :, 0]
  np.testing.assert_array_equal(out[2:], [[1, 2], [3, 4]])
  assert out[1].sum() == 0 and out[0].sum() != 0  # page 1 untouched; token 5 went to page 0


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"paged_attention_kernel": "pallas"}, "paged_attention_kernel: pallas runs on GPU or TPU only"),
        ({"pagedattn_num_pages": 4}, "pagedattn_num_pages: 4 pages"),
        ({"pagedattn_max_pages_per_slot": 2}, "pagedattn_max_pages_per_slot: 2 pages of 4 tokens"),
    ],
)
def test_config_errors(overrides, match):
  with pytest.raises(ConfigError, match=match):  # when the config is built (MaxText/config/checks.py)
    config = mtu.config_of(model_name="tests/tiny-llama", **{**PAGED, **overrides})
    paged_attention.page_spec_from_config(config, config.max_target_length)


def test_auto_kernel_is_mirror_on_cpu_and_pallas_without_window_on_gpu():
  config = mtu.config_of(model_name="tests/tiny-llama", **PAGED)
  assert paged_attention.page_spec_from_config(config, 32).kernel == "mirror"
  assert paged_attention.page_spec_from_config(config, 32, backend="gpu").kernel == "pallas"
  int8 = mtu.config_of(model_name="tests/tiny-llama", **PAGED, quantize_kvcache=True)
  assert paged_attention.page_spec_from_config(int8, 32, backend="gpu").kernel == "jax"  # the kernels read floats
  # TPU's kernel reads keys/values as bfloat16: auto takes it for a bfloat16 cache only.
  assert paged_attention.page_spec_from_config(config, 32, backend="tpu").kernel == "jax"
  bf16 = mtu.config_of(model_name="tests/tiny-llama", dtype="bfloat16", **PAGED)
  assert paged_attention.page_spec_from_config(bf16, 32, backend="tpu") == paged_attention.PageSpec(
      24, 4, 8, "pallas", "tpu"
  )
  windowed = mtu.config_of(model_name="tests/tiny-mistral", **PAGED)
  assert paged_attention.page_spec_from_config(windowed, 32, backend="gpu").kernel == "jax"
  assert jax.default_backend() == "cpu"


@pytest.mark.parametrize(
    "kernel, quantize_kvcache",
    [("contiguous", False), ("contiguous", True), ("jax", False), ("mirror", False), ("mirror", True)],
)
def test_narrow_steps_equal_full_steps_and_leave_other_slots_alone(kernel, quantize_kvcache):
  """generate(rows=2) of 3 slots (what the scheduler steps when only low slots are occupied): the stepped slots get
  the tokens and cache entries a full step gives them, over several steps; slot 2's cache rows, length and token are
  left exactly as they were. The narrowed cache keeps its token-axis arrays whole (reads see rows [0, 2), writes land
  in them in place), so this covers both halves of that."""
  contiguous, paged, params, _ = engines(
      "tests/tiny-llama", "jax" if kernel == "contiguous" else kernel, quantize_kvcache
  )
  engine = contiguous if kernel == "contiguous" else paged
  toks = np.random.default_rng(2).integers(0, engine.config.vocab_size, (3, SEQ))
  state = engine.init_decode_state()
  if engine.page_spec:
    manager = page_manager.PageManager(PAGED["pagedattn_num_pages"], 4, engine.page_spec.max_pages_per_slot, 3)
    for slot in range(3):
      manager.ensure(slot, 16)
    state = engine.set_page_table(state, manager.table)
  for slot, n in enumerate((5, 9, 7)):
    padded = np.zeros((engine.dims.max_prefill_length,), np.int32)
    padded[:n] = toks[slot, :n]
    state = engine.insert(engine.prefill(params, padded, n), state, slot)
  before = jax.tree.map(np.asarray, state)
  narrow, full = jax.tree.map(jnp.asarray, before), jax.tree.map(jnp.asarray, before)
  for _ in range(4):
    narrow, narrow_tokens = engine.generate(params, narrow, rows=2)
    full, full_tokens = engine.generate(params, full)
    np.testing.assert_array_equal(np.asarray(narrow_tokens)[:2], np.asarray(full_tokens)[:2])
  after, stepped = jax.tree.map(np.asarray, narrow), jax.tree.map(np.asarray, full)
  np.testing.assert_array_equal(after["tokens"][2], before["tokens"][2])
  np.testing.assert_array_equal(after["positions"], np.append(stepped["positions"][:2], before["positions"][2]))
  checked = 0
  for (path, leaf), (_, was), (_, ref) in zip(
      *(jax.tree_util.tree_flatten_with_path(s["cache"])[0] for s in (after, before, stepped))
  ):
    if "pages" in jax.tree_util.keystr(path):  # shared by all slots: compared through the tokens above
      continue
    assert leaf.shape[0] == 3, jax.tree_util.keystr(path)  # unstacked layers: the slot axis leads
    np.testing.assert_array_equal(leaf[2], was[2])
    np.testing.assert_allclose(leaf[:2], ref[:2], atol=1e-6, rtol=0)
    checked += 1
  assert checked
