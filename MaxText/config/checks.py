"""Cross-key checks on the resolved values: every setting that would make a layer, a cache or an entry point fail.

pyconfig runs `check` once the values are derived (the backend resolved, batch and mesh sizes known), so a bad
combination is one `CONFIG ERROR: <key>: ...` before anything is built or compiled. Pure functions of the dict.
"""

from typing import Any, Optional

from MaxText.config import mesh, model, numerics
from MaxText.config.declare import ConfigError
from MaxText.config.lora import EXPERT_TARGETS, MLA_TARGETS, TARGETS

# Entry points whose start-up passes `program`; each may add its own refusals.
PROGRAMS = ("train", "train_compile", "decode", "decode_compile", "serve", "generate_param_only_checkpoint")
_COMPILERS = ("train_compile", "decode_compile")  # entry points that may target a slice this host lacks
_TRAINING = ("train", "train_compile")


def check(v: dict[str, Any], program: Optional[str] = None):
  """Raises ConfigError, naming the key, for the first contradiction in the resolved values `v`."""
  if program is not None and program not in PROGRAMS:
    raise ValueError(f"program {program!r} is not one of {PROGRAMS}")
  if v["compile_topology"] and program is not None and program not in _COMPILERS:
    raise ConfigError(
        f"compile_topology: {program} runs on this host's devices; compile for {v['compile_topology']} with"
        " python3 -m MaxText.train_compile (or MaxText.decode_compile)"
    )
  check_model(v, program)
  check_moe(v)
  check_attention(v, program)
  check_context_parallel(v)
  check_paged(v, program)
  check_quantization(v, program)
  check_decode(v)
  check_vocab_tiling(v)
  check_pipeline(v, program)
  check_sft(v)
  check_lora(v)
  check_run(v)


def check_model(v: dict, program: Optional[str] = None):
  if v["num_query_heads"] % v["num_kv_heads"]:
    raise ConfigError(
        f"base_num_query_heads: {v['num_query_heads']} query heads are not divisible by {v['num_kv_heads']} kv heads"
        " (base_num_kv_heads)"
    )
  if v["head_dim"] % 2:
    raise ConfigError(f"head_dim: {v['head_dim']} must be even for rotary embeddings")
  acts = v["mlp_activations"]
  if not acts or any(a not in model.ACTIVATIONS for a in acts):
    raise ConfigError(f"mlp_activations: {acts} must be a non-empty list from {list(model.ACTIVATIONS)}")
  check_family(v)
  # Training never prefills: its runs may be shorter than the decode default.
  if program not in _TRAINING and v["max_prefill_predict_length"] > v["max_target_length"]:
    raise ConfigError(
        f"max_prefill_predict_length: {v['max_prefill_predict_length']} exceeds"
        f" max_target_length {v['max_target_length']}"
    )
  if 0 < v["trainable_position_size"] < v["max_target_length"]:
    raise ConfigError(
        f"max_target_length: {v['max_target_length']} exceeds the {v['trainable_position_size']} learned positions"
        " (trainable_position_size)"
    )


def check_family(v: dict):
  """decoder_block names a registered family, and the family's own constraints hold (models.validate_config)."""
  from MaxText import models  # pylint: disable=import-outside-toplevel  # the registry imports Flax: only when asked

  models.validate_config(v)


