"""Hugging Face checkpoint -> MaxText config and params checkpoint, streamed tensor by tensor.

    python3 -m MaxText.utils.ckpt_conversion.to_maxtext hf_model_path=DIR output_directory=OUT \\
        [scan_layers=true|false] [weight_dtype=float32|bfloat16] [key=value ...]

DIR holds config.json and safetensors (one file or shards with model.safetensors.index.json); nothing is downloaded
from a hub. Writes OUT/model.yml (base_config: base.yml plus every model key derived from config.json, so train,
decode and api.load take it as their config) and OUT/params (an Orbax params checkpoint for load_parameters_path).
DIR and OUT may be buckets (gs://...): tensors are read with ranged reads; the params are staged under TMPDIR (Orbax's
partial saves write local directories) and uploaded at the end, then model.yml.

Host memory stays near twice the larger of the write batch (`flush_bytes`, 128 MiB) and the largest converted
array: with scan_layers=true that is one parameter stacked over all layers, with scan_layers=false one layer's
parameter. Convert big models with scan_layers=false (training and decoding load either layout).
"""

import json
import logging
import pathlib
import shutil
import sys
import tempfile
import time
from typing import Any, Sequence

import numpy as np
import yaml
from flax import nnx, traverse_util

from MaxText import config as config_keys
from MaxText import pyconfig, storage
from MaxText.layers import model_creation, scan_layout
from MaxText import models
from MaxText.layers.decoders import LAYERS_PATH, layer_layout
from MaxText.utils.ckpt_conversion import cli, params_io, weight_mapping
from MaxText.utils.ckpt_conversion.safetensors_io import SafetensorsReader

logger = logging.getLogger("MaxText")

TOOL_KEYS = ("hf_model_path", "output_directory")
USAGE = "python3 -m MaxText.utils.ckpt_conversion.to_maxtext hf_model_path=DIR output_directory=OUT [key=value ...]"

# The keys that define a model's architecture (declared with model=True in MaxText/config/): model.yml writes
# every one of them (base.yml's value unless the family's config_from_hf sets it), so the file means the same
# model whatever base.yml's defaults become.
MODEL_KEYS = config_keys.MODEL_KEYS


def base_defaults() -> dict[str, Any]:
  with open(pyconfig.CONFIGS_DIR / "base.yml", encoding="utf-8") as f:
    return yaml.safe_load(f)


def read_hf_config(hf_model_path: str) -> dict[str, Any]:
  storage.check_readable("hf_model_path", hf_model_path, kind="dir")  # missing bucket / credentials, named
  path = storage.as_path(hf_model_path) / "config.json"
  if not path.is_file():
    raise FileNotFoundError(f"{path} not found (hf_model_path must be a Hugging Face checkpoint directory)")
  return json.loads(path.read_text())


def model_keys(hf_config: dict[str, Any]) -> tuple[str, dict[str, Any]]:
  """(architecture, every MODEL_KEYS value) for a config.json."""
  architecture = (hf_config.get("architectures") or [None])[0]
  if architecture is None:
    raise weight_mapping.UnsupportedCheckpointError(
        f"config.json names no architectures; supported: {', '.join(models.supported_architectures())}"
    )
  spec = models.for_architecture(architecture)
  keys = spec.hf.config_from_hf(weight_mapping.HFConfig(hf_config, spec.hf.defaults))
  keys["decoder_block"] = spec.name
  unknown = sorted(set(keys) - set(MODEL_KEYS))
  if unknown:
    raise ValueError(f"decoder_block {spec.name!r}: config_from_hf returned keys outside MODEL_KEYS: {unknown}")
  defaults = base_defaults()
  return architecture, {k: keys.get(k, defaults[k]) for k in MODEL_KEYS}


