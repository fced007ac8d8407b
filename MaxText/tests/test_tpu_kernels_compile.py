"""The TPU kernels compile with the real TPU compiler (libtpu) for real slices, from a CPU host: splash attention
(attention=flash: causal, packed segments, sliding window, under fsdp x tensor sharding), the megablox grouped
matmul of the dropless MoE, and the paged-attention decode kernel. Each test checks the optimized HLO holds the
Pallas kernel (a `tpu_custom_call` of that kernel), so a silent fallback to the portable path fails it."""

import os
import re

import pytest

pytest.importorskip("libtpu")
# Several test processes (pytest-xdist workers) may load libtpu at once; it only compiles here.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

# pylint: disable=wrong-import-position
from MaxText import decode_compile, pyconfig, train_compile
from MaxText.config_schema import ConfigError

TINY = (
    "base_emb_dim=256",
    "base_num_query_heads=4",
    "base_num_kv_heads=2",
    "head_dim=128",
    "base_mlp_dim=512",
    "base_num_decoder_layers=2",
    "max_target_length=256",
    "vocab_size=1024",
    "per_device_batch_size=1",
    "log_config=false",
)


def config(tmp_path, *args):
  return pyconfig.initialize(["", "MaxText/configs/base.yml", f"base_output_directory={tmp_path}", *TINY, *args])


def custom_calls(hlo: str) -> list[str]:
  """Names of the Pallas (Mosaic) kernels the optimized HLO calls."""
  return [m.group(1) for m in re.finditer(r"%([\w.-]+) = [^\n]*custom_call_target=\"tpu_custom_call\"", hlo)]


def compile_train(cfg):
  compiled, _ = train_compile.compile_train_step(cfg)
  assert compiled.memory_analysis().temp_size_in_bytes > 0
  return compiled.as_text()


def test_flash_train_step_compiles_with_splash_kernel(tmp_path):
  # Sliding-window layers alternating with global ones (a traced per-layer flag picks one of two kernels).
  extra = ("ici_fsdp_parallelism=4", "ici_tensor_parallelism=2", "sliding_window_size=128", "sliding_window_pattern=2")
  hlo = compile_train(config(tmp_path, "compile_topology=v5e-8", "attention=flash", *extra))
  calls = custom_calls(hlo)
  # The train batch is packed (inputs_segmentation): the segmented kernels, forward and both backward passes.
  for kernel in ("splash_mha_fwd_segmented", "splash_mha_dq_segmented", "splash_mha_dkv_segmented"):
    assert any(c.startswith(kernel) for c in calls), (kernel, calls)
  # shard_map hands the kernel one device's rows and heads: batch 8 / fsdp 4, 4 query heads / tensor 2.
  assert re.search(r"splash_mha_fwd_segmented\S* = \(f32\[2,256,128\]", hlo)


def test_flash_mla_train_step_compiles_with_splash_kernel(tmp_path):
  """DeepSeek's MLA (192-wide query/key heads, 128-wide values padded to them) takes the splash kernel too."""
  cfg = pyconfig.initialize(
      [
          "",
          "MaxText/configs/base.yml",
          f"base_output_directory={tmp_path}",
          "model_name=tests/tiny-deepseek3",
          "max_target_length=256",
          "per_device_batch_size=1",
          "log_config=false",
          "compile_topology=v5e-8",
          "attention=flash",
          "moe_grouped_matmul=ragged_dot",  # the tiny experts' 64-wide MLP is below megablox's 128-lane tiles
      ]
  )
  calls = custom_calls(compile_train(cfg))
  for kernel in ("splash_mha_fwd_segmented", "splash_mha_dq_segmented", "splash_mha_dkv_segmented"):
    assert any(c.startswith(kernel) for c in calls), (kernel, calls)


def test_flash_sequence_the_kernel_cannot_tile_is_a_config_error(tmp_path):
  with pytest.raises(ConfigError, match=r"max_target_length: attention=flash: sequence length 200 is not a multiple"):
    config(tmp_path, "compile_topology=v5e-8", "attention=flash", "max_target_length=200")


MOE = (
    "num_experts=4",
    "num_experts_per_tok=2",
    "moe_mlp_dim=256",
    "base_num_decoder_layers=1",
    "mlp_activations=['silu','linear']",
)


def test_dropless_moe_train_step_compiles_megablox_expert_parallel(tmp_path):
  cfg = config(
      tmp_path, "compile_topology=v5p-8", "ici_fsdp_parallelism=2", "ici_expert_parallelism=2", "dtype=bfloat16", *MOE
  )
  hlo = compile_train(cfg)
  calls = custom_calls(hlo)
  # moe_grouped_matmul=auto is megablox on TPU: gmm forward and input gradient, tgmm for the weight gradient.
  assert any("gmm" in c and "tgmm" not in c for c in calls) and any("tgmm" in c for c in calls), calls
  assert "ragged-dot" not in hlo


def test_dropless_moe_too_narrow_for_megablox_compiles_ragged_dot(tmp_path):
  """auto takes ragged_dot where megablox's 128-lane tiles do not fit the expert MLP (the TPU compiler rejects the
  kernel's block shapes there); asking for megablox is a config error naming the width."""
  narrow = (*MOE, "moe_mlp_dim=64")
  cfg = config(tmp_path, "compile_topology=v5p-8", "ici_fsdp_parallelism=2", "ici_expert_parallelism=2", *narrow)
  assert cfg.moe_grouped_matmul == "ragged_dot"
  hlo = compile_train(cfg)
  assert not [c for c in custom_calls(hlo) if "gmm" in c]
  with pytest.raises(ConfigError, match=r"^moe_grouped_matmul: megablox cannot tile this MoE: each device's expert"):
    config(tmp_path, "compile_topology=v5p-8", "moe_grouped_matmul=megablox", *narrow)
  # 256 columns are 64 per device over tensor=4.
  with pytest.raises(ConfigError, match=r"expert MLP columns \(256 / 4 devices\) are not a multiple of 128"):
    config(tmp_path, "compile_topology=v5p-8", "ici_tensor_parallelism=4", "moe_grouped_matmul=megablox", *MOE)
  assert config(tmp_path, "compile_topology=v5p-8", "ici_tensor_parallelism=4", *MOE).moe_grouped_matmul == "ragged_dot"


def test_paged_generate_step_compiles_with_tpu_kernel(tmp_path):
  cfg = config(
      tmp_path,
      "compile_topology=v5e-8",
      "ici_fsdp_parallelism=4",
      "ici_tensor_parallelism=2",
      "attention=paged",
      "dtype=bfloat16",
      "max_prefill_predict_length=128",
  )
  result = decode_compile.compile_decode(cfg, programs=("generate",))
  assert result.engine.page_spec.kernel == "pallas" and result.engine.page_spec.platform == "tpu"
  compiled = result.compiled["generate"]
  assert compiled.memory_analysis().argument_size_in_bytes > 0
  assert any("paged_attention" in c for c in custom_calls(compiled.as_text()))
