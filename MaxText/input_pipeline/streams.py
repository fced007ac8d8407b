"""Data streams: what makes the global batch the same whatever the process, device or worker count.

The global batch of B rows is fed by S streams (`data_streams`, default one per row); stream k always feeds rows
[k*B/S, (k+1)*B/S). A stream owns a fixed part of every source (every S-th record, or whole files) and shuffles,
tokenizes and first-fit packs it on its own, so its rows depend only on the config (files, seed, S, batch), never
on who computes them. A process runs the streams behind its rows of the batch; grain workers each run a subset of
those streams. A stream's position is a small state of its own, so the iterator state is keyed by stream, which
also lets a run with another process count pick up the same streams.

Kept free of JAX imports: grain worker processes unpickle these datasets.
"""

from typing import Any, Optional, Sequence

import grain
import numpy as np

from MaxText.input_pipeline import documents, packing

# Records are read ahead per stream; a thread per stream hides the latency of remote files.
_READ = grain.ReadOptions(num_threads=1, prefetch_buffer_size=8)


def stream_seed(seed: int, source: int, stream: int) -> int:
  """The shuffle seed of one source within one stream (independent streams, no overlapping seeds)."""
  return int(np.random.SeedSequence([seed, source, stream]).generate_state(1)[0])


# grain's shuffle (index_shuffle) is slow on small datasets: ~4 ms per index at 10 records, ~0.5 ms at 100,
# ~6 us at 100k (grain 0.2.18), and one stream holds 1/data_streams of a dataset. Below this size a stream keeps
# a numpy permutation per epoch instead (at most 512 KiB).
_SMALL = 1 << 16


class ShuffleEachEpoch(grain.MapDataset):
  """`epochs` passes over a small parent, each in its own random order (a numpy permutation per epoch)."""

  def __init__(self, parent: grain.MapDataset, seed: int, epochs: int):
    super().__init__(parent)
    self._seed, self._epochs, self._n = seed, epochs, len(parent)
    self._orders: dict[int, np.ndarray] = {}

  def __len__(self) -> int:
    return self._n * self._epochs

  def _order(self, epoch: int) -> np.ndarray:
    order = self._orders.get(epoch)
    if order is None:
      order = np.random.default_rng([self._seed, epoch]).permutation(self._n)
      # Prefetch threads read around an epoch boundary: keep the two latest epochs.
      self._orders = {e: o for e, o in self._orders.items() if e >= epoch - 1} | {epoch: order}
    return order

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    epoch, i = divmod(index, self._n)
    return self._parent[int(self._order(epoch)[i])]


def shuffle_each_epoch(records: grain.MapDataset, seed: int, epochs: int) -> grain.MapDataset:
  """`epochs` passes over `records`, each in another random order."""
  if len(records) < _SMALL:
    return ShuffleEachEpoch(records, seed, epochs)
  return records.shuffle(seed=seed).repeat(epochs)


def stream_rows(
    parts: Sequence[tuple[grain.MapDataset, float]],
    stream: int,
    options: documents.PipelineOptions,
    pad_id: int,
    train: bool,
) -> grain.IterDataset:
  """One stream's rows: its records of each source -> shuffle + repeat -> mix -> text -> tokens -> pack (or pad).

  Args:
    parts: (this stream's records, mixture weight) for every source.
    stream: the stream's index (seeds its shuffles).
    options: pipeline settings.
    pad_id: token id of padding.
    train: shuffle and repeat num_epoch times (eval reads its records once, in order).
  """
  records = []
  for i, (dataset, _) in enumerate(parts):
    if train and len(dataset):
      dataset = shuffle_each_epoch(dataset, stream_seed(options.seed, i, stream), options.num_epoch)
    records.append(dataset)
  if len(records) > 1 and all(len(r) for r in records):
    mixed = grain.MapDataset.mix(records, [w for _, w in parts])
  else:
    mixed = min(records, key=len)  # one source, or a mixture with an empty part (which ends at once)
  if options.dpo:
    pairs = grain.experimental.FlatMapIterDataset(mixed.to_iter_dataset(_READ), documents.EncodePreference(options))
    return pairs.map(packing.PairRow(options.max_target_length, pad_id))
  if options.sft:
    pieces = grain.experimental.FlatMapIterDataset(mixed.to_iter_dataset(_READ), documents.EncodeChat(options))
  else:
    docs = mixed.map(documents.ToText(options.columns)).to_iter_dataset(_READ)
    pieces = grain.experimental.FlatMapIterDataset(docs, documents.Tokenize(options))
  if options.packing:
    bins = options.packing_bins or options.rows_per_stream
    return packing.PackIterDataset(pieces, options.max_target_length, bins, pad_id)
  return pieces.map(packing.PadRow(options.max_target_length, pad_id))