def write_model_yml(path: pathlib.Path, hf_model_path: str, architecture: str, keys: dict[str, Any], params: str = ""):
  """Writes the model's config to `path` (local); `params` is where the params go (default: beside it)."""
  lines = [
      f"# {architecture} from {storage.absolute(hf_model_path)} (MaxText.utils.ckpt_conversion.to_maxtext)",
      f"# Params: load_parameters_path={params or path.parent.absolute() / 'params'}",
      "base_config: base.yml",
  ]
  lines += [f"{k}: {_yaml_value(v)}" for k, v in keys.items()]
  positions = keys["trainable_position_size"]
  defaults = base_defaults()
  if positions and positions < defaults["max_target_length"]:  # sequences cannot outgrow a learned position table
    lines.append(f"max_target_length: {positions}")
    lines.append(f"max_prefill_predict_length: {min(positions, defaults['max_prefill_predict_length'])}")
  tokenizer = storage.join(storage.absolute(hf_model_path), "tokenizer.json")
  if storage.as_path(tokenizer).is_file():
    lines += ['tokenizer_type: "huggingface"', f"tokenizer_path: {json.dumps(tokenizer)}"]
  path.write_text("\n".join(lines) + "\n")


def _yaml_value(value: Any) -> str:
  """JSON spelling, except floats keep a '.' (YAML 1.1 reads 1e-06 as a string)."""
  text = json.dumps(value)
  if isinstance(value, float) and "e" in text and "." not in text:
    text = text.replace("e", ".0e")
  return text


def layer_free(path: tuple, group: str = "") -> tuple:
  """decoder/layers/<i>/... -> decoder/layers/[<group>/]... (the scanned path; group from StackLayout.locate)."""
  n = len(LAYERS_PATH)
  return path[:n] + ((group,) if group else ()) + path[n + 1 :]


def convert(hf_model_path: str, output_directory: str, overrides: Sequence[str] = (), flush_bytes: int = 128 * 2**20):
  """Writes output_directory/{model.yml,params}; returns the MaxText config the params were written for."""
  start = time.time()
  architecture, keys = model_keys(read_hf_config(hf_model_path))
  remote = storage.is_remote(output_directory)
  params_path = storage.join(output_directory, "params") if remote else str(pathlib.Path(output_directory) / "params")
  if storage.as_path(params_path).exists():  # checked before anything is written
    raise FileExistsError(f"{params_path} already exists; choose another output_directory or remove it")
  if remote:
    storage.check_writable("output_directory", output_directory)
    # model.yml is built here (pyconfig reads local files) and uploaded once the params are there.
    out = pathlib.Path(tempfile.mkdtemp(prefix="maxtext-convert-"))
  else:
    out = pathlib.Path(output_directory)
    out.mkdir(parents=True, exist_ok=True)
  write_model_yml(out / "model.yml", hf_model_path, architecture, keys, params_path if remote else "")
  config = pyconfig.initialize(["", str(out / "model.yml"), *overrides], log_config=False)
  spec = models.get(config.decoder_block)
  rules = spec.hf.weights(config)
  reader = spec.reader(SafetensorsReader(hf_model_path))
  available = {}
  for name in reader.names():
    canonical = spec.tensor_name(name)
    if canonical is not None:
      available[canonical] = name

  # The model's params (dtype and layout of this config), to check the rules cover exactly them.
  abstract = nnx.state(model_creation.abstract_model(config), nnx.Param).to_pure_dict()
  shapes = traverse_util.flatten_dict(abstract)
  unscanned = traverse_util.flatten_dict(
      scan_layout.scanned_to_unscanned(abstract, config.param_scan_axis) if config.scan_layers else abstract
  )
  consumed = _check_rules(config, rules, reader, available, set(unscanned))
  layout = layer_layout(config)
  writer = params_io.StreamingParamsWriter(params_path, flush_bytes=flush_bytes)
  for rule in rules:
    if not rule.per_layer:
      for path, array in zip(rule.maxtext_paths(), rule.to_maxtext([reader.read(available[n]) for n in rule.hf])):
        writer.add(path, _cast(array, path, shapes))
      continue
    if not config.scan_layers:
      for i in rule.layer_indices(config.num_decoder_layers):
        arrays = rule.to_maxtext([reader.read(available[n]) for n in rule.hf_names(i)])
        for path, array in zip(rule.maxtext_paths(i), arrays):
          writer.add(path, _cast(array, path, unscanned))
      continue
    # Scanned: fill each stacked array layer by layer (no per-layer copies kept around).
    by_group = {}
    for i in rule.layer_indices(config.num_decoder_layers):
      group, j = layout.locate(i)
      by_group.setdefault(group, []).append((i, j))
    for group, members in by_group.items():
      first = members[0][0]
      targets = [shapes[layer_free(path, group)] for path in rule.maxtext_paths(first)]
      writer.make_room(sum(t.size * np.dtype(t.dtype).itemsize for t in targets))
      stacked = {layer_free(p, group): np.empty(t.shape, t.dtype) for p, t in zip(rule.maxtext_paths(first), targets)}
      for i, j in members:
        arrays = rule.to_maxtext([reader.read(available[n]) for n in rule.hf_names(i)])
        for path, array in zip(rule.maxtext_paths(i), arrays):
          target = stacked[layer_free(path, group)]
          index = (slice(None),) * config.param_scan_axis + (j,)
          target[index] = _cast(array, path, unscanned)
      for path in list(stacked):
        writer.add(path, stacked.pop(path))  # the writer's reference is then the only one
      del arrays
  writer.finalize()
  model_yml = str(out / "model.yml")
  if remote:
    model_yml = storage.join(output_directory, "model.yml")
    storage.as_path(model_yml).write_text((out / "model.yml").read_text())
    shutil.rmtree(out, ignore_errors=True)
  logger.info(
      "Converted %s (%d tensors, %.2f GB as %s) in %.1fs: config %s, params %s",
      architecture,
      len(consumed),
      writer.written / 1e9,
      np.dtype(config.weight_dtype).name,
      time.time() - start,
      model_yml,
      params_path,
  )
  return config


