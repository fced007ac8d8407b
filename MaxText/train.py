"""Trains a decoder-only LM: `python3 -m MaxText.train MaxText/configs/base.yml key=value ...`.

The loop around the compiled step (MaxText/training.py: a pure function of (state, batch), jit-compiled with
explicit in/out shardings and a donated state, whose params are a pure dict that nnx.merge turns back into the
model inside the step): checks before anything compiles, resume or initialization, metrics fetched one step late
so logging never stalls the device queue, checkpoints, eval and preemption-safe stops.
"""

import functools
import logging
import os
import shutil
import signal
import sys
import threading
import time
from typing import Any, Optional, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from MaxText import checkpointing, input_pipeline, metrics, pyconfig, sharding, startup, storage, training
from MaxText.config_schema import ConfigError
from MaxText.layers import decoders, pipeline

logger = logging.getLogger("MaxText")


class NaNLossError(RuntimeError):
  """The loss became NaN/Inf; the message names the step."""


class StopRequest:
  """SIGTERM/SIGINT: finish the current step, checkpoint, and exit 0 so the run can resume.

  With several processes every one must stop after the same step, so the decision comes from JAX's
  preemption sync point (the coordination service catches SIGTERM on any host and agrees on a step);
  a single process uses a plain signal handler for SIGTERM and SIGINT.
  """

  def __init__(self):
    self.signum = None
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      signals = (signal.SIGINT,) if jax.process_count() > 1 else (signal.SIGTERM, signal.SIGINT)
      for sig in signals:
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  def _handle(self, signum, _frame):
    if self.signum is not None:  # a second signal: stop now, as the default handler would
      raise KeyboardInterrupt
    self.signum = signum
    logger.warning("Received %s: finishing the current step and saving a checkpoint", signal.Signals(signum).name)

  def should_stop(self, step: int) -> bool:
    if jax.process_count() > 1:
      if multihost_utils.reached_preemption_sync_point(step):
        self.signum = self.signum or signal.SIGTERM
        return True
      return False
    return self.signum is not None


# ----------------------------------------------------------------------------- loop


def _check_output_dir(config):
  """Fails before any compile if the run directory cannot be written (and records the config there)."""
  if storage.is_remote(config.run_dir):  # gs://...: missing bucket, no credentials -> one CONFIG ERROR
    storage.check_writable("base_output_directory", config.run_dir, f".write_probe_{jax.process_index()}")
    return
  try:
    os.makedirs(config.run_dir, exist_ok=True)
    probe = os.path.join(config.run_dir, f".write_probe_{jax.process_index()}")
    with open(probe, "w", encoding="utf-8") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise ConfigError(f"base_output_directory: cannot write to {config.run_dir}: {e.strerror or e}") from None


def _check_free_space(config, state_bytes: int):
  """A checkpoint that cannot fit would fail mid-run: say so before training starts."""
  if not config.enable_checkpointing or storage.is_remote(config.run_dir):
    return
  free = shutil.disk_usage(config.run_dir).free
  need = state_bytes // max(jax.process_count(), 1)
  if free < need:
    raise ConfigError(
        f"base_output_directory: {config.run_dir} has {free / 2**30:.2f} GiB free, but one checkpoint of this"
        f" run needs about {need / 2**30:.2f} GiB"
    )


def _write_config(config):
  if config.save_config_to_output and jax.process_index() == 0:
    storage.as_path(storage.join(config.run_dir, "config.yml")).write_text(config.to_yaml())


def _restore_or_init(setup: training.TrainSetup, manager, train_iter):
  """(state, start_step): resume the run if it has a committed checkpoint, else load or init."""
  config = setup.config
  if manager is not None:
    state, step = checkpointing.restore_latest(manager, setup.abstract_state, setup.state_shardings, train_iter)
    if state is not None:
      logger.info("Resuming run %s from step %d", config.run_name, step)
      return state, step
  if setup.lora:  # fresh adapters; the base is setup.load_frozen()'s
    return setup.init_state(), 0
  if config.checkpoint_path:
    path = checkpointing.resolve(config.checkpoint_path)
    if checkpointing.holds_full_state(path):
      logger.info("Loading full state from %s (checkpoint_path)", path)
      state = checkpointing.load_full_state(path, setup.abstract_state, setup.state_shardings)
      return state, int(state["step"])
    logger.info("Loading parameters from %s (checkpoint_path; fresh optimizer, step 0)", path)
    params = checkpointing.load_params(
        path, setup.abstract_state["params"], setup.param_shardings, config.param_scan_axis
    )
    return setup.state_from_params(params), 0
  if config.load_full_state_path:
    logger.info("Loading full state from %s", config.load_full_state_path)
    state = checkpointing.load_full_state(config.load_full_state_path, setup.abstract_state, setup.state_shardings)
    return state, int(state["step"])
  if config.load_parameters_path:
    logger.info("Loading parameters from %s (fresh optimizer, step 0)", config.load_parameters_path)
    params = checkpointing.load_params(
        config.load_parameters_path, setup.abstract_state["params"], setup.param_shardings, config.param_scan_axis
    )
    return setup.state_from_params(params), 0
  return setup.init_state(), 0