def check_moe(v: dict):
  """Mixture-of-experts keys that contradict each other (MaxText/layers/moe.py)."""
  if v["num_experts"] == 1:
    return  # a dense model: the other MoE keys are unused
  acts = v["mlp_activations"]
  if len(acts) != 2 or acts[1] != "linear":
    raise ConfigError(f"mlp_activations: {acts}: MoE experts (num_experts > 1) are gated MLPs, [activation, linear]")
  if v["num_experts_per_tok"] > v["num_experts"]:
    raise ConfigError(f"num_experts_per_tok: {v['num_experts_per_tok']} exceeds num_experts={v['num_experts']}")
  groups, keep = v["n_routing_groups"], v["topk_routing_group"]
  if groups != -1:
    if groups < 1 or v["num_experts"] % groups:
      raise ConfigError(f"n_routing_groups: {groups} must divide num_experts={v['num_experts']} (or be -1 = off)")
    if not 1 <= keep <= groups:
      raise ConfigError(f"topk_routing_group: {keep} must be in 1..n_routing_groups={groups}")
    if keep * (v["num_experts"] // groups) < v["num_experts_per_tok"]:
      raise ConfigError(
          f"topk_routing_group: {keep} groups of {v['num_experts'] // groups} experts cannot supply"
          f" num_experts_per_tok={v['num_experts_per_tok']}"
      )
  if v["moe_grouped_matmul"] == "megablox" and v["hardware"] != "tpu":
    raise ConfigError(
        f"moe_grouped_matmul: megablox (a Pallas TPU kernel) runs on TPU only, but the backend is {v['hardware']!r};"
        " use ragged_dot or auto"
    )
  misfit = megablox_misfit(v)
  if v["moe_grouped_matmul"] == "megablox" and v["num_experts"] > 1 and misfit:
    raise ConfigError(f"moe_grouped_matmul: megablox cannot tile this MoE: {misfit}; use ragged_dot or auto")
  if v["routed_bias_update_rate"] > 0 and not v["routed_bias"]:
    raise ConfigError("routed_bias_update_rate: > 0 needs routed_bias: true (it updates the routing bias)")
  if v["moe_input_scaled_by_router"] and v["num_experts_per_tok"] != 1:
    raise ConfigError("moe_input_scaled_by_router: needs num_experts_per_tok=1 (Llama 4 routes a token to one expert)")


def _mesh_degrees(v: dict) -> dict[str, int]:
  return {a: v["ici_parallelism"][i] * v["dcn_parallelism"][i] for i, a in enumerate(v["mesh_axes"])}


def _rule_axes(v: dict, name: str) -> list[str]:
  """The mesh axes the logical axis `name` maps to (its first rule), in the mesh."""
  axes = next((rule[1] for rule in v["logical_axis_rules"] if rule[0] == name), [])
  return [a for a in (axes if isinstance(axes, list) else [axes]) if a in v["mesh_axes"]]


def megablox_misfit(v: dict) -> str:
  """Why the megablox kernel cannot tile this MoE's matmuls, or '' if it can: its tiles need the embedding and each
  device's expert MLP columns (moe_mlp_dim over the tensor-like axes layers/moe.py splits it along) in multiples of
  128 lanes (the TPU compiler rejects the Pallas block shapes otherwise)."""
  degrees = _mesh_degrees(v)
  used = {a for a in _rule_axes(v, "activation_batch") + _rule_axes(v, "exp") if degrees[a] > 1}
  split = 1
  for a in _rule_axes(v, "mlp"):
    if a not in used:
      split *= degrees[a]
  problems = []
  if v["emb_dim"] % 128:
    problems.append(f"emb_dim {v['emb_dim']} is not a multiple of 128")
  if v["moe_mlp_dim"] % (128 * split):
    per_device = f" ({v['moe_mlp_dim']} / {split} devices)" if split > 1 else ""
    problems.append(f"each device's expert MLP columns{per_device} are not a multiple of 128")
  return " and ".join(problems)


def check_flash_lengths(v: dict, program: Optional[str]):
  """The splash kernel tiles the sequence it attends over: training's max_target_length, or a decode program's
  longest prefill (shorter prefill buckets the kernel cannot tile use dot_product, layers/attentions.py)."""
  from MaxText.layers.ops import attention as ops  # pylint: disable=import-outside-toplevel  # imports jax

  decoding = program in ("decode", "decode_compile", "serve")
  key = "max_prefill_predict_length" if decoding else "max_target_length"
  reason = ops.splash_unsupported_reason(v[key])
  if reason:
    raise ConfigError(
        f"{key}: attention=flash: {reason} (use a multiple of {ops.SPLASH_BLOCK}, or one of"
        f" {ops.SPLASH_MIN_BLOCK}, {2 * ops.SPLASH_MIN_BLOCK}, {3 * ops.SPLASH_MIN_BLOCK}, {ops.SPLASH_BLOCK})"
    )


def check_attention(v: dict, program: Optional[str] = None):
  if v["attention"] == "flash" and v["hardware"] != "tpu":
    raise ConfigError(
        f"attention: flash (the Pallas splash-attention kernel) runs on TPU only, but the backend is"
        f" {v['hardware']!r}; use attention=autoselected (cuDNN on GPU) or attention=dot_product"
    )
  if v["attention"] == "flash":
    check_flash_lengths(v, program)
  if v["attention_type"] == "mla" and v["qk_rope_head_dim"] % 2:
    raise ConfigError(f"qk_rope_head_dim: {v['qk_rope_head_dim']} must be even for rotary embeddings (MLA)")


def check_context_parallel(v: dict):
  """The sequence splits evenly over the context shards: 2n chunks when load-balanced (MaxText/context_parallel.py)."""
  axes = list(v["mesh_axes"])
  if "context" not in axes:
    return
  i = axes.index("context")
  n = v["ici_parallelism"][i] * v["dcn_parallelism"][i]
  if n == 1:
    return
  parts = 2 * n if v["context_parallel_load_balance"] else n
  how = f"2 x {n} load-balanced chunks" if v["context_parallel_load_balance"] else f"{n} context shards"
  if v["max_target_length"] % parts:
    raise ConfigError(
        f"max_target_length: {v['max_target_length']} tokens do not split into {how} (ici/dcn_context_parallelism;"
        f" use a multiple of {parts})"
    )


def check_paged(v: dict, program: Optional[str]):
  """The paged KV cache (attention=paged; MaxText.serve always pages): sizes, and what the pallas kernel cannot do.

  layers/cache/paged.page_spec_from_config repeats the size checks for an engine's own cache length.
  """
  if v["attention"] != "paged" and program != "serve":
    return
  per_page, length = v["pagedattn_tokens_per_page"], v["max_target_length"]
  max_pages = v["pagedattn_max_pages_per_slot"] or -(-length // per_page)
  if max_pages * per_page < length:
    raise ConfigError(
        f"pagedattn_max_pages_per_slot: {max_pages} pages of {per_page} tokens hold fewer than the"
        f" {length} tokens of max_target_length"
    )
  if v["pagedattn_num_pages"] - 1 < max_pages:
    raise ConfigError(
        f"pagedattn_num_pages: {v['pagedattn_num_pages']} pages (page 0 is scratch) cannot hold one sequence of"
        f" {max_pages} pages (raise pagedattn_num_pages or lower max_target_length)"
    )
  if v["paged_attention_kernel"] == "pallas":
    if v["hardware"] not in ("gpu", "tpu"):
      raise ConfigError(
          f"paged_attention_kernel: pallas runs on GPU or TPU only, the backend is {v['hardware']!r} (use jax)"
      )
    if v["sliding_window_size"] > 0 or v["chunk_attn_window_size"] > 0:
      raise ConfigError(
          "paged_attention_kernel: the pallas kernel has no sliding window or chunked attention"
          " (sliding_window_size / chunk_attn_window_size > 0); use jax"
      )
    if v["quantize_kvcache"]:
      raise ConfigError("paged_attention_kernel: the pallas kernel does not read int8 pages (quantize_kvcache); use jax")


def check_quantization(v: dict, program: Optional[str]):
  stored_key = next((k for k in ("checkpoint_is_quantized", "save_quantized_params_path") if v[k]), None)
  if stored_key is None:
    return
  if program in _TRAINING and not (stored_key == "checkpoint_is_quantized" and v["lora_rank"] > 0):
    raise ConfigError(
        f"{stored_key}: a decode key (int8 params cannot be trained; QLoRA trains adapters over them with lora_rank);"
        " train with quantization=... alone"
    )
  if program in _TRAINING and v["quantization"] != "int8w":
    raise ConfigError(
        f"checkpoint_is_quantized: QLoRA (lora_rank over an int8 base) uses weight-only int8, quantization=int8w (got"
        f" {v['quantization']!r})"
    )
  if program == "train" and not v["load_parameters_path"]:  # (an AOT compile reads no weights)
    raise ConfigError("checkpoint_is_quantized: QLoRA needs the int8 base in load_parameters_path")
  stored = list(numerics.STORED_QUANTIZATION)
  if not v["quantization"]:
    raise ConfigError(f"{stored_key}: needs quantization set to one of {stored}")
  if v["quantization"] not in stored:
    raise ConfigError(
        f"{stored_key}: quantized checkpoints hold int8 weights; quantization={v['quantization']!r} must be one of"
        f" {stored}"
    )


def check_vocab_tiling(v: dict):
  """num_vocab_tiling cuts the sequence (layers/ops/head_loss.tiled_cross_entropy) into equal chunks."""
  n, length = v["num_vocab_tiling"], v["max_target_length"]
  if length % n:
    raise ConfigError(f"num_vocab_tiling: {n} chunks do not divide the sequence of max_target_length={length} tokens")


def check_decode(v: dict):
  if v["decode_sampling_strategy"] == "topk" and v["decode_sampling_top_k"] == 0:
    raise ConfigError("decode_sampling_top_k: decode_sampling_strategy topk needs decode_sampling_top_k > 0")
  if v["decode_sampling_nucleus_p"] <= 0:
    raise ConfigError(f"decode_sampling_nucleus_p: {v['decode_sampling_nucleus_p']} must be in (0, 1] (1.0 = off)")


def check_pipeline(v: dict, program: Optional[str]):
  """Pipeline parallelism (ici/dcn_stage_parallelism > 1): what the stage schedule needs, and what it cannot do."""
  stages, repeats, micro = v["pipeline_stages"], v["num_pipeline_repeats"], v["pipeline_microbatches"]
  if stages == 1:
    for key, unset in (
        ("num_pipeline_repeats", 1),
        ("num_pipeline_microbatches", -1),
        ("pipeline_remat_iterations", True),
    ):
      if v[key] != unset:
        raise ConfigError(f"{key}: {v[key]} needs pipeline stages (ici_stage_parallelism or dcn_stage_parallelism > 1)")
    return
  if program is not None and program not in _TRAINING:
    raise ConfigError(
        f"ici_stage_parallelism: pipeline stages are a training layout; {program} runs with stage parallelism 1 (a"
        " pipelined checkpoint loads there as it is)"
    )
  if not v["scan_layers"]:
    raise ConfigError("scan_layers: pipeline parallelism runs the scanned layer stack; set scan_layers=true")
  if v["dropout_rate"] > 0 and v["enable_dropout"]:
    raise ConfigError("dropout_rate: dropout is not supported with pipeline parallelism; set dropout_rate=0")
  from MaxText.layers import decoders  # pylint: disable=import-outside-toplevel  # (jax is loaded by now)

  layout = decoders.layer_layout(_Values(v))
  units = decoders.pipeline_schedule(_Values(v)).blocks
  if units % (stages * repeats):
    what = (
        ""
        if layout.homogeneous
        else (f" ({units} blocks of {layout.period} layers after {layout.prefix} unpipelined prefix layers)")
    )
    raise ConfigError(
        f"num_decoder_layers: {v['num_decoder_layers']} layers{what} do not split evenly into {stages} pipeline"
        f" stages x {repeats} repeats (num_pipeline_repeats)"
    )
  if micro < stages:
    raise ConfigError(
        f"num_pipeline_microbatches: {micro} micro-batches are fewer than the {stages} pipeline stages (each stage"
        " needs one to work on)"
    )
  if v["micro_batch_size_to_train_on"] % micro:
    raise ConfigError(
        f"num_pipeline_microbatches: the batch of {v['micro_batch_size_to_train_on']} sequences (per_device_batch_size"
        f" x devices, per gradient-accumulation step) does not split into {micro} micro-batches"
    )
  rows = v["micro_batch_size_to_train_on"] // micro
  axes = [a for a in _rule_axes(v, "activation_batch") if a != "stage"]
  degrees = _mesh_degrees(v)
  degree = 1
  for a in axes:
    degree *= degrees[a]
  if rows % degree:
    raise ConfigError(
        f"num_pipeline_microbatches: micro-batches of {rows} sequences do not split over the {degree} devices of"
        f" the batch axes {axes} (activation_batch), so every device would compute whole micro-batches; use fewer"
        " micro-batches or a larger per_device_batch_size"
    )


class _Values:
  """Attribute access to the resolved values, for helpers written against a Config."""

  def __init__(self, values: dict):
    self.__dict__.update(values)


def check_sft(v: dict):
  if v["use_dpo"]:
    if v["use_sft"]:
      raise ConfigError("use_dpo: trains on preference pairs; use_sft (conversations) is another objective: set one")
    if v["dataset_type"] not in ("grain", "hf"):
      raise ConfigError(f"use_dpo: reads preference pairs through dataset_type grain or hf, not {v['dataset_type']}")
    if len(v["train_data_columns"]) != 3:
      raise ConfigError(
          f"train_data_columns: use_dpo reads [prompt, chosen, rejected] columns, got {v['train_data_columns']}"
      )
    if v["ici_stage_parallelism"] * v["dcn_stage_parallelism"] > 1:
      raise ConfigError("use_dpo: DPO with pipeline stages is not supported yet")
    for key in ("load_full_state_path", "checkpoint_path"):
      if v[key] and not v["lora_rank"]:
        raise ConfigError(
            f"{key}: a DPO run starts from load_parameters_path, which is also its frozen reference model (a run"
            " resumes from its own checkpoints with run_name)"
        )
  if not v["use_sft"]:
    return
  if v["dataset_type"] not in ("grain", "hf"):
    raise ConfigError(f"use_sft: reads conversations through dataset_type grain or hf, not {v['dataset_type']}")
  if len(v["train_data_columns"]) not in (1, 2):
    raise ConfigError(
        f"train_data_columns: use_sft reads one column of messages ([messages]) or a prompt and a completion column"
        f" ([prompt, completion]), got {v['train_data_columns']}"
    )


def check_lora(v: dict):
  if v["lora_rank"] == 0:
    return
  from MaxText import lora  # pylint: disable=import-outside-toplevel

  unknown = [t for t in v["lora_target_modules"] if t not in TARGETS]
  if unknown or not v["lora_target_modules"]:
    raise ConfigError(f"lora_target_modules: {unknown or '[]'} is not a list of {', '.join(TARGETS)}")
  dims = lora.target_dims(v)
  experts = [t for t in v["lora_target_modules"] if t in EXPERT_TARGETS]
  if experts and v["num_experts"] <= 1:
    raise ConfigError(f"lora_target_modules: {experts} adapt routed MoE experts; this model has none (num_experts <= 1)")
  absent = [t for t in v["lora_target_modules"] if t in MLA_TARGETS and t not in dims]
  if absent:
    has = sorted(t for t in MLA_TARGETS if t in dims)
    raise ConfigError(
        f"lora_target_modules: this model has no {absent} projection (attention_type={v['attention_type']!r},"
        f" q_lora_rank={v['q_lora_rank']}); its MLA projections: {has or 'none'}"
    )
  if v["lora_dropout"] >= 1.0:
    raise ConfigError(f"lora_dropout: {v['lora_dropout']} would drop every adapter input; expected 0 <= rate < 1")
  for name in [t for t in v["lora_target_modules"] if t in dims]:
    if v["lora_rank"] > min(dims[name]):
      raise ConfigError(
          f"lora_rank: {v['lora_rank']} is larger than the {name} projection's smaller dimension ({dims[name][0]} ->"
          f" {dims[name][1]}); a rank at most {min(dims[name])} can change it"
      )
  if v["ici_stage_parallelism"] * v["dcn_stage_parallelism"] > 1:
    raise ConfigError("lora_rank: LoRA with pipeline stages (ici/dcn_stage_parallelism > 1) is not supported yet")
  if v["save_quantized_params_path"]:
    raise ConfigError("save_quantized_params_path: quantize the base before LoRA (without lora_rank), not with it")
  if v["load_full_state_path"]:
    raise ConfigError(
        "load_full_state_path: with lora_rank the base comes from load_parameters_path and the adapters from the"
        " run's own checkpoints"
    )


def check_run(v: dict):
  if v["load_parameters_path"] and v["load_full_state_path"]:
    raise ConfigError("load_parameters_path: set either load_parameters_path or load_full_state_path, not both")
  for other in ("load_parameters_path", "load_full_state_path"):
    if other == "load_parameters_path" and v["lora_rank"] > 0:
      continue  # LoRA: the base from load_parameters_path, the adapters from checkpoint_path
    if v["checkpoint_path"] and v[other]:
      raise ConfigError(f"checkpoint_path: set either checkpoint_path or {other}, not both")
  if "/" in v["run_name"]:
    raise ConfigError(f"run_name: {v['run_name']!r} must not contain '/'")
  if "://" in v["jax_cache_dir"]:
    raise ConfigError(f"jax_cache_dir: a local directory, not a URL (got {v['jax_cache_dir']!r})")


def check_mesh_keys(v: dict):
  """mesh_axes, logical_axis_rules and data_sharding name known, distinct mesh axes."""
  axes = v["mesh_axes"]
  unknown = [a for a in axes if a not in mesh.MESH_AXES]
  if unknown or len(set(axes)) != len(axes):
    raise ConfigError(f"mesh_axes: {axes} must be distinct names from {list(mesh.MESH_AXES)}")
  for a in mesh.MESH_AXES:
    if a not in axes and (v[f"ici_{a}_parallelism"] != 1 or v[f"dcn_{a}_parallelism"] not in (1, -1)):
      raise ConfigError(f"ici_{a}_parallelism: axis {a!r} is not in mesh_axes")
  for i, rule in enumerate(v["logical_axis_rules"]):
    if not (isinstance(rule, list) and len(rule) == 2 and isinstance(rule[0], str)):
      raise ConfigError(f"logical_axis_rules[{i}]: expected [logical_name, [mesh_axis, ...]], got {rule!r}")
    targets = rule[1] if isinstance(rule[1], list) else [rule[1]]
    bad = [t for t in targets if t not in axes]
    if bad:
      raise ConfigError(f"logical_axis_rules[{i}] ({rule[0]}): mesh axes {bad} are not in mesh_axes")
  for group in v["data_sharding"]:
    bad = [t for t in (group if isinstance(group, list) else [group]) if t not in axes]
    if bad:
      raise ConfigError(f"data_sharding: mesh axes {bad} are not in mesh_axes")
