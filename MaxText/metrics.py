"""Training metrics: analytic FLOPs, device peaks, and the writers (stdout line, TensorBoard, JSON lines)."""

import json
import logging
import math
import os
from typing import Any, Optional

import jax

from MaxText.layers.decoders import moe_layer_flags

logger = logging.getLogger("MaxText")

# Dense bf16 peak TFLOP/s per device, from vendor data sheets; MFU is reported against these.
_PEAK_TFLOPS = {
    "H100": 989.0,
    "H200": 989.0,
    "B200": 2250.0,
    "A100": 312.0,
    "L4": 121.0,
    "TPU v4": 275.0,
    "TPU v5 lite": 197.0,
    "TPU v5e": 197.0,
    "TPU v5p": 459.0,
    "TPU v5": 459.0,
    "TPU v6 lite": 918.0,
    "TPU v6e": 918.0,
}


# Peak HBM bandwidth GB/s per device (data sheets): the roofline of memory-bound decoding. More specific names first.
_HBM_GBPS = {
    "H100 PCIe": 2000.0,
    "H100": 3350.0,
    "H200": 4800.0,
    "B200": 8000.0,
    "A100": 2039.0,
    "L4": 300.0,
    "TPU v4": 1200.0,
    "TPU v5 lite": 819.0,
    "TPU v5e": 819.0,
    "TPU v5p": 2765.0,
    "TPU v5": 2765.0,
    "TPU v6 lite": 1640.0,
    "TPU v6e": 1640.0,
}


def device_hbm_gbps(device_kind: str) -> Optional[float]:
  """Data-sheet HBM bandwidth (GB/s) of a device kind, or None when unknown (e.g. a CPU)."""
  for name, gbps in _HBM_GBPS.items():
    if name.lower() in device_kind.lower():
      return gbps
  return None


def device_peak_tflops(config) -> Optional[float]:
  """The per-device peak for MFU: `device_peak_tflops` if set, else the data-sheet value, else None."""
  if config.device_peak_tflops > 0:
    return config.device_peak_tflops
  kind = jax.devices()[0].device_kind
  for name, peak in _PEAK_TFLOPS.items():
    if name.lower() in kind.lower():
      return peak
  return None


def training_tflops_per_device(config) -> tuple[float, float, float]:
  """Analytic TFLOPs of one optimizer step per device: (total, learnable-weight matmuls, attention).

  Matmuls count 2 FLOPs per multiply-add and x3 for forward + backward; causal attention scores and
  the weighted sum count half of the full square. Remat recomputation is not counted (model FLOPs).
  """
  tokens = config.global_batch_size_to_train_on * config.max_target_length
  emb = config.emb_dim
  mlp = 2 * tokens * emb * config.mlp_dim * (len(config.mlp_activations) + 1)
  num_moe = sum(moe_layer_flags(config))
  projections, attention = _attention_flops_per_layer(config, tokens)
  logits = 2 * tokens * emb * config.vocab_size
  weights = mlp * (config.num_decoder_layers - num_moe) + _moe_flops_per_layer(config, tokens) * num_moe
  weights += projections * config.num_decoder_layers + logits
  attention *= config.num_decoder_layers
  weights_tflops = 3 * weights / 1e12 / config.num_devices
  attention_tflops = 3 * attention / 1e12 / config.num_devices
  return weights_tflops + attention_tflops, weights_tflops, attention_tflops


def _moe_flops_per_layer(config, tokens: int) -> float:
  """Forward FLOPs of one MoE layer: the router, the k active routed experts and the shared experts per token.

  Capacity padding and dropped tokens are not counted (model FLOPs of the tokens actually routed).
  """
  emb, gated = config.emb_dim, len(config.mlp_activations) + 1
  router = 2 * tokens * emb * config.num_experts
  active = config.num_experts_per_tok + config.shared_experts
  return router + 2 * tokens * emb * config.moe_mlp_dim * gated * active


