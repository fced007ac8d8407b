"""The pipeline every real dataset shares, built on grain so that it is checkpointable end to end.

    per data stream (see streams.py): its records of each source -> shuffle (data_shuffle_seed, reshuffled each
    epoch) -> repeat(num_epoch) -> mix sources by weight -> text (train_data_columns) -> tokenize + bos/eos
    -> truncate or chunk -> first-fit pack (or pad) into max_target_length rows
    streams of this process -> [worker processes, each a group of streams] -> this process's rows -> global batch

grain, tfds and hf differ only in how they open their records as random-access `grain.MapDataset`s; they hand
`DocumentSource`s to `make_iterators` here.
"""

import dataclasses
import gc
import logging
import weakref
from typing import Any, Callable, Optional, Sequence

import grain
import jax
import numpy as np

from MaxText.config_schema import ConfigError
from MaxText.input_pipeline import chat, distributed_batch, documents, streams
from MaxText.input_pipeline import tokenizer as tokenizers

logger = logging.getLogger("MaxText")


@dataclasses.dataclass(frozen=True)
class DocumentSource:
  """One dataset of records.

  Attributes:
    name: how error messages and logs name it (a path, glob or dataset name).
    key: the config key it came from, named in errors.
    part: (index, count) -> the records of data stream `index` of `count`, in a fixed order. Opening only a
      stream's part is what keeps a process to its share (file-level parts open only the stream's files).
    weight: relative share in a mixture.
  """

  name: str
  key: str
  part: Callable[[int, int], grain.MapDataset]
  weight: float = 1.0

  @property
  def dataset(self) -> grain.MapDataset:
    """Every record (train_tokenizer reads them all)."""
    return self.part(0, 1)


class RecordParts:
  """`DocumentSource.part` of a random-access dataset: stream k of n reads every n-th record from the k-th."""

  def __init__(self, dataset: grain.MapDataset):
    self._dataset = dataset

  def __call__(self, index: int, count: int) -> grain.MapDataset:
    return self._dataset if count == 1 else self._dataset[index::count]


def check_columns(source: DocumentSource, records: grain.MapDataset, columns: Sequence[str]) -> None:
  """Fails early, naming train_data_columns, when a first record lacks a configured column."""
  first = records[0] if len(records) else None
  if isinstance(first, dict):
    missing = [c for c in columns if c not in first]
    if missing:
      raise ConfigError(
          f"train_data_columns: {missing} not in {source.name} (its columns: {sorted(first)}); set train_data_columns"
      )


