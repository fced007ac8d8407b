"""Helpers for model tests: configs by keyword, and models filled with numpy-random params.

Filling params from numpy avoids compiling jax's RNG for every test model (seconds per param shape on a small CPU),
and seeding by parameter path gives every config with the same parameter tree the same values.
"""

import functools
import pathlib
import zlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

from MaxText import checkpointing, pyconfig
from MaxText.layers import model_creation, scan_layout

BASE = str(pyconfig.CONFIGS_DIR / "base.yml")


def make_config(model_name="tests/tiny-llama", **kw):
  return pyconfig.initialize(["", BASE], model_name=model_name, run_name="test", **kw)


@functools.lru_cache(maxsize=None)
def _cached_config(items):
  return make_config(**dict(items))


def config_of(**kw):
  """make_config, cached (pyconfig.initialize is not free and tests ask for the same configs repeatedly)."""
  return _cached_config(tuple(sorted(kw.items())))


def _random_value(path, shape, dtype):
  rng = np.random.default_rng(zlib.crc32("/".join(map(str, path)).encode()))
  if path[-1] == "scale":  # norm scales: non-trivial, around 1
    value = 1.0 + 0.2 * rng.standard_normal(shape)
  elif path[-1] == "embedding":
    value = rng.standard_normal(shape)
  else:  # kernels [in..., (layers,) out...]: roughly unit-variance outputs
    value = rng.standard_normal(shape) / np.sqrt(shape[0])
  return value.astype(dtype)


def build(**kw) -> nnx.Module:
  """A model for config_of(**kw) with numpy_params; no jax RNG is compiled."""
  config = config_of(**kw)
  model = model_creation.abstract_model(config)
  scanned_kw = dict(kw, scan_layers=True)
  abstract = nnx.state(model_creation.abstract_model(config_of(**scanned_kw)), nnx.Param)
  flat = [
      (path, var.replace(_random_value(path, var.get_value().shape, var.get_value().dtype)))
      for path, var in abstract.flat_state()
  ]
  params = nnx.State.from_flat_path(flat)
  if not config.scan_layers:
    params = scan_layout.scanned_to_unscanned(params, config.param_scan_axis)
  nnx.update(model, params)
  if getattr(model, "dropout_rngs", None) is not None:
    model.dropout_rngs = nnx.Rngs(dropout=config.init_weights_seed)
  return model


B, S = 2, 24


def inputs(seed=0, packed=False):
  tokens = np.random.default_rng(seed).integers(0, 256, (B, S)).astype(np.int32)
  if not packed:
    return tokens, np.broadcast_to(np.arange(S, dtype=np.int32), (B, S)).copy(), None
  # Row 0: segments of 9 and 11 tokens then 4 padding; row 1: one full segment.
  segments = np.array([[1] * 9 + [2] * 11 + [0] * 4, [1] * S], np.int32)
  positions = np.array([list(range(9)) + list(range(11)) + list(range(4)), list(range(S))], np.int32)
  return tokens, positions, segments


@nnx.jit(static_argnames=("deterministic",))
def forward(model, tokens, positions, segment_ids, deterministic=True):
  return model(tokens, positions, segment_ids, deterministic=deterministic)


def loss_fn(model, tokens, positions, segment_ids):
  logits = model(tokens, positions, segment_ids)
  targets = jnp.roll(tokens, -1, axis=1)
  logp = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1)), logits


_loss_logits_grad = nnx.jit(nnx.value_and_grad(loss_fn, has_aux=True))


def loss_and_grad(model, tokens, positions, segment_ids):
  """(loss, grads); logits via loss_logits_and_grad. One compile per model config."""
  (loss, _), grads = _loss_logits_grad(model, tokens, positions, segment_ids)
  return loss, grads


def loss_logits_and_grad(model, tokens, positions, segment_ids):
  (loss, logits), grads = _loss_logits_grad(model, tokens, positions, segment_ids)
  return loss, logits, grads


# ---------------------------------------------------------------- converted Hugging Face checkpoints


def converted_config(out_dir: pathlib.Path, scanned: bool, **kw):
  """The config of a to_maxtext output directory: its model.yml, its params, in either layer layout."""
  kw = {"scan_layers": scanned, "load_parameters_path": str(out_dir / "params"), **kw}
  return pyconfig.initialize(["", str(out_dir / "model.yml")], run_name="test", log_config=False, **kw)


def load_flat_params(config, path) -> dict:
  """A params checkpoint as {path tuple: numpy array}, restored into config's layer layout on one device."""
  abstract = nnx.state(model_creation.abstract_model(config), nnx.Param).to_pure_dict()
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  params = checkpointing.load_params(
      str(path), abstract, jax.tree.map(lambda _: device, abstract), config.param_scan_axis
  )
  return traverse_util.flatten_dict(jax.tree.map(np.asarray, params))


def hf_reference(hf_model, vocab_size: int, seq: int) -> tuple[np.ndarray, np.ndarray]:
  """(tokens [2, seq] int32, the transformers model's logits on them): the reference of a parity test."""
  import torch  # pylint: disable=import-outside-toplevel

  tokens = np.random.default_rng(0).integers(0, vocab_size, (2, seq)).astype(np.int32)
  with torch.no_grad():
    return tokens, hf_model(torch.from_numpy(tokens.astype(np.int64))).logits.numpy()
