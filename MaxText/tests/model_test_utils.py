"""Helpers for model tests: configs by keyword, models filled with numpy-random params, and the registry's tiny
Hugging Face models converted to MaxText.

Filling params from numpy avoids compiling jax's RNG for every test model (seconds per param shape on a small CPU),
and seeding by parameter path gives every config with the same parameter tree the same values.
"""

import dataclasses
import functools
import json
import pathlib
import zlib
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

from MaxText import checkpointing, models, pyconfig
from MaxText.layers import model_creation, scan_layout
from MaxText.utils.ckpt_conversion import to_maxtext
from MaxText.utils.ckpt_conversion.safetensors_io import SafetensorsReader, SafetensorsWriter

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


# ---------------------------------------------------------------- the registry's tiny Hugging Face models

# Tokens of the reference logits: more than three times every tiny sliding window and attention chunk (8), so the
# masks that differ from plain causal attention are exercised (asserted per variant in `converted`).
REFERENCE_SEQ = 28


@dataclasses.dataclass(frozen=True)
class Variant:
  """One test model of the registry: a family (its decoder_block) and a key of its spec's tiny_hf_configs."""

  family: str
  name: str

  def __str__(self) -> str:
    return self.name

  def hf_config(self) -> dict:
    return models.tiny_hf_config(models.get(self.family), self.name)

  @property
  def tiny_yml(self) -> Optional[str]:
    """The model_name of configs/models/tests/tiny-<variant>.yml, the same model in MaxText's spelling, if any."""
    name = f"tests/tiny-{self.name}"
    return name if (pyconfig.CONFIGS_DIR / "models" / f"{name}.yml").is_file() else None


def registry_variants() -> list[Variant]:
  """Every test model of every family that converts: what the parity tests run over."""
  return [Variant(s.name, v) for s in models.FAMILIES.values() if s.converts for v in s.tiny_hf_configs]


def model_keys_of(variant: Variant) -> dict:
  """The MaxText model keys the converter derives from the variant's config.json."""
  return to_maxtext.model_keys(variant.hf_config())[1]


def fill_random(hf_model, norm_center: float):
  """Random weights with everything non-trivial: norm scales around `norm_center` (what the checkpoint stores, so 0
  where the model adds an offset of 1), biases != 0, and persistent bias buffers (routing biases such as DeepSeek
  V3's e_score_correction_bias) != 0."""
  import torch  # pylint: disable=import-outside-toplevel

  def leaf(name: str) -> str:
    return name.rsplit(".", 1)[-1]

  torch.manual_seed(0)
  saved = set(hf_model.state_dict())
  with torch.no_grad():
    for name, p in hf_model.named_parameters():
      if leaf(name) == "bias":
        p.copy_(0.1 * torch.randn_like(p))
      elif "norm" in name or ".ln_" in name:
        p.copy_(norm_center + 0.3 * torch.randn_like(p))
      else:
        p.copy_(0.2 * torch.randn_like(p))
    for name, b in hf_model.named_buffers():
      if name in saved and "bias" in leaf(name) and b.is_floating_point():
        b.copy_(0.1 * torch.randn_like(b))


def hf_model_of(variant: Variant):
  """The variant's float32 transformers model (eager attention: the reference masks) with fill_random weights."""
  import transformers  # pylint: disable=import-outside-toplevel

  fields = variant.hf_config()
  hf_config = transformers.AutoConfig.for_model(fields.pop("model_type"), **fields)
  model = transformers.AutoModelForCausalLM.from_config(hf_config, attn_implementation="eager").float()
  fill_random(model, norm_center=1.0 - model_keys_of(variant)["normalization_scale_offset"])
  return model.eval()


