"""LoRA adapters -> a PEFT adapter directory (adapter_config.json + adapter_model.safetensors) for the HF base model.

    python3 -m MaxText.utils.ckpt_conversion.to_huggingface CONFIG lora_rank=R run_name=RUN peft_output_path=DIR

`peft.PeftModel.from_pretrained(hf_base, DIR)` then computes what MaxText computes for base + adapters. Each family's
weight rules (weight_mapping.Rule) only transpose, reshape, split, stack and concatenate, so a rule's `to_hf` applied
to element indices shows where every kernel element lands in the Hugging Face tensor. A projection's LoRA factors
follow its kernel's input and output axes there: lora_A [r, in] takes the input order, lora_B [out, r] the output
order. A Hugging Face module that fuses several MaxText kernels (GPT-2's c_attn = query, key, value) gets their
adapters side by side: rank r per adapted kernel, written as PEFT's rank_pattern/alpha_pattern so the scale stays
lora_alpha / lora_rank. Only the adapters are read (the base is never loaded).
"""

import json
import logging
import math

import jax
import numpy as np
import safetensors.numpy
from flax import traverse_util

from MaxText import models, sharding, storage, training
from MaxText.config.lora import EXPERT_TARGETS
from MaxText.config_schema import ConfigError
from MaxText.inference import loading
from MaxText.layers.decoders import layer_layout
from MaxText.utils.ckpt_conversion import to_maxtext, weight_mapping
from MaxText.utils.ckpt_conversion.to_huggingface import hf_config_json

logger = logging.getLogger("MaxText")
PREFIX = "base_model.model."  # PEFT's key prefix for a causal LM's modules
# Under transformers 5, peft reads adapters on these module names of these model types as adapters of the routed
# experts (transformers 4's per-expert modules, since fused) and moves them there, whichever layer they sit in.
# (peft's own table keyed by transformers' conversion patterns; these are the model types the families export.)
PEFT_EXPERT_NAMES = {
    "mixtral": ("w1", "w2", "w3"),
    "qwen2_moe": ("gate_proj", "up_proj", "down_proj"),
    "qwen3_moe": ("gate_proj", "up_proj", "down_proj"),
    "deepseek_v2": ("gate_proj", "up_proj", "down_proj"),
    "deepseek_v3": ("gate_proj", "up_proj", "down_proj"),
}