def _attention_flops_per_layer(config, tokens: int) -> tuple[float, float]:
  """Forward FLOPs of one layer's attention: (weight matmuls, QK^T + AV with the causal half counted).

  QK^T and AV are 2 FLOPs x S^2 x heads x (query/key dim resp. value dim) per sequence, halved for the causal mask.
  MLA (attention_type: mla) counts its low-rank projections and its expanded heads (the training formulation).
  """
  emb, heads, seq = config.emb_dim, config.num_query_heads, config.max_target_length
  if config.attention_type == "mla":
    qk_dim, v_dim = config.qk_nope_head_dim + config.qk_rope_head_dim, config.v_head_dim
    if config.q_lora_rank > 0:
      query = emb * config.q_lora_rank + config.q_lora_rank * heads * qk_dim
    else:
      query = emb * heads * qk_dim
    latent = emb * (config.kv_lora_rank + config.qk_rope_head_dim)
    expand = config.kv_lora_rank * heads * (config.qk_nope_head_dim + v_dim)
    projections = 2 * tokens * (query + latent + expand + heads * v_dim * emb)
    return projections, 2 * tokens * seq * heads * (qk_dim + v_dim) / 2
  hd, kv = config.head_dim, config.num_kv_heads
  projections = 2 * tokens * emb * (heads + 2 * kv) * hd + 2 * tokens * heads * hd * emb
  return projections, 2 * 2 * tokens * seq * heads * hd / 2


class MetricLogger:
  """Writes one step's metrics to stdout, TensorBoard and JSON lines (process 0 only)."""

  def __init__(self, config, tflops_per_step: float):
    self.config = config
    self.tflops_per_step = tflops_per_step
    self.peak = device_peak_tflops(config)
    self.is_primary = jax.process_index() == 0
    self.tokens_per_step = config.global_batch_size_to_train_on * config.max_target_length
    self._tb = None
    self._json_files = []
    if not self.is_primary:
      return
    if config.enable_tensorboard:
      from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel

      self._tb = SummaryWriter(config.tensorboard_dir)
    paths = []
    if config.write_metrics_to_run_dir:
      paths.append(os.path.join(config.metrics_dir, "metrics.jsonl"))
    if config.metrics_file:
      paths.append(config.metrics_file)
    for path in paths:
      os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
      self._json_files.append(open(path, "a", encoding="utf-8"))

  def perf(self, step_seconds: float) -> dict[str, float]:
    tflops_per_sec = self.tflops_per_step / step_seconds
    out = {
        "perf/step_time_seconds": step_seconds,
        "perf/per_device_tflops": self.tflops_per_step,
        "perf/per_device_tflops_per_sec": tflops_per_sec,
        "perf/per_device_tokens_per_sec": self.tokens_per_step / step_seconds / self.config.num_devices,
    }
    if self.peak:
      out["perf/mfu"] = tflops_per_sec / self.peak
    return out

  def log_step(self, step: int, metrics: dict[str, Any], step_seconds: float):
    """`metrics` are host values of one step (already fetched from device)."""
    record = {"step": step, **{k: float(v) for k, v in metrics.items()}, **self.perf(step_seconds)}
    if not self.is_primary:
      return record
    line = (
        f"completed step: {step}, seconds: {step_seconds:.3f}, "
        f"TFLOP/s/device: {record['perf/per_device_tflops_per_sec']:.3f}, "
        f"Tokens/s/device: {record['perf/per_device_tokens_per_sec']:.3f}, "
        f"total_weights: {int(record['learning/total_weights'])}, loss: {record['learning/loss']:.3f}"
    )
    if "perf/mfu" in record:
      line += f", MFU: {100 * record['perf/mfu']:.2f}%"
    if "learning/moe_lb_loss" in record:
      line += f", moe_lb_loss: {record['learning/moe_lb_loss']:.4f}"
    if "learning/moe_max_load_ratio" in record:
      line += f", moe_max_load_ratio: {record['learning/moe_max_load_ratio']:.2f}"
    print(line, flush=True)
    self.write(step, record)
    return record

  def write(self, step: int, record: dict[str, Any]):
    if not self.is_primary:
      return
    if self._tb is not None:
      for key, value in record.items():
        if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
          self._tb.add_scalar(key, value, step)
      if step % self.config.log_period == 0:
        self._tb.flush()
    for f in self._json_files:
      f.write(json.dumps({"step": step, **{k: v for k, v in record.items() if k != "step"}}) + "\n")
      f.flush()

  def close(self):
    if self._tb is not None:
      self._tb.close()
    for f in self._json_files:
      f.close()
    self._json_files = []