def _check_rules(config, rules, reader: SafetensorsReader, available: dict[str, str], params: set) -> set[str]:
  """Checks the rules turn exactly the checkpoint's tensors (shapes included) into exactly the model's params.

  Returns the tensor names used. A tied output head stored anyway (some checkpoints do) is the one tensor left over.
  """
  produced, consumed = set(), set()
  for rule in rules:
    for i in rule.layer_indices(config.num_decoder_layers) if rule.per_layer else [None]:
      produced.update(rule.maxtext_paths(i))
      for name, shape in zip(rule.hf_names(i), rule.hf_shapes):
        if name not in available:
          raise weight_mapping.UnsupportedCheckpointError(f"tensor {name} not found in the checkpoint")
        got = reader.tensors[available[name]].shape
        if got != shape:
          raise weight_mapping.UnsupportedCheckpointError(f"tensor {name}: shape {got}, config.json implies {shape}")
        consumed.add(name)
  if produced != params:
    raise ValueError(f"{config.decoder_block} mapping does not cover the model: {sorted(produced ^ params)[:8]}")
  unused = set(available) - consumed - ({"lm_head.weight"} if config.logits_via_embedding else set())
  if unused:
    raise weight_mapping.UnsupportedCheckpointError(
        f"{len(unused)} tensors have no place in the {config.decoder_block} model: {sorted(unused)[:8]}"
    )
  return consumed


def _cast(array: np.ndarray, path: tuple, abstract: dict) -> np.ndarray:
  """`array` in the dtype of the model's param at `path`, after checking its shape."""
  want = abstract[path]
  if tuple(array.shape) != tuple(want.shape):
    raise ValueError(f"{'/'.join(map(str, path))}: converted shape {array.shape}, the model has {tuple(want.shape)}")
  return array.astype(want.dtype, copy=False)


def main(argv: Sequence[str]):
  def run():
    own, overrides = cli.split_args(argv[1:], TOOL_KEYS)
    convert(cli.require(own, "hf_model_path", USAGE), cli.require(own, "output_directory", USAGE), overrides)

  cli.run(run)


if __name__ == "__main__":
  main(sys.argv)
