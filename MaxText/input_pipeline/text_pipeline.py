"""The pipeline every real dataset shares, built on grain so that it is checkpointable end to end.

    records (this process's shard)  -> shuffle (data_shuffle_seed, reshuffled each epoch) -> repeat(num_epoch)
    -> mix sources by weight -> text (train_data_columns) -> tokenize + bos/eos -> truncate or chunk
    -> first-fit pack (or pad) into max_target_length rows -> batch + shift to targets -> [worker processes]

grain, tfds and hf differ only in how they open their records as a random-access `grain.MapDataset`; they hand
`DocumentSource`s to `make_iterators` here.
"""

import dataclasses
import functools
import gc
import logging
import weakref
from typing import Any, Optional, Sequence

import grain
import jax
import numpy as np

from MaxText.config_schema import ConfigError
from MaxText.input_pipeline import distributed_batch, documents, packing
from MaxText.input_pipeline import tokenizer as tokenizers

logger = logging.getLogger("MaxText")


@dataclasses.dataclass(frozen=True)
class DocumentSource:
  """One dataset of records, as seen by this process.

  Attributes:
    name: how error messages and logs name it (a path, glob or dataset name).
    key: the config key it came from, named in errors.
    dataset: random-access records (dicts, str or bytes).
    weight: relative share in a mixture.
    presharded: True when the records are already this process's shard (file-level sharding).
  """

  name: str
  key: str
  dataset: grain.MapDataset
  weight: float = 1.0
  presharded: bool = False


def check_columns(source: DocumentSource, columns: Sequence[str]) -> None:
  """Fails early, naming train_data_columns, when the first record lacks a configured column."""
  if len(source.dataset) == 0:
    raise ConfigError(f"{source.key}: {source.name} has no records")
  first = source.dataset[0]
  if isinstance(first, dict):
    missing = [c for c in columns if c not in first]
    if missing:
      raise ConfigError(
          f"train_data_columns: {missing} not in {source.name} (its columns: {sorted(first)}); set train_data_columns"
      )


def build_dataset(
    sources: Sequence[DocumentSource],
    options: documents.PipelineOptions,
    share: distributed_batch.ProcessShare,
    pad_id: int,
    train: bool,
) -> grain.IterDataset:
  """The local (this process's) pipeline as a grain IterDataset of numpy batches with the six batch keys."""
  parts = []
  for i, source in enumerate(sources):
    check_columns(source, options.columns)
    ds = source.dataset
    if not source.presharded:
      ds = ds[share.shard_index :: share.shard_count]
    if train:
      ds = ds.shuffle(seed=options.seed + i).repeat(options.num_epoch)
    parts.append(ds)
  if len(parts) == 1:
    mixed = parts[0]
  else:
    mixed = grain.MapDataset.mix(parts, [s.weight for s in sources])
  docs = mixed.map(documents.ToText(options.columns)).to_iter_dataset(
      grain.ReadOptions(num_threads=2, prefetch_buffer_size=64)
  )
  pieces = grain.experimental.FlatMapIterDataset(docs, documents.Tokenize(options))
  if options.packing:
    rows = packing.PackIterDataset(pieces, options.max_target_length, options.packing_bins or share.local_batch, pad_id)
  else:
    rows = pieces.map(packing.PadRow(options.max_target_length, pad_id))
  batches = rows.batch(
      share.local_batch,
      drop_remainder=train,
      batch_fn=functools.partial(packing.make_batch, batch_rows=share.local_batch, pad_id=pad_id),
  )
  if options.worker_count > 0:
    _mark_absl_flags_parsed()
    return batches.mp_prefetch(grain.MultiprocessingOptions(num_workers=options.worker_count))
  # Build the next batch in a background thread while the train step runs.
  return grain.experimental.ThreadPrefetchIterDataset(batches, prefetch_buffer_size=2)


def _mark_absl_flags_parsed():
  # grain's worker processes read absl flags; a program not started through absl.app has not parsed them.
  from absl import flags  # pylint: disable=import-outside-toplevel

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


class _IteratorBox:
  """Owns a grain iterator so it can be closed and released when its user goes away or at exit.

  Releasing it while the interpreter is still intact matters: grain iterators close themselves again in
  `__del__`, which fails noisily once interpreter teardown has cleared module globals.
  """

  def __init__(self, it):
    self.it = it

  def close(self):
    it, self.it = self.it, None
    if it is not None:
      it.close()
      del it
      gc.collect()


class TextBatchIterator(distributed_batch.BatchIterator):
  """Global batches from a local grain pipeline; checkpointable, rewindable.

  Construction already produces the first batch, so a dataset too small for one batch is a ConfigError before
  anything compiles. Once this process's data is used up: a single-process train iterator stops
  (StopIteration); a multi-process one, and every eval iterator, feed all-padding batches (zero loss weight) so
  that processes whose shares end at different steps never wait on each other.
  """

  def __init__(self, dataset: grain.IterDataset, share, pad_id: int, name: str, train: bool):
    self._share = share
    self._name = name
    self._train = train
    self._pad_id = pad_id
    self._length = share.global_shape[1]
    self._box = _IteratorBox(iter(dataset))
    weakref.finalize(self, self._box.close)
    self._initial = self._it.get_state()
    self._exhausted = False
    self._peeked: Optional[dict] = self._first_batch()

  @property
  def _it(self):
    return self._box.it

  def _first_batch(self):
    try:
      return next(self._it)
    except StopIteration:
      raise ConfigError(
          f"{self._name}: yields fewer than one batch ({self._share.local_batch} rows of"
          f" {self._length} tokens per process, {self._share.global_shape[0]} in all); add data or lower"
          " per_device_batch_size"
      ) from None

  def _next_local(self) -> dict[str, np.ndarray]:
    if self._peeked is not None:
      local, self._peeked = self._peeked, None
      return local
    if not self._exhausted:
      try:
        return next(self._it)
      except StopIteration:
        self._exhausted = True
        if self._train and jax.process_count() == 1:
          logger.info("Data %s: end of the training data", self._name)
          raise
        logger.warning("Data %s: this process's share is used up; feeding padding batches", self._name)
    return packing.empty_batch(self._share.local_batch, self._length, self._pad_id)

  def __next__(self):
    return distributed_batch.to_global(self._share, self._next_local())

  def get_state(self) -> dict[str, Any]:
    state = self._initial if self._peeked is not None else self._it.get_state()
    return {"grain": state, "exhausted": self._exhausted}

  def set_state(self, state: dict[str, Any]) -> None:
    self._it.set_state(state["grain"])
    self._exhausted = bool(state["exhausted"])
    self._peeked = None

  def reset(self) -> None:
    self.set_state({"grain": self._initial, "exhausted": False})


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
  train_name = ";".join(s.name for s in train_sources)
  train = TextBatchIterator(build_dataset(train_sources, options, share, pad_id, True), share, pad_id, train_name, True)
  if not eval_sources:
    return train, None
  eval_name = ";".join(s.name for s in eval_sources)
  eval_ds = build_dataset(eval_sources, options, share, pad_id, False)
  return train, TextBatchIterator(eval_ds, share, pad_id, eval_name, False)
