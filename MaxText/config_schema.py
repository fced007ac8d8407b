"""Typed schema for every key in MaxText/configs/base.yml.

base.yml holds defaults and one-line docs; this module holds each key's type and allowed range so a value
from a yml, an M_<KEY> environment variable or a key=value argument is coerced and checked in one place.
A test keeps the two in step: every key here is in base.yml and the other way round.
"""

import dataclasses
from typing import Any, Optional


class ConfigError(ValueError):
  """A user-facing configuration error; the CLI prints it as `CONFIG ERROR: ...` and exits 2."""


@dataclasses.dataclass(frozen=True)
class Field:
  """One config key: its python type, whether null is allowed, and its allowed values or range."""

  kind: type
  choices: Optional[tuple] = None
  min: Optional[float] = None
  max: Optional[float] = None
  nullable: bool = False
  item: Optional[type] = None  # element type of list keys (None = any yaml value)

  def coerce(self, key: str, value: Any) -> Any:
    """Returns `value` converted to this field's type, or raises ConfigError naming `key`."""
    if value is None:
      if self.nullable:
        return None
      raise ConfigError(f"{key}: null is not allowed, expected {self.describe()}")
    value = self._convert(key, value)
    if self.choices is not None and value not in self.choices:
      raise ConfigError(f"{key}: {value!r} is not one of {list(self.choices)}")
    if self.min is not None and value < self.min:
      raise ConfigError(f"{key}: {value!r} is below the minimum {self.min}")
    if self.max is not None and value > self.max:
      raise ConfigError(f"{key}: {value!r} is above the maximum {self.max}")
    return value

  def _convert(self, key, value):
    bad = ConfigError(f"{key}: {value!r} is not a valid {self.describe()}")
    if self.kind is bool:
      if isinstance(value, bool):
        return value
      if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
      raise bad
    if self.kind is int:
      if isinstance(value, bool):
        raise bad
      if isinstance(value, int):
        return value
      if isinstance(value, float) and value.is_integer():
        return int(value)
      if isinstance(value, str):
        try:
          return int(value)
        except ValueError:
          raise bad from None
      raise bad
    if self.kind is float:
      if isinstance(value, bool):
        raise bad
      if isinstance(value, (int, float)):
        return float(value)
      if isinstance(value, str):
        try:
          return float(value)
        except ValueError:
          raise bad from None
      raise bad
    if self.kind is str:
      if isinstance(value, (list, dict)):
        raise bad
      return "" if value is None else str(value)
    if self.kind is list:
      if isinstance(value, tuple):
        value = list(value)
      if not isinstance(value, list):
        raise bad
      if self.item is not None:
        return [Field(self.item).coerce(f"{key}[{i}]", v) for i, v in enumerate(value)]
      return value
    raise bad

  def describe(self) -> str:
    name = {bool: "bool", int: "int", float: "float", str: "string", list: "list"}[self.kind]
    if self.item is not None:
      name = f"list of {Field(self.item).describe()}"
    if self.choices is not None:
      name += f" in {list(self.choices)}"
    if self.min is not None or self.max is not None:
      name += f" in [{'-inf' if self.min is None else self.min}, {'inf' if self.max is None else self.max}]"
    return name + (" or null" if self.nullable else "")


def _int(lo=None, hi=None, **kw):
  return Field(int, min=lo, max=hi, **kw)


def _float(lo=None, hi=None, **kw):
  return Field(float, min=lo, max=hi, **kw)


def _str(*choices, **kw):
  return Field(str, choices=tuple(choices) if choices else None, **kw)


_BOOL = Field(bool)
_POS = _int(1)
_NONNEG = _int(0)
_PAR = _int(-1)  # a parallelism degree: -1 fills the remaining devices
_DTYPES = ("float32", "bfloat16", "float16")

