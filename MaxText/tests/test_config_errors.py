"""Every config-dependent check runs when the config is built: a ConfigError naming the key, before any model.

The two cases a user hits first run through the real command line (exit code 2, one `CONFIG ERROR:` line, no
traceback); the rest build the config in this process. Also: the declarations in MaxText/config/ are the one
source of base.yml, MODEL_KEYS and the layers' lists of names, and the backend-op keys resolve per backend.
"""

import os
import pathlib
import re
import subprocess
import sys

import pytest
import yaml

from MaxText import config as declared
from MaxText import pyconfig
from MaxText.config import checks
from MaxText.config_schema import ConfigError

REPO_ROOT = pathlib.Path(pyconfig.__file__).resolve().parent.parent
TINY = dict(base_emb_dim=64, base_num_query_heads=2, base_num_kv_heads=2, head_dim=32, base_mlp_dim=64, vocab_size=64)
TINY_ARGS = [f"{k}={v}" for k, v in {**TINY, "base_num_decoder_layers": 1, "log_config": "false"}.items()]
MLA = dict(attention_type="mla", kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16)
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_mlp_dim=32)


def build(*args, program=None, **kwargs):
  return pyconfig.initialize(["", "base.yml", *args], environ={}, program=program, **{**TINY, **kwargs})


def error_of(*args, program=None, **kwargs) -> str:
  with pytest.raises(ConfigError) as e:
    build(*args, program=program, **kwargs)
  return str(e.value)


# ---------------------------------------------------------------- the command line


def run_entry_point(module: str, *args) -> subprocess.CompletedProcess:
  env = {k: v for k, v in os.environ.items() if not k.startswith(pyconfig.ENV_PREFIX)}
  env.update(JAX_PLATFORMS="cpu")
  return subprocess.run(
      [sys.executable, "-m", module, "MaxText/configs/base.yml", *TINY_ARGS, *args],
      cwd=REPO_ROOT,
      env=env,
      capture_output=True,
      text=True,
      timeout=300,
      check=False,
  )


@pytest.mark.parametrize(
    "module, args, key",
    [
        ("MaxText.train", ["attention=flash", "steps=2", "dataset_type=synthetic"], "attention"),
        ("MaxText.decode", ["attention=paged", "pagedattn_num_pages=2"], "pagedattn_num_pages"),
    ],
)
def test_entry_point_exits_2_with_one_config_error_line(module, args, key):
  result = run_entry_point(module, *args)
  assert result.returncode == 2, result.stderr[-3000:]
  assert result.stderr.startswith(f"CONFIG ERROR: {key}:"), result.stderr[-3000:]
  assert result.stderr.count("CONFIG ERROR:") == 1
  assert "Traceback" not in result.stderr


def test_initialize_or_exit_maps_config_error_to_exit_2(capsys):
  with pytest.raises(SystemExit) as e:
    pyconfig.initialize_or_exit(["", "base.yml", "attention=flash"])
  assert e.value.code == 2
  assert capsys.readouterr().err.startswith("CONFIG ERROR: attention: flash")


# ---------------------------------------------------------------- each check, in process


