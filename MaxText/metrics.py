"""Training metrics: analytic FLOPs, device peaks, and the writers (stdout line, TensorBoard, JSON lines).

The TensorBoard directory and the JSON-lines files may be in a bucket (gs://, s3://, ...). Objects there cannot be
appended to, and tensorboardX's own gs:// writer re-uploads its whole event file on every flush (bytes uploaded
grow with the square of the run's length). Here, every log_period steps, TensorBoard events go up as a new event
file holding only the events since the last flush (TensorBoard reads all event files of a directory, in name
order), and JSON lines are appended with GCS compose (only the new lines travel; other schemes rewrite the file).
"""

import json
import logging
import math
import os
import shutil
import tempfile
import time
import uuid
from typing import Any, Optional

import jax

from MaxText import storage
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


class _BucketEventWriter:
  """TensorBoard scalars for a directory in a bucket, uploaded in pieces that are never rewritten.

  Events are written by a local tensorboardX writer; `flush` closes its file (so it holds every event) and
  uploads it as `<bucket dir>/events.out.tfevents.<s>.<host>.<µs>`; the next event opens a new piece.
  """

  def __init__(self, url: str):
    self.url = url
    self._dir = storage.as_path(url)
    self._local = tempfile.mkdtemp(prefix="maxtext-tensorboard-")
    self._writer = None
    self._last_us = 0

  def add_scalar(self, key: str, value: float, step: int):
    if self._writer is None:
      from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel

      # tensorboardX names files by the second: a microsecond suffix keeps pieces (of this run or of a resumed one
      # that starts within the same second) apart and in the order TensorBoard must read them.
      self._last_us = max(time.time_ns() // 1000, self._last_us + 1)
      self._writer = SummaryWriter(self._local, filename_suffix=f".{self._last_us}")
    self._writer.add_scalar(key, value, step)

  def flush(self):
    if self._writer is None:
      return
    self._writer.close()
    self._writer = None
    for name in sorted(os.listdir(self._local)):
      local = os.path.join(self._local, name)
      with open(local, "rb") as f:
        (self._dir / name).write_bytes(f.read())
      os.remove(local)

  def close(self):
    self.flush()  # on failure the local pieces stay
    shutil.rmtree(self._local, ignore_errors=True)

  def unwritten(self) -> str:
    return f"their events stay in {self._local}"


class _BucketAppender:
  """A text file in a bucket, appended to at each `flush` (gs://: GCS compose, so only the new bytes travel)."""

  def __init__(self, url: str):
    import fsspec  # pylint: disable=import-outside-toplevel

    self.url = url
    self._fs, self._path = fsspec.core.url_to_fs(url)
    self._compose = storage.scheme(url) in ("gs", "gcs")
    self._pending: list[str] = []

  def write(self, text: str):
    self._pending.append(text)

  def flush(self):
    if not self._pending:
      return
    data = "".join(self._pending).encode("utf-8")
    if not self._fs.exists(self._path):
      self._fs.pipe_file(self._path, data)
    elif self._compose:
      piece = f"{self._path}.append-{uuid.uuid4().hex}"
      self._fs.pipe_file(piece, data)
      self._fs.merge(self._path, [self._path, piece])
      self._fs.rm_file(piece)
    else:  # no server-side append: rewrite (fine for metrics files, a few hundred bytes per step)
      self._fs.pipe_file(self._path, self._fs.cat_file(self._path) + data)
    self._pending = []

  def close(self):
    self.flush()

  def unwritten(self) -> str:
    return f"{len(self._pending)} lines are lost"


def _flush_remote(writer, closing: bool = False):
  """Flushes a bucket writer; a failed upload warns (and is retried at the next flush) instead of ending the run."""
  try:
    if closing:
      writer.close()
    else:
      writer.flush()
  except Exception as e:  # pylint: disable=broad-exception-caught  # fsspec clients raise many types
    then = writer.unwritten() if closing else "retrying at the next flush"
    logger.warning("Metrics: cannot write to %s (%s); %s", writer.url, storage.describe_failure(writer.url, e), then)


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
    paths = []
    if config.write_metrics_to_run_dir:
      paths.append(("base_output_directory", storage.join(config.metrics_dir, "metrics.jsonl")))
    if config.metrics_file:
      paths.append(("metrics_file", config.metrics_file))
    for key, path in paths:
      if storage.is_remote(path):
        # Fail now, naming the key, rather than at the first flush with steps already trained.
        storage.check_writable(key, path.rsplit("/", 1)[0], probe_name=f".{os.path.basename(path)}.probe")
        self._json_files.append(_BucketAppender(path))
      else:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._json_files.append(open(path, "a", encoding="utf-8"))
    if config.enable_tensorboard:
      if storage.is_remote(config.tensorboard_dir):
        self._tb = _BucketEventWriter(config.tensorboard_dir)
      else:
        from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel

        self._tb = SummaryWriter(config.tensorboard_dir)

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
    flush_now = step % self.config.log_period == 0
    if self._tb is not None:
      for key, value in record.items():
        if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
          self._tb.add_scalar(key, value, step)
      if flush_now:
        if isinstance(self._tb, _BucketEventWriter):
          _flush_remote(self._tb)
        else:
          self._tb.flush()
    for f in self._json_files:
      f.write(json.dumps({"step": step, **{k: v for k, v in record.items() if k != "step"}}) + "\n")
      if not isinstance(f, _BucketAppender):
        f.flush()
      elif flush_now:  # bucket objects in pieces, every log_period steps
        _flush_remote(f)

  def close(self):
    for f in [self._tb] * (self._tb is not None) + self._json_files:
      if isinstance(f, (_BucketEventWriter, _BucketAppender)):
        _flush_remote(f, closing=True)
      else:
        f.close()
    self._tb = None
    self._json_files = []
