"""Training metrics: analytic FLOPs, device peaks, and the writers (stdout line, TensorBoard, JSON lines)."""

import json
import logging
import math
import os
from typing import Any, Optional

import jax

from MaxText.layers import blocks, moe

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

  Each decoder block reports its forward FLOPs (blocks.forward_flops); matmuls count x3 for forward + backward.
  Remat recomputation is not counted (model FLOPs).
  """
  tokens = config.global_batch_size_to_train_on * config.max_target_length
  per_layer = [blocks.forward_flops(config, tokens, use_moe) for use_moe in moe.moe_layer_flags(config)]
  weights = sum(w for w, _ in per_layer) + 2 * tokens * config.emb_dim * config.vocab_size  # + the logits head
  attention = sum(a for _, a in per_layer)
  weights_tflops = 3 * weights / 1e12 / config.num_devices
  attention_tflops = 3 * attention / 1e12 / config.num_devices
  return weights_tflops + attention_tflops, weights_tflops, attention_tflops


# Metrics every train step reports; the stdout line appends any other learning/ metric the model adds.
_STANDARD = {
    "learning/loss",
    "learning/z_loss",
    "learning/total_weights",
    "learning/grad_norm",
    "learning/param_norm",
    "learning/current_learning_rate",
}


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
    for key in sorted(set(metrics) - _STANDARD):  # what the model reports besides the loss (e.g. MoE balance)
      if key.startswith("learning/"):
        line += f", {key[len('learning/'):]}: {record[key]:.4f}"
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