@pytest.mark.parametrize(
    "overrides, program, key",
    [
        # attention kernels per backend, and the cache combinations
        (dict(attention="flash"), None, "attention"),
        (dict(pagedattn_num_pages=2), "serve", "pagedattn_num_pages"),  # serve always pages
        (dict(attention="paged", pagedattn_max_pages_per_slot=2, max_target_length=64), None, "pagedattn_max_pages"),
        (dict(attention="paged", pagedattn_num_pages=4), None, "pagedattn_num_pages"),
        (dict(attention="paged", paged_attention_kernel="pallas"), None, "paged_attention_kernel"),
        # names with a closed set of choices
        (dict(remat_policy="some"), None, "remat_policy"),
        (dict(rope_type="ntk"), None, "rope_type"),
        (dict(normalization_type="batchnorm"), None, "normalization_type"),
        (dict(mlp_activations=["silu", "swishy"]), None, "mlp_activations"),
        (dict(quantization="int4"), None, "quantization"),
        (dict(decode_sampling_strategy="beam"), None, "decode_sampling_strategy"),
        (dict(paged_attention_kernel="cuda"), None, "paged_attention_kernel"),
        (dict(dense_matmul_backward="manual"), None, "dense_matmul_backward"),
        (dict(head_loss="chunked"), None, "head_loss"),
        # model shapes
        (dict(base_num_query_heads=3, base_num_kv_heads=2), None, "base_num_query_heads"),
        (dict(head_dim=31), None, "head_dim"),
        ({**MLA, "qk_rope_head_dim": 7}, None, "qk_rope_head_dim"),
        (dict(decoder_block="nofamily"), None, "decoder_block"),
        (dict(decoder_block="deepseek"), None, "attention_type"),  # the family's own check (its spec)
        # mixture of experts
        ({**MOE, "mlp_activations": ["gelu"]}, None, "mlp_activations"),
        ({**MOE, "num_experts_per_tok": 5}, None, "num_experts_per_tok"),
        ({**MOE, "n_routing_groups": 3, "topk_routing_group": 1}, None, "n_routing_groups"),
        ({**MOE, "n_routing_groups": 2, "topk_routing_group": 3}, None, "topk_routing_group"),
        ({**MOE, "routed_bias_update_rate": 0.01}, None, "routed_bias_update_rate"),
        ({**MOE, "moe_input_scaled_by_router": True}, None, "moe_input_scaled_by_router"),
        # quantized checkpoints and the train-only refusals
        (dict(checkpoint_is_quantized=True), None, "checkpoint_is_quantized"),
        (dict(quantization="fp8", save_quantized_params_path="/tmp/q"), None, "save_quantized_params_path"),
        (dict(quantization="int8", checkpoint_is_quantized=True), "train", "checkpoint_is_quantized"),
        (dict(quantization="int8", save_quantized_params_path="/tmp/q"), "train_compile", "save_quantized_params"),
        # sampling
        (dict(decode_sampling_strategy="topk", decode_sampling_top_k=0), None, "decode_sampling_top_k"),
        (dict(decode_sampling_nucleus_p=0.0), None, "decode_sampling_nucleus_p"),
        # derived values cannot be set
        (dict(emb_dim=128), None, "emb_dim"),
        (dict(num_devices=2), None, "num_devices"),
    ],
)
def test_each_check_names_its_key(overrides, program, key):
  assert error_of(program=program, **overrides).startswith(key)


def test_derived_key_from_the_command_line_is_named_as_derived():
  message = error_of("global_batch_size_to_train_on=8")
  assert message.startswith("global_batch_size_to_train_on: is derived")


def test_a_valid_combination_passes_with_each_program():
  for program in checks.PROGRAMS:
    assert build(program=program).attention == "dot_product"
  assert build(quantization="int8", checkpoint_is_quantized=True, program="decode").checkpoint_is_quantized
  assert build(attention="paged", program="serve").attention == "paged"
  assert build(attention="paged", **MLA).attention_type == "mla"  # the paged cache holds MLA's latent cache


def test_family_validation_hook_is_called(monkeypatch):
  from MaxText import models  # pylint: disable=import-outside-toplevel

  def refuse(values):
    raise ConfigError(f"decoder_block: {values['decoder_block']} refuses")

  monkeypatch.setattr(models, "validate_config", refuse, raising=False)
  assert error_of().startswith("decoder_block: llama2 refuses")


# ---------------------------------------------------------------- backend ops resolved from `hardware`


def test_backend_ops_resolve_for_cpu():
  config = build()
  assert config.hardware == "cpu"
  assert (config.dense_matmul_backward, config.head_loss, config.attention_causal_blocks) == ("explicit", "fused", 4)
  config = build(dense_matmul_backward="autodiff", head_loss="logits", attention_causal_blocks=2)
  assert (config.dense_matmul_backward, config.head_loss, config.attention_causal_blocks) == ("autodiff", "logits", 2)