def _run_eval(config, evaluate, params, eval_iter, step, logger_):
  if eval_iter is None:
    return None
  if hasattr(eval_iter, "reset"):
    eval_iter.reset()
  loss_sum, weights = 0.0, 0.0
  for _ in range(config.eval_steps):
    try:
      batch = next(eval_iter)
    except StopIteration:
      break
    out = jax.device_get(evaluate(params, batch))
    loss_sum += float(out["eval/loss_sum"])
    weights += float(out["eval/total_weights"])
  loss = loss_sum / max(weights, 1.0)
  if jax.process_index() == 0:
    print(f"eval at step {step}: loss: {loss:.3f}, total_weights: {int(weights)}", flush=True)
  logger_.write(step, {"eval/loss": loss, "eval/total_weights": weights})
  return loss


def _log_startup(config, setup: training.TrainSetup, tflops, compiled):
  total, weights, attention = tflops
  n_params = setup.num_params + setup.num_frozen
  logger.info("Model %s: %s parameters (%.3f B)", config.model_name, f"{n_params:,}", n_params / 1e9)
  if setup.lora:
    logger.info(
        "LoRA rank %d on %s: %s trainable parameters (%.3f%%); the base is frozen",
        config.lora_rank,
        ",".join(config.lora_target_modules),
        f"{setup.num_params:,}",
        100 * setup.num_params / n_params,
    )
  logger.info(
      "Per-device TFLOPs per step: %.4f (weight matmuls %.4f, attention %.4f; %.1f%% attention)",
      total,
      weights,
      attention,
      100 * attention / total,
  )
  mem = compiled.memory_analysis()
  if mem is not None:
    gib = 1 / 2**30
    logger.info(
        "Compiled train step memory per device: arguments %.3f GiB, outputs %.3f GiB, temps %.3f GiB, aliased %.3f GiB",
        mem.argument_size_in_bytes * gib,
        mem.output_size_in_bytes * gib,
        mem.temp_size_in_bytes * gib,
        mem.alias_size_in_bytes * gib,
    )


def train(config) -> list[dict[str, Any]]:
  """Runs the training loop; returns each logged step's metrics (host floats)."""
  if (config.checkpoint_is_quantized and not config.lora_rank) or config.save_quantized_params_path:
    key = "checkpoint_is_quantized" if config.checkpoint_is_quantized else "save_quantized_params_path"
    raise ConfigError(f"{key}: a decode key (int8 params cannot be trained); train with quantization=... alone")
  _check_output_dir(config)
  if config.lora_rank and config.checkpoint_path:
    raise ConfigError("checkpoint_path: with lora_rank the base is load_parameters_path (adapters resume with run_name)")
  if config.checkpoint_path:  # before any compile: a missing bucket / step is one CONFIG ERROR
    from MaxText.inference import loading  # pylint: disable=import-outside-toplevel

    loading.checkpoint_path_source(config.checkpoint_path)
  pyconfig.log_config(config)
  _write_config(config)
  mesh = sharding.create_mesh(config)
  logger.info("Mesh: %s on %d %s devices", dict(mesh.shape), config.num_devices, config.hardware)
  schedule = decoders.pipeline_schedule(config)
  if schedule is not None:
    logger.info(pipeline.describe(schedule, config.micro_batch_size_to_train_on))
  history: list[dict[str, Any]] = []
  setup = training.TrainSetup(config, mesh)
  _check_free_space(config, setup.state_bytes)
  with sharding.use_mesh(mesh, config.logical_axis_rules):
    train_iter, eval_iter = input_pipeline.create_data_iterators(config, mesh)
    manager = checkpointing.create_manager(config)
    state, start_step = _restore_or_init(setup, manager, train_iter)
    if start_step >= config.steps:
      logger.info("Run %s is already at step %d (steps=%d): nothing to train", config.run_name, start_step, config.steps)
      if manager is not None:
        manager.close()
      return history
    first_batch = next(train_iter)
    step_fn, evaluate, _ = training.compile_train_step(setup, first_batch)
    tflops = metrics.training_tflops_per_device(config)
    frozen = (setup.load_frozen(),) if setup.has_frozen else ()
    if config.compiled_trainstep_file:
      compiled = training.load_compiled_step(config.compiled_trainstep_file, (state, first_batch) + frozen)
    else:
      compiled = step_fn.lower(state, first_batch, *frozen).compile()
    _log_startup(config, setup, tflops, compiled)
    metric_logger = metrics.MetricLogger(config, tflops[0])
    if setup.has_frozen:
      compiled = functools.partial(_with_frozen, compiled, frozen)
      evaluate = functools.partial(_with_frozen, evaluate, frozen)
    loop = TrainLoop(config, compiled, evaluate, manager, metric_logger, train_iter, eval_iter)
    try:
      history = loop.run(state, start_step, first_batch)
    finally:
      metric_logger.close()
      if manager is not None:
        manager.wait_until_finished()
        manager.close()
  return history


