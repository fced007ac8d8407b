"""Quantization: int8/fp8 matmul error bounds, straight-through gradients, int8 decode vs f32, quantized checkpoints."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from MaxText import checkpointing, pyconfig, train
from MaxText.config_schema import ConfigError
from MaxText.inference import engine as engine_lib
from MaxText.inference import loading
from MaxText.layers import quantization
from MaxText.layers.quantization import QuantSpec
from MaxText.tests import model_test_utils as mtu

KL_LIMIT = 0.05  # the bound on per-token KL(f32 || int8) of decode logits


def _operands(seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((3, 5, 64)).astype(np.float32)
  x[0, 1] *= 20.0  # one loud token: per-token scales keep it from costing the others precision
  w = (rng.standard_normal((64, 4, 8)) / 8.0).astype(np.float32)
  # Each row's absmax is a positive value: it lands on the +127.5 tie, which rounds to 127 either way, so the
  # reference below does not depend on how float division resolves the tie.
  x[..., 0] = 1.1 * np.abs(x).max(axis=2)
  w[0] = 1.1 * np.abs(w).max(axis=0)
  return x, w


def _fake_quant_int8(a: np.ndarray, reduce_axes: tuple[int, ...]) -> np.ndarray:
  """Reference symmetric int8 quantize-dequantize, one scale per index of the other axes.

  The scale maps absmax to 127.5 and values round into int8's full [-128, 127] (qwix's convention: every value,
  the extremes included, is within half a step of its bucket).
  """
  scale = np.abs(a).max(axis=reduce_axes, keepdims=True) / 127.5
  return np.clip(np.round(a / scale), -128, 127) * scale


def _ref_dot(x, w):
  return np.einsum("bsk,khd->bshd", x.astype(np.float64), w.astype(np.float64))


def test_int8_matmul_within_rounding_bound():
  """int8 (per-token x, per-channel w) vs the f64 product: each output within the worst case of half-step rounding
  of every term, and int8w (weights only) within its own, smaller bound."""
  x, w = _operands()
  exact = _ref_dot(x, w)
  dx = np.abs(x).max(axis=2, keepdims=True) / 255.0  # half a quantization step, per token
  dw = np.abs(w).max(axis=0, keepdims=True) / 254.0  # per output channel
  bound = (
      np.einsum("bsk,khd->bshd", np.abs(x), np.broadcast_to(dw, w.shape))
      + np.einsum("bsk,khd->bshd", np.broadcast_to(dx, x.shape), np.abs(w))
      + np.einsum("bsk,khd->bshd", np.broadcast_to(dx, x.shape), np.broadcast_to(dw, w.shape))
  )
  got = np.asarray(quantization.quantized_dot(jnp.asarray(x), jnp.asarray(w), 1, QuantSpec("int8")))
  assert np.all(np.abs(got - exact) <= bound * 1.001 + 1e-5)
  assert np.abs(got - exact).max() > 0  # really quantized
  got_w = np.asarray(quantization.quantized_dot(jnp.asarray(x), jnp.asarray(w), 1, QuantSpec("int8w")))
  bound_w = np.einsum("bsk,khd->bshd", np.abs(x), np.broadcast_to(dw, w.shape))
  assert np.all(np.abs(got_w - exact) <= bound_w * 1.001 + 1e-5)


def test_fp8_matmul_relative_error():
  """e4m3 keeps 3 mantissa bits (relative rounding <= 2^-4 per operand): the product's relative error stays small."""
  x, w = _operands(1)
  x[0, 1] /= 20.0  # per-tensor scaling: keep the range moderate, as fp8 training does with normalized activations
  exact = _ref_dot(x, w)
  got = np.asarray(quantization.quantized_dot(jnp.asarray(x), jnp.asarray(w), 1, QuantSpec("fp8")))
  rel = np.linalg.norm(got - exact) / np.linalg.norm(exact)
  assert 0 < rel < 0.05


