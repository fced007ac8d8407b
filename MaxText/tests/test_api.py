"""Python API: load a params checkpoint, full-forward logits, generate on the decode engine."""

import jax
import numpy as np
import pytest
from flax import nnx

from MaxText import api, checkpointing
from MaxText.config_schema import ConfigError
from MaxText.tests import model_test_utils as mtu

KW = dict(model_name="tests/tiny-mistral", vocab_size=4096, scan_layers=False)  # window 8; the real tokenizer's vocab


@pytest.fixture(scope="module")
def params_dir(tmp_path_factory):
  """A params-only checkpoint of the numpy-random tiny model, saved in the scanned layout."""
  path = tmp_path_factory.mktemp("params") / "ckpt"
  model = mtu.build(**{**KW, "scan_layers": True})
  checkpointing.save_params(str(path), nnx.state(model, nnx.Param).to_pure_dict())
  return path


@pytest.fixture(scope="module")
def loaded(params_dir):
  """(api model loaded unscanned from the scanned checkpoint, the reference nnx model)."""
  model = api.load(mtu.BASE, load_parameters_path=str(params_dir), per_device_batch_size=0.5, **KW)
  return model, mtu.build(**KW)


def reference_greedy(reference, prompt, n, length=32):
  """Greedy by repeated full forward passes, padded to `length` (causal, so padding after is harmless)."""
  ids = list(prompt)
  positions = np.arange(length, dtype=np.int32)[None]
  for _ in range(n):
    toks = np.zeros((1, length), np.int32)
    toks[0, : len(ids)] = ids
    ids.append(int(np.argmax(np.asarray(mtu.forward(reference, toks, positions, None))[0, len(ids) - 1])))
  return ids[len(prompt) :]


def test_logits_are_the_full_forward(loaded):
  model, reference = loaded
  ids = np.random.default_rng(0).integers(0, 4096, (2, 20)).astype(np.int32)
  out = model.logits(ids)
  assert out.dtype == np.float32 and out.shape == (2, 20, 4096)
  expected = np.asarray(mtu.forward(reference, ids, np.broadcast_to(np.arange(20, dtype=np.int32), (2, 20)), None))
  np.testing.assert_allclose(out, expected, atol=1e-5)
  np.testing.assert_allclose(model.logits(ids[0]), out[0], atol=1e-6)


def test_greedy_generate_is_argmax_of_full_forward(loaded):
  model, reference = loaded
  prompts = [[2, 45, 1000, 7], [2, 900, 31, 31, 5, 77, 1200, 64, 8, 3000, 11]]
  out = model.generate(prompts, max_new_tokens=14, stop_on_eos=False)
  assert [len(o) for o in out] == [14, 14]
  for prompt, new in zip(prompts, out):
    assert new == reference_greedy(reference, prompt, 14)
  assert model.generate(prompts[1:], max_new_tokens=14, stop_on_eos=False) == out[1:]


def test_generate_grows_past_config_lengths(loaded):
  """Prompts longer than max_prefill_predict_length (16) and outputs past max_target_length (32) are fine."""
  model, _ = loaded
  prompt = list(np.random.default_rng(1).integers(0, 4096, 40))
  out = model.generate([prompt], max_new_tokens=30, stop_on_eos=False)[0]
  assert len(out) == 30
  np.testing.assert_array_equal(out[:3], np.argmax(model.logits([prompt + out[:2]])[0, -3:], -1))


def test_sampling_strategies_are_seeded(loaded):
  model, _ = loaded
  prompts = [[2, 45, 1000, 7]]
  for strategy, kw in [("topk", {"top_k": 5}), ("composite", {"top_k": 20, "top_p": 0.9, "temperature": 0.7})]:
    first = model.generate(prompts, max_new_tokens=10, strategy=strategy, seed=3, stop_on_eos=False, **kw)
    assert first == model.generate(prompts, max_new_tokens=10, strategy=strategy, seed=3, stop_on_eos=False, **kw)
  hot = dict(strategy="weighted", temperature=5.0, stop_on_eos=False, max_new_tokens=10)
  assert model.generate(prompts, seed=1, **hot) != model.generate(prompts, seed=2, **hot)


def test_stop_on_eos_and_tokenizer(loaded):
  model, _ = loaded
  assert model.tokenizer.decode(model.tokenizer.encode("The list type")) == "The list type"
  prompt = [model.tokenizer.bos_id] + model.tokenizer.encode("The list type")
  out = model.generate([prompt], max_new_tokens=12, stop_on_eos=False)[0]
  eos_id = model.tokenizer.eos_id
  stop_at = next((i for i, t in enumerate(out) if t != out[0]), 0)
  model.tokenizer.eos_id = out[stop_at]  # pretend the model's own choice is eos
  try:
    assert model.generate([prompt], max_new_tokens=12)[0] == out[: stop_at + 1]
  finally:
    model.tokenizer.eos_id = eos_id


def test_bad_input(loaded, tmp_path):
  model, _ = loaded
  with pytest.raises(ValueError, match="prompt 1 is empty"):
    model.generate([[1, 2], []])
  with pytest.raises(TypeError, match="list of token-id lists"):
    model.generate([1, 2, 3])
  with pytest.raises(ValueError, match="outside"):
    model.generate([[5000]])
  tiny_vocab = api.Model(
      mtu.config_of(**{**KW, "vocab_size": 256}),
      nnx.state(mtu.build(**{**KW, "vocab_size": 256}), nnx.Param).to_pure_dict(),
  )
  with pytest.raises(ValueError, match="stop_on_eos=False"):  # the 4096-token tokenizer does not fit vocab 256
    tiny_vocab.generate([[1, 2]])
  with pytest.raises(ConfigError, match="no checkpoint at"):
    api.load(mtu.BASE, load_parameters_path=str(tmp_path / "missing"), **KW)
  with pytest.raises(ConfigError, match="no checkpoint found for run"):
    api.load(mtu.BASE, base_output_directory=str(tmp_path), run_name="nothing", **KW)


def test_load_points_jax_at_jax_cache_dir(params_dir, tmp_path):
  """api.load(jax_cache_dir=...) creates the directory and makes it JAX's persistent compilation cache, as the
  entry points do (a second process then loads what the first compiled: test_decode.py)."""
  before = jax.config.jax_compilation_cache_dir
  try:
    api.load(mtu.BASE, load_parameters_path=str(params_dir), jax_cache_dir=str(tmp_path / "cache"), **KW)
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "cache") and (tmp_path / "cache").is_dir()
  finally:
    jax.config.update("jax_compilation_cache_dir", before)
