"""Which rows of the global batch this process feeds, and how its rows become one global jax.Array.

Every pipeline produces only this process's share of a step's batch. The share is derived from the batch
sharding rather than assumed to be `global / process_count`: when the batch dimension is not split over every
device, several processes hold the same rows. Pipelines key their data on these global row indices, never on
the process index, so the global batch is the same whatever the process and device count.
"""

import dataclasses
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from MaxText import sharding as maxtext_sharding

BATCH_KEYS = (
    "inputs",
    "inputs_position",
    "inputs_segmentation",
    "targets",
    "targets_position",
    "targets_segmentation",
)


@dataclasses.dataclass(frozen=True)
class ProcessShare:
  """This process's part of every global batch.

  Attributes:
    sharding: NamedSharding of a [global_batch, max_target_length] batch array.
    global_shape: (global_batch_size_to_load, max_target_length).
    rows: global row indices this process supplies, ascending (the order make_array_from_process_local_data expects).
  """

  sharding: NamedSharding
  global_shape: tuple[int, int]
  rows: np.ndarray

  @property
  def local_batch(self) -> int:
    return len(self.rows)


def process_share(config, mesh: Mesh, process_index: int | None = None) -> ProcessShare:
  """Works out the rows of `process_index` (default: this process) for the config's batch."""
  shape = (config.global_batch_size_to_load, config.max_target_length)
  batch_sharding = maxtext_sharding.data_sharding(config, mesh, shape)
  by_process: dict[int, set] = {}
  for device, index in batch_sharding.devices_indices_map(shape).items():
    start, stop, _ = index[0].indices(shape[0])
    by_process.setdefault(device.process_index, set()).update(range(start, stop))
  me = jax.process_index() if process_index is None else process_index
  rows = np.asarray(sorted(by_process[me]), dtype=np.int64)
  return ProcessShare(sharding=batch_sharding, global_shape=shape, rows=rows)


def to_global(share: ProcessShare, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
  """Assembles this process's rows of every batch key into global, sharded int32 jax.Arrays."""
  out = {}
  for key in BATCH_KEYS:
    value = np.asarray(local[key], dtype=np.int32)
    out[key] = jax.make_array_from_process_local_data(share.sharding, value, share.global_shape)
  return out


class BatchIterator:
  """Base of every data iterator: `next()` gives a dict of global arrays; state is this process's position."""

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, jax.Array]:
    raise NotImplementedError

  def get_state(self) -> Any:
    """A JSON-serialisable position of this process, or None when the iterator cannot be checkpointed."""
    return None

  def set_state(self, state: Any) -> None:
    del state
    raise NotImplementedError(f"{type(self).__name__} cannot restore a saved position")

  def reset(self) -> None:
    """Rewinds to the first batch (the train loop calls this on the eval iterator before every eval)."""
    raise NotImplementedError