class Opaque:
  """A value grain treats as one leaf and never copies.

  grain walks every leaf of every element and deep-copies every state, and a stream state holds up to a few rows
  of token ids. States are snapshots that nothing changes afterwards, so sharing them is safe.
  """

  __slots__ = ("value",)

  def __init__(self, value):
    self.value = value

  def __deepcopy__(self, memo) -> "Opaque":
    return self


class StreamGroup(grain.IterDataset):
  """Streams stepped together: each element is one step of all of them.

  An element holds a batch of every stream's rows (stream by stream), which streams came up short (ran out
  during the step; their missing rows are padding), and every stream's state after the step. The group never
  ends: a finished stream keeps feeding padding rows, and the consumer decides what the end of the data means.
  `start` maps stream ids to states from an element (None: from the beginning).
  """

  def __init__(
      self,
      streams: dict[int, grain.IterDataset],
      rows_per_stream: int,
      length: int,
      pad_id: int,
      start: Optional[dict[int, Any]] = None,
  ):
    super().__init__(list(streams.values()))
    self._ids = tuple(streams)
    self._rows, self._length, self._pad_id = rows_per_stream, length, pad_id
    self._start = start

  def __iter__(self) -> "_StreamGroupIterator":
    it = _StreamGroupIterator([p.__iter__() for p in self._parents], self._ids, self._rows, self._length, self._pad_id)
    if self._start is not None:
      it.set_state(Opaque({str(k): self._start.get(k) for k in self._ids}))
    return it


class _StreamGroupIterator(grain.DatasetIterator):
  """State: stream id (str, for JSON) -> {"rows": the stream pipeline's state, "done": it ran out} or None."""

  def __init__(self, parents, ids, rows_per_stream, length, pad_id):
    super().__init__(parents)
    self._ids = ids
    self._rows, self._pad_id = rows_per_stream, pad_id
    self._blank = packing.row_arrays([], length, pad_id)
    self._fresh = [it.get_state() for it in parents]
    self._done = [False] * len(ids)
    self._state: dict[str, Any] = {str(k): None for k in ids}

  def __next__(self) -> dict[str, Any]:
    rows, short = [], []
    for i, it in enumerate(self._parents):
      got = []
      while not self._done[i] and len(got) < self._rows:
        try:
          got.append(next(it))
        except StopIteration:
          self._done[i] = True
      short.append(len(got) < self._rows)
      rows += got + [self._blank] * (self._rows - len(got))
    self._state = {
        str(k): {"rows": it.get_state(), "done": done} for k, it, done in zip(self._ids, self._parents, self._done)
    }
    batch = packing.make_batch(rows, len(rows), self._pad_id)
    # The state travels with its step, so the consumer knows each stream's position without asking workers.
    return {"batch": batch, "short": np.array(short), "state": Opaque(self._state)}

  def get_state(self) -> Opaque:
    return Opaque(self._state)

  def set_state(self, state: Opaque) -> None:
    state = state.value
    for i, (k, it) in enumerate(zip(self._ids, self._parents)):
      saved = state[str(k)]
      it.set_state(self._fresh[i] if saved is None else saved["rows"])
      self._done[i] = saved is not None and bool(saved["done"])
    self._state = {str(k): state[str(k)] for k in self._ids}
