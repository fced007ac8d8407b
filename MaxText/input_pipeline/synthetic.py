"""dataset_type=synthetic: deterministic, learnable batches that need no files.

Row r of step s is an arithmetic progression modulo vocab_size whose start and stride come from a generator
seeded with (data_shuffle_seed, stream, s, r). Keying on the *global* row index makes the global batch the same
whatever the process or device count, so a run on 1 device and on 2 processes sees identical data; the
progression is predictable after two tokens, so the loss visibly falls. The state is just the step number.
"""

from typing import Any

import numpy as np

from MaxText.input_pipeline import distributed_batch

_TRAIN_STREAM = 0
_EVAL_STREAM = 1
_MAX_STRIDE = 7


def synthetic_rows(seed: int, stream: int, step: int, rows, length: int, vocab_size: int) -> dict[str, np.ndarray]:
  """The given global rows of one step's batch, as numpy arrays keyed like a training batch."""
  tokens = np.empty((len(rows), length + 1), dtype=np.int64)
  ramp = np.arange(length + 1, dtype=np.int64)
  usable = max(vocab_size - 1, 1)  # id 0 stays free for padding
  for i, row in enumerate(rows):
    rng = np.random.default_rng([seed, stream, step, int(row)])
    start = rng.integers(0, usable)
    stride = rng.integers(1, _MAX_STRIDE + 1)
    tokens[i] = 1 + (start + stride * ramp) % usable
  positions = np.broadcast_to(np.arange(length, dtype=np.int32), (len(rows), length))
  ones = np.ones((len(rows), length), dtype=np.int32)
  return {
      "inputs": tokens[:, :-1],
      "inputs_position": positions,
      "inputs_segmentation": ones,
      "targets": tokens[:, 1:],
      "targets_position": positions,
      "targets_segmentation": ones,
  }


class SyntheticIterator(distributed_batch.BatchIterator):
  """Endless synthetic batches; resumable (state = next step) and rewindable."""

  def __init__(self, config, share: distributed_batch.ProcessShare, stream: int):
    self._seed = config.data_shuffle_seed
    self._vocab = config.vocab_size
    self._length = config.max_target_length
    self._share = share
    self._stream = stream
    self._step = 0

  def __next__(self):
    local = synthetic_rows(self._seed, self._stream, self._step, self._share.rows, self._length, self._vocab)
    self._step += 1
    return distributed_batch.to_global(self._share, local)

  def get_state(self) -> dict[str, Any]:
    return {"step": self._step}

  def set_state(self, state: dict[str, Any]) -> None:
    self._step = int(state["step"])

  def reset(self) -> None:
    self._step = 0


def make_iterators(config, mesh):
  """Train iterator, plus an eval iterator (its own stream) when eval_interval > 0."""
  share = distributed_batch.process_share(config, mesh)
  train = SyntheticIterator(config, share, _TRAIN_STREAM)
  return train, SyntheticIterator(config, share, _EVAL_STREAM) if config.eval_interval > 0 else None