def test_backend_ops_resolve_for_accelerators(monkeypatch):
  monkeypatch.setattr(pyconfig.distributed, "detect_hardware", lambda requested: "gpu")
  config = build()
  assert (config.dense_matmul_backward, config.head_loss, config.attention_causal_blocks) == ("autodiff", "logits", 1)


@pytest.mark.parametrize("axis", ["ici_sequence_parallelism", "ici_context_parallelism"])
def test_causal_blocks_are_one_under_sequence_parallelism(axis):
  assert build(**{axis: 2, "ici_fsdp_parallelism": -1, "attention_causal_blocks": 4}).attention_causal_blocks == 1
  assert build(**{axis: 1}).attention_causal_blocks == 4


# ---------------------------------------------------------------- one declaration per key


def test_base_yml_and_reference_are_generated_from_the_declarations():
  for path, render in declared.GENERATED:
    assert path.read_text() == render(), f"{path} is stale: run python3 -m MaxText.config --write"


def test_config_reference_lists_every_key_the_loader_reads_with_its_default():
  """docs/config_reference.md's tables, parsed as markdown, against base.yml parsed as YAML (what pyconfig loads)."""
  base = yaml.safe_load(declared.BASE_YML.read_text())
  reference = declared.REFERENCE_MD.read_text()
  documented = {}
  for line in reference.splitlines():
    cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
    if len(cells) == 4 and cells[0].startswith("`"):
      documented[cells[0].strip("`")] = yaml.safe_load(cells[2].strip("`").replace("\\|", "|"))
  assert documented.keys() == base.keys()
  assert {k: v for k, v in documented.items() if v != base[k]} == {}
  derived = pyconfig.initialize(["", str(declared.BASE_YML)])
  for name in declared.DERIVED:
    assert f"| `{name}` |" in reference and hasattr(derived, name), name


def test_every_key_is_declared_with_a_doc_and_a_valid_default():
  for name, key in {**declared.KEYS, **declared.DERIVED}.items():
    assert key.doc.strip(), name
  for name, key in declared.KEYS.items():
    assert key.field.coerce(name, key.default) == key.default


def test_every_resolved_value_is_declared_with_its_type():
  config = build()
  assert set(config.keys()) == set(declared.KEYS) | set(declared.DERIVED)
  for name, derived in declared.DERIVED.items():
    assert isinstance(getattr(config, name), derived.kind), name


def test_model_keys_are_the_architecture_declarations():
  from MaxText.utils.ckpt_conversion import to_maxtext  # pylint: disable=import-outside-toplevel

  assert to_maxtext.MODEL_KEYS == declared.MODEL_KEYS
  assert {"decoder_block", "base_emb_dim", "num_experts", "attention_type", "rope_type"} <= set(declared.MODEL_KEYS)
  assert not {"steps", "attention", "dtype", "quantization"} & set(declared.MODEL_KEYS)


def test_layer_tables_use_the_declared_choices():
  # pylint: disable=import-outside-toplevel,protected-access
  from MaxText.layers import decoders, embeddings, linears, normalizations, quantization

  assert set(decoders.REMAT_POLICIES) == set(declared.choices("remat_policy"))
  assert set(linears._ACTIVATIONS) == set(declared.model.ACTIVATIONS)
  assert set(normalizations.NORMS) == set(declared.choices("normalization_type"))
  assert embeddings.ROPE_TYPES == declared.choices("rope_type")
  assert quantization.MODES == tuple(m for m in declared.choices("quantization") if m)


def test_config_package_imports_no_jax_or_flax():
  code = "import sys; import MaxText.config; print(sorted(m for m in ('jax', 'flax') if m in sys.modules))"
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "[]"