SCHEMA: dict[str, Field] = {
    # run
    "run_name": _str(),
    "model_name": _str(),
    "base_output_directory": _str(),
    "hardware": _str("auto", "cpu", "gpu", "tpu"),
    "reuse_host_memory": _BOOL,
    "log_config": _BOOL,
    "save_config_to_output": _BOOL,
    "log_level": _str("DEBUG", "INFO", "WARNING", "ERROR"),
    # model dims
    "global_parameter_scale": _POS,
    "base_emb_dim": _POS,
    "base_num_query_heads": _POS,
    "base_num_kv_heads": _POS,
    "base_mlp_dim": _POS,
    "base_num_decoder_layers": _POS,
    "head_dim": _POS,
    "vocab_size": _POS,
    "decoder_block": _str(),
    "mlp_activations": Field(list, item=str),
    "normalization_layer_epsilon": _float(0.0),
    "logits_via_embedding": _BOOL,
    "final_logits_soft_cap": _float(0.0),
    "logits_dot_in_fp32": _BOOL,
    "cast_logits_to_fp32": _BOOL,
    "use_qk_norm": _BOOL,
    "normalization_type": _str("rmsnorm", "layernorm"),
    "normalization_scale_offset": _float(),
    "use_bias": _BOOL,
    "scale_embedding_by_sqrt_dim": _BOOL,
    "trainable_position_size": _NONNEG,
    "dropout_rate": _float(0.0, 1.0),
    # mixture of experts
    "num_experts": _POS,
    "num_experts_per_tok": _POS,
    "moe_mlp_dim": _POS,
    "shared_experts": _NONNEG,
    "capacity_factor": _float(),
    "load_balance_loss_weight": _float(0.0),
    "routed_score_func": _str("softmax", "sigmoid"),
    "routed_bias": _BOOL,
    "routed_bias_update_rate": _float(0.0),
    "routed_scaling_factor": _float(),
    "norm_topk_prob": _BOOL,
    "n_routing_groups": _int(-1),
    "topk_routing_group": _int(-1),
    "first_num_dense_layers": _NONNEG,
    "interleave_moe_layer_step": _POS,
    "moe_input_scaled_by_router": _BOOL,
    # attention and positions
    "attention": _str("dot_product", "autoselected", "flash", "paged"),
    "sliding_window_size": _NONNEG,
    "attn_logits_soft_cap": _float(0.0),
    "query_pre_attn_scalar": _float(0.0),
    "sliding_window_pattern": _NONNEG,
    "float32_qk_product": _BOOL,
    "float32_logits": _BOOL,
    "attention_causal_blocks": _POS,
    "rope_type": _str("default", "llama3.1", "linear", "yarn", "none"),
    "rope_max_timescale": _float(1.0),
    "rope_min_timescale": _float(1.0),
    "rope_scaling_factor": _float(1.0),
    "rope_low_freq_factor": _float(0.0),
    "rope_high_freq_factor": _float(0.0),
    "rope_original_max_position_embeddings": _POS,
    "rope_yarn_beta_fast": _float(0.0),
    "rope_yarn_beta_slow": _float(0.0),
    "rope_yarn_mscale": _float(0.0),
    "rope_yarn_mscale_all_dim": _float(0.0),
    "attention_type": _str("mha", "mla"),
    "q_lora_rank": _NONNEG,
    "kv_lora_rank": _POS,
    "qk_nope_head_dim": _POS,
    "qk_rope_head_dim": _POS,
    "v_head_dim": _POS,
    "local_rope_max_timescale": _float(0.0),
    "chunk_attn_window_size": _NONNEG,
    "nope_layer_interval": _NONNEG,
    "use_qk_l2_norm": _BOOL,
    "attn_temperature_tuning": _BOOL,
    "attn_temperature_floor_scale": _POS,
    "attn_temperature_scale": _float(0.0),
    # numerics and memory
    "dtype": _str(*_DTYPES),
    "weight_dtype": _str(*_DTYPES),
    "quantization": _str("", "int8", "int8w", "fp8"),
    "scan_layers": _BOOL,
    "param_scan_axis": _int(0, 1),
    "remat_policy": _str("none", "minimal", "save_dot_except_mlp", "save_qkv_proj", "full"),
    # training
    "steps": _int(-1),
    "per_device_batch_size": _float(0.0),
    "max_target_length": _int(2),
    "gradient_accumulation_steps": _POS,
    "learning_rate": _float(0.0),
    "lr_schedule_type": _str("cosine", "constant", "wsd"),
    "warmup_steps_fraction": _float(0.0, 1.0),
    "learning_rate_schedule_steps": _int(-1),
    "cosine_learning_rate_final_fraction": _float(0.0, 1.0),
    "wsd_decay_steps_fraction": _float(0.0, 1.0),
    "wsd_decay_style": _str("linear", "cosine"),
    "adam_b1": _float(0.0, 1.0),
    "adam_b2": _float(0.0, 1.0),
    "adam_eps": _float(0.0),
    "adam_eps_root": _float(0.0),
    "adam_weight_decay": _float(0.0),
    "mu_dtype": _str("", *_DTYPES),
    "gradient_clipping_threshold": _float(0.0),
    "z_loss_multiplier": _float(0.0),
    "init_weights_seed": _NONNEG,
    "enable_dropout": _BOOL,
    "abort_on_nan_loss": _BOOL,
    "eval_interval": _int(-1),
    "eval_steps": _POS,
    "log_period": _POS,
    # metrics and profiling
    "enable_tensorboard": _BOOL,
    "metrics_file": _str(),
    "write_metrics_to_run_dir": _BOOL,
    "device_peak_tflops": _float(0.0),
    "profiler": _str("", "xplane"),
    "profiler_steps": _POS,
    "skip_first_n_steps_for_profiler": _NONNEG,
    # checkpoints
    "enable_checkpointing": _BOOL,
    "async_checkpointing": _BOOL,
    "checkpoint_period": _POS,
    "max_num_checkpoints_to_keep": _NONNEG,
    "load_parameters_path": _str(),
    "load_full_state_path": _str(),
    "param_checkpoint_output_path": _str(),
    # data
    "dataset_type": _str("synthetic", "grain", "tfds", "hf"),
    "dataset_path": _str(),
    "tokenizer_type": _str("sentencepiece", "huggingface", "tiktoken"),
    "tokenizer_path": _str(),
    "add_bos": _BOOL,
    "add_eos": _BOOL,
    "packing": _BOOL,
    "data_shuffle_seed": _NONNEG,
    "num_epoch": _POS,
    "train_data_columns": Field(list, item=str),
    "long_document_mode": _str("chunk", "truncate"),
    "packing_bins": _NONNEG,
    "data_streams": _NONNEG,
    "grain_train_files": _str(),
    "grain_eval_files": _str(),
    "grain_file_type": _str("auto", "arrayrecord", "parquet", "jsonl", "text"),
    "grain_worker_count": _NONNEG,
    "dataset_name": _str(),
    "eval_dataset_name": _str(),
    "train_split": _str(),
    "eval_split": _str(),
    "hf_path": _str(),
    "hf_data_files": _str(),
    "hf_eval_files": _str(),
    "tokenizer_bos_token": _str(),
    "tokenizer_eos_token": _str(),
    "tokenizer_pad_token": _str(),
    "tokenizer_special_tokens": Field(list, item=str),
    "tiktoken_pattern": _str(),
    "tokenizer_train_max_chars": _POS,
    # decode
    "max_prefill_predict_length": _POS,
    "prompt": _str(),
    "decode_sampling_strategy": _str("greedy", "weighted", "topk", "nucleus", "composite"),
    "decode_sampling_temperature": _float(0.0),
    "decode_sampling_top_k": _NONNEG,
    "decode_sampling_nucleus_p": _float(0.0, 1.0),
    "decode_sampling_seed": _NONNEG,
    "prompts_file": _str(),
    "quantize_kvcache": _BOOL,
    "checkpoint_is_quantized": _BOOL,
    "save_quantized_params_path": _str(),
    # serving
    "pagedattn_num_pages": _int(2),
    "pagedattn_tokens_per_page": _POS,
    "pagedattn_max_pages_per_slot": _NONNEG,
    "paged_attention_kernel": _str("auto", "jax", "pallas"),
    "serve_host": _str(),
    "port": _int(0, 65535),
    # mesh and sharding
    "mesh_axes": Field(list, item=str),
    "logical_axis_rules": Field(list),
    "data_sharding": Field(list),
    "allow_split_physical_axes": _BOOL,
    "num_slices": _int(-1),
    # multi-process
    "coordinator_address": _str(),
    "num_processes": _NONNEG,
    "process_id": _int(-1),
    "jax_distributed_initialization_timeout": _POS,
    "skip_jax_distributed_system": _BOOL,
}

MESH_AXES = (
    "data",
    "stage",
    "fsdp",
    "fsdp_transpose",
    "sequence",
    "context",
    "tensor",
    "tensor_sequence",
    "expert",
    "autoregressive",
)
for _axis in MESH_AXES:
  SCHEMA[f"ici_{_axis}_parallelism"] = _PAR
  SCHEMA[f"dcn_{_axis}_parallelism"] = _PAR