class StreamPipeline:
  """This process's data streams, split into groups (one per grain worker, or one in a background thread).

  `open(state)` starts the groups at a saved position (None: the beginning) and returns their iterators;
  `order` picks this process's rows, ascending, out of the groups' rows laid end to end.
  """

  def __init__(self, sources, options: documents.PipelineOptions, share, pad_id: int, train: bool):
    self._options, self._pad_id = options, pad_id
    self.chat_key = "use_dpo" if options.dpo else "use_sft"  # names the setting in errors about chat records
    self.count = options.streams
    per = options.rows_per_stream
    self.local = tuple(sorted({int(r) // per for r in share.rows}))
    if len(self.local) * per != share.local_batch:
      logger.warning(
          "Data: this process feeds part of data streams %s (%d rows each) and computes them whole; set"
          " data_streams so that each process's rows are whole streams (0, one per row, always is)",
          list(self.local),
          per,
      )
    self._rows = {}
    for k in self.local:
      parts = []
      for source in sources:
        records = source.part(k, options.streams)
        check_columns(source, records, options.columns)
        parts.append((records, source.weight))
      self._rows[k] = streams.stream_rows(parts, k, options, pad_id, train)
    workers = min(options.worker_count, len(self.local))
    if workers < options.worker_count:
      logger.info("Data: %d grain workers for this process's %d data streams", workers, len(self.local))
    self.workers = workers
    self.groups = [self.local[g :: max(workers, 1)] for g in range(max(workers, 1))]
    position = {k: i for i, k in enumerate(k for group in self.groups for k in group)}
    self.order = np.array([position[int(r) // per] * per + int(r) % per for r in share.rows])

  def open(self, state: Optional[dict[int, Any]]) -> list[grain.DatasetIterator]:
    its = []
    for group in self.groups:
      ds = streams.StreamGroup(
          {k: self._rows[k] for k in group},
          self._options.rows_per_stream,
          self._options.max_target_length,
          self._pad_id,
          start=state,
      )
      if self.workers:
        _mark_absl_flags_parsed()
        # One worker per group (never grain's record slicing), so the worker count does not change the data.
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=1))
      else:
        # Build the next batch in a background thread while the train step runs.
        ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=2)
      its.append(iter(ds))
    return its


def _mark_absl_flags_parsed():
  # grain's worker processes read absl flags; a program not started through absl.app has not parsed them.
  from absl import flags  # pylint: disable=import-outside-toplevel

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


class _IteratorBox:
  """Owns grain iterators so they can be closed and released when their user goes away or at exit.

  Releasing them while the interpreter is still intact matters: grain iterators close themselves again in
  `__del__`, which fails noisily once interpreter teardown has cleared module globals.
  """

  def __init__(self, its):
    self.its = its

  def close(self):
    its, self.its = self.its, []
    while its:
      its.pop().close()
    gc.collect()


class TextBatchIterator(distributed_batch.BatchIterator):
  """Global batches from this process's data streams; checkpointable, rewindable.

  Construction already produces the first batch, so a dataset too small for one batch is a ConfigError before
  anything compiles. A stream that runs out feeds padding rows (zero loss weight) from then on, so no data is
  dropped and the batches stay those of any other process count. Once all of its streams have run out, a
  single-process train iterator stops (StopIteration); multi-process and eval iterators feed padding batches,
  so that processes whose streams end at different steps never wait on each other.
  """

  def __init__(self, pipeline: StreamPipeline, share, name: str, train: bool):
    self._pipeline = pipeline
    self._share = share
    self._name = name
    self._train = train
    self._length = share.global_shape[1]
    self._box = _IteratorBox(pipeline.open(None))
    weakref.finalize(self, self._box.close)
    # grain's own (opaque) start positions: rewinding through them keeps worker processes alive.
    self._initial = [it.get_state() for it in self._box.its]
    self._states: dict[int, Any] = dict.fromkeys(pipeline.local)
    self._stopped = False
    self._warned = False
    self._peeked = self._first_step()

  def _first_step(self):
    try:
      step = self._step()
    except chat.ChatError as e:  # a bad conversation or template among the first records: before anything compiles
      raise ConfigError(f"{self._pipeline.chat_key}: {self._name}: {e}") from None
    batch, short, _ = step
    if (self._train and short) or not batch["inputs_segmentation"].any():
      raise ConfigError(
          f"{self._name}: yields fewer than one batch ({self._share.global_shape[0]} rows of {self._length}"
          f" tokens, fed by {self._pipeline.count} data streams that each read 1/{self._pipeline.count} of the"
          " records); add data, or lower per_device_batch_size or data_streams"
      )
    return step

  def _step(self) -> tuple[dict[str, np.ndarray], bool, dict[int, Any]]:
    """This process's rows of the next batch, whether a stream ran short, and the streams' states after it."""
    parts = [next(it) for it in self._box.its]
    order = self._pipeline.order
    batch = {key: np.concatenate([p["batch"][key] for p in parts])[order] for key in distributed_batch.BATCH_KEYS}
    short = any(p["short"].any() for p in parts)
    states = {int(k): v for p in parts for k, v in p["state"].value.items()}
    return batch, short, states

  def __next__(self):
    if self._stopped:
      raise StopIteration
    if self._peeked is not None:
      (batch, short, states), self._peeked = self._peeked, None
    else:
      batch, short, states = self._step()
    # Streams never emit empty rows: an all-padding batch means every stream of this process has run out.
    if self._train and jax.process_count() == 1 and not batch["inputs_segmentation"].any():
      self._stopped = True
      logger.info("Data %s: end of the training data", self._name)
      raise StopIteration
    if short and not self._warned:
      self._warned = True
      logger.warning("Data %s: a data stream of this process is used up; its rows are padding from now on", self._name)
    self._states.update(states)
    return distributed_batch.to_global(self._share, batch)

  def get_state(self) -> dict[str, Any]:
    """{"streams": {stream id: position}} for this process's streams; a position is JSON (None: not started)."""
    return {"streams": {str(k): v for k, v in self._states.items()}}

  def set_state(self, state: dict[str, Any]) -> None:
    """Continues from `state`, which must hold every stream of this process (it may hold others too)."""
    saved = state.get("streams")
    missing = [k for k in self._pipeline.local if saved is None or str(k) not in saved]
    if missing:
      raise ValueError(
          f"Data {self._name}: the saved data-iterator state has no position for data streams {missing}; it was"
          " written with another data_streams or global batch size, or by an older version"
      )
    self._states = {k: saved[str(k)] for k in self._pipeline.local}
    self._box.close()
    self._box.its = self._pipeline.open(self._states)
    self._stopped = False
    self._peeked = None

  def reset(self) -> None:
    for it, initial in zip(self._box.its, self._initial):
      it.set_state(initial)
    self._states = dict.fromkeys(self._pipeline.local)
    self._stopped = False
    self._peeked = None


def make_iterators(
    config,
    mesh,
    train_sources: Sequence[DocumentSource],
    eval_sources: Optional[Sequence[DocumentSource]],
):
  """Train and (when eval_interval > 0) eval iterators over the given sources."""
  share = distributed_batch.process_share(config, mesh)
  options = documents.PipelineOptions.from_config(config)
  pad_id = tokenizers.build_tokenizer(config).pad_id

  def iterator(sources, train):
    name = ";".join(s.name for s in sources)
    return TextBatchIterator(StreamPipeline(sources, options, share, pad_id, train), share, name, train)

  train = iterator(train_sources, True)
  return train, iterator(eval_sources, False) if eval_sources else None