@pytest.mark.parametrize("mode", ["int8", "int8w"])
def test_straight_through_gradient_is_float_gradient_of_dequantized_op(mode):
  x, w = _operands(2)
  cot = np.random.default_rng(3).standard_normal((3, 5, 4, 8)).astype(np.float32)
  xq = _fake_quant_int8(x, (2,)) if mode == "int8" else x
  wq = _fake_quant_int8(w, (0,))
  loss = lambda a, b: jnp.sum(jnp.einsum("bsk,khd->bshd", a, b) * cot)  # pylint: disable=unnecessary-lambda-assignment
  want_x, want_w = jax.grad(loss, argnums=(0, 1))(jnp.asarray(xq), jnp.asarray(wq))
  spec = QuantSpec(mode)
  got_x, got_w = jax.grad(lambda a, b: jnp.sum(quantization.quantized_dot(a, b, 1, spec) * cot), argnums=(0, 1))(
      jnp.asarray(x), jnp.asarray(w)
  )
  np.testing.assert_allclose(got_x, want_x, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got_w, want_w, rtol=1e-5, atol=1e-4)


def test_fp8_gradient_is_e5m2_rounded_straight_through():
  """fp8: gradients flow straight through (close to the float gradient of the e4m3-dequantized op) and are finite."""
  x, w = _operands(4)
  x[0, 1] /= 20.0
  cot = np.random.default_rng(5).standard_normal((3, 5, 4, 8)).astype(np.float32)
  spec = QuantSpec("fp8")
  got_x, got_w = jax.grad(lambda a, b: jnp.sum(quantization.quantized_dot(a, b, 1, spec) * cot), argnums=(0, 1))(
      jnp.asarray(x), jnp.asarray(w)
  )
  want_x, want_w = jax.grad(lambda a, b: jnp.sum(jnp.einsum("bsk,khd->bshd", a, b) * cot), argnums=(0, 1))(x, w)
  for got, want in ((got_x, want_x), (got_w, want_w)):
    assert np.all(np.isfinite(got))
    assert 0 < np.linalg.norm(got - want) / np.linalg.norm(want) < 0.15  # e5m2: 2 mantissa bits on the gradient


def test_bad_combinations_name_the_key():
  with pytest.raises(ConfigError, match="checkpoint_is_quantized"):
    quantization.spec_from_config(mtu.config_of(checkpoint_is_quantized=True))
  with pytest.raises(ConfigError, match="save_quantized_params_path.*fp8"):
    quantization.spec_from_config(mtu.config_of(quantization="fp8", save_quantized_params_path="/tmp/x"))
  with pytest.raises(ConfigError, match="quantization"):
    mtu.config_of(quantization="int4")
  with pytest.raises(ConfigError, match="checkpoint_is_quantized: a decode key"):
    train.train(mtu.config_of(quantization="int8", checkpoint_is_quantized=True))


# ---------------------------------------------------------------- decode


SEQ, PROMPT = 24, 16


def _kl(p_logits: np.ndarray, q_logits: np.ndarray) -> np.ndarray:
  """Per-token KL(p || q) of softmax distributions over the last axis."""
  lp = jax.nn.log_softmax(jnp.asarray(p_logits, jnp.float32), axis=-1)
  lq = jax.nn.log_softmax(jnp.asarray(q_logits, jnp.float32), axis=-1)
  return np.asarray(jnp.sum(jnp.exp(lp) * (lp - lq), axis=-1))


@pytest.fixture(scope="module", name="float_model")
def _float_model():
  return mtu.build()


def _tokens():
  return np.random.default_rng(0).integers(0, 256, (2, SEQ)).astype(np.int32)


def _engine_logits(engine, params, toks):
  """Prefill PROMPT tokens per row, then feed the true next tokens: logits at positions PROMPT-1 .. SEQ-2."""
  state = engine.init_decode_state()
  first = []
  for row in range(toks.shape[0]):
    prefix = engine.prefill(params, toks[row, :PROMPT], PROMPT)
    first.append(np.asarray(prefix["logits"][0]))
    state = engine.insert(prefix, state, row)
  out = [np.stack(first)]
  for t in range(PROMPT, SEQ - 1):
    state["tokens"] = jnp.asarray(toks[:, t])
    state, _, logits = engine.generate_with_logits(params, state)
    out.append(np.asarray(logits))
  return np.stack(out, axis=1)  # [rows, steps, vocab]


