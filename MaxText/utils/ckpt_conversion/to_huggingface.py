"""MaxText params checkpoint -> Hugging Face directory (config.json + safetensors) that transformers loads.

    python3 -m MaxText.utils.ckpt_conversion.to_huggingface CONFIG load_parameters_path=P hf_output_path=DIR \\
        [weight_dtype=bfloat16] [key=value ...]

P is a params-only checkpoint (to_maxtext, generate_param_only_checkpoint) or a step directory of a training run,
scanned or unscanned. With `lora_rank` > 0, P is the base and the adapters of `run_name` (or `checkpoint_path`) are
merged into it first (generate_param_only_checkpoint's merge, through a local temporary checkpoint: the whole model
is loaded once for it); `peft_output_path=DIR2` (with or instead of hf_output_path) also writes the adapters alone as
a PEFT adapter that `peft.PeftModel.from_pretrained` loads onto the Hugging Face base model (peft_export.py).
Tensors are written in `weight_dtype`, one rule at a time: host memory stays near one parameter (stacked over layers
when the checkpoint is scanned), plus Orbax's transient copy while reading it. A config whose settings the family's
Hugging Face model cannot express (say, a soft cap on a Llama) is refused rather than exported as a different model.
P and DIR may be buckets (gs://...): each safetensors shard is written locally and uploaded as soon as it is complete.
"""

import json
import logging
import sys
import tempfile
import time
from typing import Any, Sequence

import numpy as np

from MaxText import models, pyconfig, storage
from MaxText.config_schema import ConfigError
from MaxText.layers.decoders import layer_layout
from MaxText.utils.ckpt_conversion import cli, params_io, to_maxtext, weight_mapping
from MaxText.utils.ckpt_conversion.safetensors_io import SafetensorsWriter

logger = logging.getLogger("MaxText")