def _with_frozen(fn, frozen, state_or_params, batch):
  return fn(state_or_params, batch, *frozen)


class TrainLoop:
  """Runs compiled steps, logs metrics one step late, checkpoints, evaluates, and honours stop requests."""

  def __init__(self, config, step_fn, evaluate, manager, metric_logger, train_iter, eval_iter):
    self.config, self.step_fn, self.evaluate = config, step_fn, evaluate
    self.manager, self.metric_logger = manager, metric_logger
    self.train_iter, self.eval_iter = train_iter, eval_iter
    self.history: list[dict[str, Any]] = []
    self.pending: Optional[tuple[int, Any]] = None  # (step, device metrics) not fetched yet
    self.last_time = time.perf_counter()
    self.done = self.last_saved = 0
    self.profiling = False

  def flush(self):
    """Fetches the pending step's metrics (waiting for that step only), checks them and logs them."""
    if self.pending is None:
      return
    (step, device_metrics), self.pending = self.pending, None
    host = jax.device_get(device_metrics)
    now = time.perf_counter()
    step_seconds, self.last_time = now - self.last_time, now
    if self.config.abort_on_nan_loss:
      hint = "stopping (abort_on_nan_loss=false continues)"
      if not np.isfinite(host["learning/loss"]):
        raise NaNLossError(f"loss is {host['learning/loss']} at step {step}; {hint}")
      if not np.isfinite(host["learning/param_norm"]):  # a finite loss can still yield an overflowing update
        raise NaNLossError(f"parameters became non-finite in step {step}; {hint}")
    self.history.append(self.metric_logger.log_step(step, host, step_seconds))

  def save(self, state):
    if self.manager is not None and self.done != self.last_saved:
      self.flush()  # never checkpoint a state produced by a NaN step
      checkpointing.save(self.manager, self.done, state, self.train_iter)
      self.last_saved = self.done

  def _profile(self, step: int, state, start_step: int):
    first = start_step + self.config.skip_first_n_steps_for_profiler
    if self.config.profiler and step == first:
      jax.profiler.start_trace(os.path.join(self.config.run_dir, "profile"))
      self.profiling = True
    elif self.profiling and step == first + self.config.profiler_steps:
      jax.block_until_ready(state)
      jax.profiler.stop_trace()
      self.profiling = False
      logger.info("Wrote profile to %s/profile", self.config.run_dir)

  def run(self, state, start_step: int, batch):
    config = self.config
    self.done = self.last_saved = start_step
    stop = StopRequest()
    with stop:
      for step in range(start_step, config.steps):
        self._profile(step, state, start_step)
        if batch is None:
          try:
            batch = next(self.train_iter)
          except StopIteration:
            logger.info("Training data exhausted after %d steps (num_epoch=%d); stopping", self.done, config.num_epoch)
            break
        state, device_metrics = self.step_fn(state, batch)
        batch = None
        self.flush()
        self.pending = (step, device_metrics)
        self.done = step + 1
        if self.done % config.checkpoint_period == 0:
          self.save(state)
        if config.eval_interval > 0 and self.done % config.eval_interval == 0:
          _run_eval(config, self.evaluate, state["params"], self.eval_iter, self.done, self.metric_logger)
        if stop.should_stop(step):
          break
    self.flush()
    self.save(state)
    if self.profiling:
      jax.profiler.stop_trace()
    if stop.signum is not None:
      where = f"{config.checkpoint_dir}/{self.done}" if self.manager is not None else "none (enable_checkpointing=false)"
      logger.warning(
          "Stopped by %s after step %d; checkpoint: %s. Run again with run_name=%s to resume.",
          signal.Signals(stop.signum).name,
          self.done,
          where,
          config.run_name,
      )
    return self.history


def main(argv: Sequence[str]):
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr, force=True)
  logging.getLogger("absl").setLevel(logging.WARNING)  # Orbax logs every file it writes at INFO
  config = startup.start(argv, "train")
  if config.process_index != 0:  # one process speaks for the job
    logging.getLogger("MaxText").setLevel(max(logging.WARNING, logging.getLogger("MaxText").level))
  try:
    train(config)
  except (ConfigError, checkpointing.CheckpointMismatchError, FileNotFoundError) as e:
    pyconfig.exit_with_config_error(e)
  except NaNLossError as e:
    print(f"ERROR: {e}", file=sys.stderr)
    sys.exit(3)


if __name__ == "__main__":
  main(sys.argv)