@pytest.mark.parametrize("mode", ["int8", "int8w"])
def test_int8_decode_logits_close_to_f32(float_model, mode):
  """Quantized-checkpoint decode (int8 kernels + scales, int8 KV cache) vs the f32 model's full forward."""
  toks = _tokens()
  positions = np.broadcast_to(np.arange(SEQ, dtype=np.int32), toks.shape)
  reference = np.asarray(mtu.forward(float_model, toks, positions, None))[:, PROMPT - 1 : SEQ - 1]
  config = mtu.config_of(quantization=mode, checkpoint_is_quantized=True, quantize_kvcache=True)
  engine = engine_lib.Engine(config, num_slots=2)
  float_params = engine_lib.unrolled_params(nnx.state(float_model, nnx.Param).to_pure_dict(), config.param_scan_axis)
  params = engine.place_params(quantization.quantize_params(float_params, engine.abstract_params))
  assert params["decoder"]["layers"][0]["mlp"]["wo"]["kernel"].dtype == jnp.int8
  kl = _kl(reference, _engine_logits(engine, params, toks))
  print(f"\n{mode} decode vs f32: per-token KL mean {kl.mean():.2e}, max {kl.max():.2e}")
  assert kl.max() < KL_LIMIT
  assert kl.max() > 0  # the int8 path really ran


def _dir_bytes(path: pathlib.Path) -> int:
  return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# Wider than tiny-llama so kernel bytes, not Orbax's per-file and per-shard metadata, dominate the checkpoint size.
WIDE = dict(base_emb_dim=256, base_mlp_dim=1024, head_dim=64)


def test_quantized_checkpoint_round_trip(tmp_path):
  """float params checkpoint -> save_quantized_params_path -> checkpoint_is_quantized load: the same int8 params, the
  same decode logits, and a smaller checkpoint."""
  float_dir, quant_dir = tmp_path / "float", tmp_path / "int8"
  checkpointing.save_params(str(float_dir), nnx.state(mtu.build(**WIDE), nnx.Param).to_pure_dict())
  save_cfg = mtu.config_of(
      quantization="int8", load_parameters_path=str(float_dir), save_quantized_params_path=str(quant_dir), **WIDE
  )
  engine = engine_lib.Engine(save_cfg, num_slots=2)
  saved = loading.load_params(save_cfg, engine.abstract_params, engine.param_shardings)
  load_cfg = mtu.config_of(quantization="int8", load_parameters_path=str(quant_dir), checkpoint_is_quantized=True, **WIDE)
  loaded = loading.load_params(load_cfg, engine.abstract_params, engine.param_shardings)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), saved, loaded)
  toks = _tokens()
  np.testing.assert_array_equal(_engine_logits(engine, saved, toks), _engine_logits(engine, loaded, toks))
  float_bytes, quant_bytes = _dir_bytes(float_dir), _dir_bytes(quant_dir)
  print(f"\ncheckpoint bytes: f32 {float_bytes}, int8 {quant_bytes} ({quant_bytes / float_bytes:.2f}x)")
  assert quant_bytes < 0.5 * float_bytes  # int8 kernels are a quarter of f32's; embedding and head stay f32
  # A float checkpoint under checkpoint_is_quantized fails naming the key and the missing scales.
  wrong = mtu.config_of(quantization="int8", load_parameters_path=str(float_dir), checkpoint_is_quantized=True, **WIDE)
  with pytest.raises(ConfigError, match="load_parameters_path.*kernel_scale"):
    loading.load_params(wrong, engine.abstract_params, engine.param_shardings)


# ---------------------------------------------------------------- training


def _train_losses(tmp_path, quant: str) -> np.ndarray:
  config = pyconfig.initialize(
      ["", mtu.BASE],
      model_name="tests/tiny-llama",
      run_name=f"q{quant or 'f32'}",
      base_output_directory=str(tmp_path),
      dataset_type="synthetic",
      steps=3,
      per_device_batch_size=1,
      learning_rate=3e-3,
      warmup_steps_fraction=0.0,
      enable_checkpointing=False,
      enable_tensorboard=False,
      log_config=False,
      quantization=quant,
  )
  return np.array([h["learning/loss"] for h in train.train(config)])


def test_fp8_train_steps_track_f32(tmp_path):
  """fp8 train steps (emulated on CPU: e4m3 forward, e5m2 gradients) trace, run and stay near f32's losses.

  int8 training is checked over 200 steps against bf16 by end_to_end/cpu/int8_train_tracks_bf16.sh.
  """
  reference = _train_losses(tmp_path, "")
  got = _train_losses(tmp_path, "fp8")
  assert np.all(np.isfinite(got))
  np.testing.assert_allclose(got, reference, rtol=0.02)