TOOL_KEYS = ("hf_output_path", "peft_output_path")
USAGE = (
    "python3 -m MaxText.utils.ckpt_conversion.to_huggingface CONFIG load_parameters_path=P hf_output_path=DIR"
    " [peft_output_path=DIR2 (a LoRA run's adapters in PEFT format)]"
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")


def hf_config_json(config) -> dict[str, Any]:
  """config.json for the config, after checking transformers would read it back as the same model."""
  spec = models.get(config.decoder_block)
  if not spec.converts:
    raise weight_mapping.UnsupportedCheckpointError(f"decoder_block {spec.name!r} has no Hugging Face mapping")
  fields = spec.hf.config_to_hf(config)
  architecture, model_type = spec.architecture_for(config)
  _, back = to_maxtext.model_keys({**fields, "architectures": [architecture], "model_type": model_type})
  differs = [f"{k}={config.get(k)!r} (reads back as {v!r})" for k, v in back.items() if config.get(k) != v]
  if differs:
    raise weight_mapping.UnsupportedCheckpointError(f"{architecture} cannot express this config: {', '.join(differs)}")
  dtype = np.dtype(config.weight_dtype).name
  return {"architectures": [architecture], "model_type": model_type, **fields} | {
      "dtype": dtype,
      "torch_dtype": dtype,  # the 4.x name
  }


def convert(config, hf_output_path: str, max_shard_bytes: int = 5 * 10**9):
  """Writes hf_output_path/{config.json, model*.safetensors} (and the tokenizer files, for a huggingface tokenizer)."""
  if not config.load_parameters_path:
    raise ConfigError(f"load_parameters_path: required; usage: {USAGE}")
  if config.lora_rank > 0:
    from MaxText import generate_param_only_checkpoint  # pylint: disable=import-outside-toplevel

    hf_config_json(config)  # refuse an inexpressible config before merging anything
    with tempfile.TemporaryDirectory() as tmp:
      merged = generate_param_only_checkpoint.export(config, f"{tmp}/params")
      _convert(config, merged, hf_output_path, max_shard_bytes)
    return
  _convert(config, config.load_parameters_path, hf_output_path, max_shard_bytes)


def _convert(config, params_path: str, hf_output_path: str, max_shard_bytes: int):
  start = time.time()
  spec = models.get(config.decoder_block)
  config_json = hf_config_json(config)
  reader = params_io.ParamsReader(params_path)
  rules = spec.hf.weights(config)
  num_layers = config.num_decoder_layers
  layout = layer_layout(config)
  dtype = np.dtype(config.weight_dtype)
  entries = [
      (name, shape, dtype)
      for rule in rules
      for i in (rule.layer_indices(num_layers) if rule.per_layer else [None])
      for name, shape in zip(rule.hf_names(i), rule.hf_shapes)
  ]
  if storage.is_remote(hf_output_path):
    storage.check_writable("hf_output_path", hf_output_path)
  out = storage.as_path(hf_output_path)
  writer = SafetensorsWriter(hf_output_path, entries, max_shard_bytes)
  axis = config.param_scan_axis
  for rule in rules:
    if not rule.per_layer:
      _write(writer, rule.hf_names(), rule.to_hf(reader.read(rule.maxtext_paths())), dtype)
    elif reader.unscanned:
      for i in rule.layer_indices(num_layers):
        _write(writer, rule.hf_names(i), rule.to_hf(reader.read(rule.maxtext_paths(i))), dtype)
    else:
      by_group = {}
      for i in rule.layer_indices(num_layers):
        group, j = layout.locate(i)
        by_group.setdefault(group, []).append((i, j))
      for group, members in by_group.items():
        paths = [to_maxtext.layer_free(p, group) for p in rule.maxtext_paths(members[0][0])]
        stacked = reader.read(paths)
        count = len(layout.layer_indices(group))
        for path, shape in zip(paths, [s.shape for s in stacked]):
          if len(shape) <= axis or shape[axis] != count:
            raise ValueError(
                f"{'/'.join(path)}: stored shape {shape} has no {count}-layer axis at param_scan_axis={axis}"
            )
        for i, j in members:
          _write(writer, rule.hf_names(i), rule.to_hf([np.take(s, j, axis=axis) for s in stacked]), dtype)
        del stacked  # before the next read, so two stacks never coexist
    params_io.release_freed_memory()
  writer.close()
  (out / "config.json").write_text(json.dumps(config_json, indent=2) + "\n")
  _copy_tokenizer(config, out)
  logger.info(
      "Wrote %s (%d tensors, %s) to %s in %.1fs",
      config_json["architectures"][0],
      len(entries),
      dtype.name,
      out,
      time.time() - start,
  )


def _write(writer: SafetensorsWriter, names: list[str], arrays: list[np.ndarray], dtype: np.dtype):
  for name, array in zip(names, arrays):
    writer.write(name, array.astype(dtype, copy=False))


def _copy_tokenizer(config, out):
  """The Hugging Face tokenizer files next to the config's tokenizer_path, when it names one."""
  if config.tokenizer_type != "huggingface" or not config.tokenizer_path:
    return
  source = storage.as_path(config.tokenizer_path)
  source = source if source.is_dir() else source.parent
  for name in TOKENIZER_FILES:
    if (source / name).is_file():
      (out / name).write_bytes((source / name).read_bytes())


def main(argv: Sequence[str]):
  def run():
    if len(argv) < 2 or "=" in argv[1]:
      raise ConfigError(f"no config file given; usage: {USAGE}")
    own, overrides = cli.split_args(argv[2:], TOOL_KEYS)
    peft_output_path = own.get("peft_output_path")
    hf_output_path = own.get("hf_output_path") if peft_output_path else cli.require(own, "hf_output_path", USAGE)
    config = pyconfig.initialize(["", argv[1], *overrides], log_config=False)
    if peft_output_path:
      from MaxText.utils.ckpt_conversion import peft_export  # pylint: disable=import-outside-toplevel

      peft_export.export(config, peft_output_path)
    if hf_output_path:
      convert(config, hf_output_path)

  cli.run(run)


if __name__ == "__main__":
  main(sys.argv)