def _layouts(rule: weight_mapping.Rule, shapes: list[tuple[int, ...]], n_in: int):
  """Per Hugging Face tensor of the rule: (in-axis, input order [in], source kernel per output row [out], output index
  within that kernel [out]), from the rule's `to_hf` applied to element indices of its kernels [in..., out...] (all
  with `n_in` inputs: a fused tensor shares its input axis). Raises when a tensor does not take every kernel's input
  axis whole (the factors would not carry over)."""
  offsets = np.cumsum([0] + [math.prod(s) for s in shapes])
  probes = [np.arange(offsets[t], offsets[t + 1], dtype=np.int64).reshape(s) for t, s in enumerate(shapes)]
  n_out = np.array([math.prod(s) // n_in for s in shapes])
  layouts = []
  for name, hf in zip(rule.hf, rule.to_hf(probes)):
    if hf.ndim == 2:
      source = np.searchsorted(offsets, hf, side="right") - 1
      i, o = np.divmod(hf - offsets[source], n_out[source])
      for in_axis in (1, 0):  # torch Linear [out, in]; GPT-2's Conv1D [in, out]
        ii, oo, ss = (np.moveaxis(v, in_axis, 1) for v in (i, o, source))  # as [out, in]
        if (ii == ii[:1]).all() and (oo == oo[:, :1]).all() and (ss == ss[:, :1]).all():
          layouts.append((in_axis, ii[0], ss[:, 0], oo[:, 0]))
          break
      else:
        raise weight_mapping.UnsupportedCheckpointError(f"{name}: its kernels' adapters do not factor in this layout")
    else:
      raise weight_mapping.UnsupportedCheckpointError(f"{name}: a {hf.ndim}-d tensor has no PEFT LoRA layout")
  return layouts


def _factors(layout, adapters: list[tuple[np.ndarray, np.ndarray] | None], rank: int):
  """(lora_A [k*r, in], lora_B [out, k*r]) of one Hugging Face module from its kernels' (a [in..., r], b [r, out...]),
  k being the number of kernels with adapters (None: that kernel has none, its output rows get zeros)."""
  _, order_in, source, index_out = layout
  present = [t for t, ab in enumerate(adapters) if ab is not None]
  blocks_a = []
  lora_b = np.zeros((len(source), rank * len(present)), np.float32)
  for k, t in enumerate(present):
    a, b = adapters[t]
    a, b = a.reshape(-1, rank).astype(np.float32), b.reshape(rank, -1).astype(np.float32)
    blocks_a.append(a[order_in].T)
    rows = source == t
    lora_b[rows, k * rank : (k + 1) * rank] = b[:, index_out[rows]].T
  return np.concatenate(blocks_a, axis=0), lora_b


def export(config, out_path: str) -> str:
  """Writes out_path/{adapter_config.json, adapter_model.safetensors}; returns out_path."""
  if config.lora_rank <= 0:
    raise ConfigError("peft_output_path: a PEFT adapter comes from a LoRA run; set lora_rank (and its run_name)")
  experts = [t for t in config.lora_target_modules if t in EXPERT_TARGETS]
  if experts:
    raise weight_mapping.UnsupportedCheckpointError(
        f"peft_output_path: routed-expert adapters ({', '.join(experts)}) have no PEFT layout for transformers' fused"
        " expert parameters; export the merged model (hf_output_path) instead"
    )
  model_type = hf_config_json(config)["model_type"]  # the family converts, and its HF model expresses this config
  if storage.is_remote(out_path):
    storage.check_writable("peft_output_path", out_path)
  mesh = sharding.create_mesh(config)
  _, _, abstract, shardings = training.build_model_skeleton(config, mesh)
  adapters = jax.device_get(loading.load_adapters(config, abstract, shardings))
  flat = {tuple(str(k) for k in key): np.asarray(v) for key, v in traverse_util.flatten_dict(adapters).items()}
  kernels = {tuple(str(k) for k in key): v.shape for key, v in traverse_util.flatten_dict(abstract).items()}
  rank, layout, axis = config.lora_rank, layer_layout(config), config.param_scan_axis

  def located(path: tuple, layer: int | None) -> tuple[tuple[str, ...], int | None]:
    """(the path in the config's layer layout, the layer's index in its stack or None)."""
    if layer is None or not config.scan_layers:
      return tuple(str(p) for p in path), None
    group, index = layout.locate(layer)
    return tuple(str(p) for p in to_maxtext.layer_free(path, group)), index

  def adapter_of(path: tuple, layer: int | None):
    """(a, b) of the kernel at unscanned `path` in one layer, or None when it has no adapter."""
    module, index = located(path[:-1], layer)
    if path[-1] != "kernel" or module + ("lora_a",) not in flat:
      return None
    a, b = flat[module + ("lora_a",)], flat[module + ("lora_b",)]
    if index is not None:
      a, b = np.take(a, index, axis=axis), np.take(b, index, axis=axis)
    return a, b

  def kernel_shape(path: tuple, layer: int | None) -> tuple[int, ...]:
    stored, index = located(path, layer)
    shape = kernels[stored]
    return shape if index is None else shape[:axis] + shape[axis + 1 :]

  tensors, targets, rank_pattern, alpha_pattern, fan_in_fan_out = {}, [], {}, {}, False
  for rule in models.get(config.decoder_block).hf.weights(config):
    layers = list(rule.layer_indices(config.num_decoder_layers)) if rule.per_layer else [None]
    first = [adapter_of(p, layers[0]) for p in rule.maxtext_paths(layers[0])]
    if not any(ab is not None for ab in first):
      continue
    if any(p[-1] != "kernel" for p in rule.maxtext_paths(layers[0])):
      raise weight_mapping.UnsupportedCheckpointError(f"{rule.hf}: adapted kernels share tensors with other params")
    n_in = math.prod(next(ab for ab in first if ab is not None)[0].shape[:-1])
    layouts = _layouts(rule, [kernel_shape(p, layers[0]) for p in rule.maxtext_paths(layers[0])], n_in)
    for layer in layers:
      pairs = [adapter_of(p, layer) for p in rule.maxtext_paths(layer)]
      for name, hf_layout in zip(rule.hf_names(layer), layouts):
        module = name.removesuffix(".weight")
        lora_a, lora_b = _factors(hf_layout, pairs, rank)
        tensors[f"{PREFIX}{module}.lora_A.weight"] = lora_a
        tensors[f"{PREFIX}{module}.lora_B.weight"] = lora_b
        targets.append(module)
        fan_in_fan_out |= hf_layout[0] == 0
        if lora_a.shape[0] != rank:  # fused kernels side by side: same scale per adapter
          rank_pattern[module] = lora_a.shape[0]
          alpha_pattern[module] = config.lora_alpha * lora_a.shape[0] / rank
  renamed = [m for m in targets if m.rsplit(".", 1)[-1] in PEFT_EXPERT_NAMES.get(model_type, ())]
  if renamed:
    raise weight_mapping.UnsupportedCheckpointError(
        f"peft_output_path: peft moves adapters on {model_type} modules named"
        f" {'/'.join(PEFT_EXPERT_NAMES[model_type])} onto the routed experts, so the dense MLP adapters of"
        f" {', '.join(renamed[:3])}{' ...' if len(renamed) > 3 else ''} would load in the wrong place; export the"
        " merged model (hf_output_path), or train without wi_0/wi_1/wo in lora_target_modules"
    )
  adapter_config = {
      "peft_type": "LORA",
      "task_type": "CAUSAL_LM",
      "base_model_name_or_path": None,
      "r": rank,
      "lora_alpha": config.lora_alpha,
      "lora_dropout": config.lora_dropout,
      "target_modules": targets,
      "rank_pattern": rank_pattern,
      "alpha_pattern": alpha_pattern,
      "fan_in_fan_out": bool(fan_in_fan_out),
      "bias": "none",
      "use_rslora": False,
      "init_lora_weights": True,
      "inference_mode": True,
      "modules_to_save": None,
  }
  out = storage.as_path(out_path)
  out.mkdir(parents=True, exist_ok=True)
  dtype = np.dtype(config.weight_dtype)
  (out / "adapter_model.safetensors").write_bytes(
      safetensors.numpy.save({k: np.ascontiguousarray(v.astype(dtype)) for k, v in tensors.items()})
  )
  (out / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2) + "\n")
  logger.info("Wrote a PEFT LoRA adapter (%d modules, rank %d, %s) to %s", len(targets), rank, dtype.name, out_path)
  return out_path