@dataclasses.dataclass
class Converted:
  """A variant's transformers model, its save_pretrained checkpoint and reference logits, and the checkpoint
  converted with to_maxtext in both layer layouts."""

  variant: Variant
  root: pathlib.Path
  hf: Any  # the transformers model
  tokens: np.ndarray  # [2, REFERENCE_SEQ]
  hf_logits: np.ndarray
  _api_model: Any = None

  @property
  def hf_dir(self) -> pathlib.Path:
    return self.root / "hf"

  def dir(self, scanned: bool) -> pathlib.Path:
    return self.root / ("scanned" if scanned else "unscanned")

  def config(self, scanned: bool, **kw):
    """The converted model.yml with its params, in either layer layout (`scan_layers` defaults to the checkpoint's)."""
    return converted_config(self.dir(scanned), scanned, **kw)

  def api_model(self):
    """MaxText.api's Model of the unscanned conversion (loaded once: logits and generate tests share its compiles)."""
    if self._api_model is None:
      from MaxText import api  # pylint: disable=import-outside-toplevel

      out = self.dir(False)
      self._api_model = api.load(
          str(out / "model.yml"), load_parameters_path=str(out / "params"), dtype="float32", run_name="test"
      )
    return self._api_model


_CONVERTED: dict[tuple[str, Variant], Converted] = {}


def converted(tmp_path_factory, variant: Variant) -> Converted:
  """The variant's Converted, built once per pytest session (test modules of one worker share it)."""
  key = (str(tmp_path_factory.getbasetemp()), variant)
  if key not in _CONVERTED:
    keys = model_keys_of(variant)
    windows = (keys["sliding_window_size"], keys["chunk_attn_window_size"])
    assert REFERENCE_SEQ > 3 * max(windows), f"{variant}: windows {windows} need a longer REFERENCE_SEQ"
    root = tmp_path_factory.mktemp(variant.name)
    model = hf_model_of(variant)
    model.save_pretrained(root / "hf")
    tokens, logits = hf_reference(model, keys["vocab_size"], REFERENCE_SEQ)
    item = Converted(variant, root, model, tokens, logits)
    for scanned in (True, False):
      to_maxtext.convert(str(item.hf_dir), str(item.dir(scanned)), [f"scan_layers={str(scanned).lower()}"])
    _CONVERTED[key] = item
  return _CONVERTED[key]


def read_safetensors(directory) -> dict[str, np.ndarray]:
  reader = SafetensorsReader(directory)
  return {name: reader.read(name) for name in reader.names()}


def write_checkpoint(directory: pathlib.Path, config_json: dict, tensors: dict[str, np.ndarray]):
  """A Hugging Face checkpoint directory: config.json and the tensors in one safetensors file."""
  directory.mkdir()
  (directory / "config.json").write_text(json.dumps(config_json))
  writer = SafetensorsWriter(directory, [(k, v.shape, v.dtype) for k, v in tensors.items()])
  for name, value in tensors.items():
    writer.write(name, value)
  writer.close()


def assert_converts_like(c: Converted, hf_dir: pathlib.Path, out: pathlib.Path):
  """The checkpoint in hf_dir (another spelling of c's) converts to exactly c's scanned params."""
  to_maxtext.convert(str(hf_dir), str(out), ["scan_layers=true"])
  config = c.config(True)
  want, got = load_flat_params(config, c.dir(True) / "params"), load_flat_params(config, out / "params")
  assert want.keys() == got.keys()
  for path, value in want.items():
    np.testing.assert_array_equal(got[path], value, err_msg="/".join(map(str, path)))


def variant(name: str) -> Variant:
  """The registry's test model called `name` (a key of some family's tiny_hf_configs)."""
  (found,) = [v for v in registry_variants() if v.name == name]
  return found


def write_multimodal_checkpoint(c: Converted, directory: pathlib.Path, architecture: str, rename, vision: list[str]):
  """c's checkpoint spelled as a vision-language one: c's config.json as `text_config`, c's tensors renamed by
  `rename`, and `vision` tensors (which conversion of the text model skips)."""
  text_config = json.loads((c.hf_dir / "config.json").read_text())
  tensors = {rename(name): value for name, value in read_safetensors(c.hf_dir).items()}
  tensors |= {name: np.zeros((4, 3), np.float32) for name in vision}
  model_type = text_config["model_type"].removesuffix("_text")
  config_json = {"architectures": [architecture], "model_type": model_type, "text_config": text_config}
  write_checkpoint(directory, config_json, tensors)
