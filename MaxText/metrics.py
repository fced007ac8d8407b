"""Training metrics: analytic FLOPs, device peaks, and the writers (stdout line, TensorBoard, JSON lines)."""

import json
import logging
import math
import os
from typing import Any, Optional

import jax

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
  emb, hd = config.emb_dim, config.head_dim
  q, kv = config.num_query_heads, config.num_kv_heads
  mlp = 2 * tokens * emb * config.mlp_dim * (len(config.mlp_activations) + 1)
  qkv = 2 * tokens * emb * (q + 2 * kv) * hd
  out = 2 * tokens * q * hd * emb
  logits = 2 * tokens * emb * config.vocab_size
  weights = (mlp + qkv + out) * config.num_decoder_layers + logits
  # QK^T and AV: 2 matmuls x 2 FLOPs x S^2 x heads x head_dim per sequence, halved for the causal mask.
  attention = 2 * 2 * tokens * config.max_target_length * q * hd / 2 * config.num_decoder_layers
  weights_tflops = 3 * weights / 1e12 / config.num_devices
  attention_tflops = 3 * attention / 1e12 / config.num_devices
  return weights_tflops + attention_tflops, weights_tflops, attention_tflops


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
