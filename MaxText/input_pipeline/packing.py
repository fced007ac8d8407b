"""Documents of token ids -> fixed-length rows -> training batches.

A row holds one or more documents back to back: `segmentation` numbers them 1, 2, ... (0 = padding) and
`positions` restart at 0 for each, so attention never crosses documents. Targets are the next token within the
same document; the last token of each document has no target and is masked like padding.

The packer is first-fit over a bounded set of open rows and keeps its open rows in its checkpoint state, so a
resumed run emits exactly the rows the uninterrupted run would have. Documents are tuples: never changed once
placed, so a state snapshot can share them instead of copying every token.
"""

import collections
from typing import Any, Sequence

import grain
import numpy as np

Row = list[tuple[int, ...]]  # the documents in one row, in order


def split_document(tokens: Sequence[int], length: int, mode: str) -> list[list[int]]:
  """Pieces of a document that fit a row: the first `length` tokens (truncate) or all of it (chunk).

  Chunks overlap by one token because a row's last token has no target within the row: this way every
  next-token pair of the document is trained on exactly once. Pieces shorter than two tokens carry no target
  and are dropped.
  """
  tokens = list(tokens)
  if len(tokens) <= length:
    return [tokens] if len(tokens) >= 2 else []
  if mode == "truncate":
    return [tokens[:length]]
  step = length - 1
  return [tokens[s : s + length] for s in range(0, len(tokens) - 1, step) if len(tokens[s : s + length]) >= 2]


class FirstFitPacker:
  """Packs documents (each at most `length` tokens) into at most `max_open` open rows, first fit.

  A row is emitted as soon as it is exactly full; when a document fits no open row and all `max_open` rows are
  in use, the fullest open row is emitted to make room. `flush()` emits what is left at the end of the data.
  """

  def __init__(self, length: int, max_open: int):
    self.length = length
    self.max_open = max(1, max_open)
    self.open: list[Row] = []
    self._fill: list[int] = []

  def add(self, doc: Sequence[int]) -> list[Row]:
    """Places one document; returns the rows completed by doing so (zero, one or two)."""
    doc = tuple(doc)
    if not 0 < len(doc) <= self.length:
      raise ValueError(f"document of {len(doc)} tokens does not fit rows of {self.length}")
    for i, fill in enumerate(self._fill):
      if fill + len(doc) <= self.length:
        self.open[i].append(doc)
        self._fill[i] += len(doc)
        return [self._pop(i)] if self._fill[i] == self.length else []
    emitted = []
    if len(self.open) >= self.max_open:
      fullest = max(range(len(self._fill)), key=lambda j: (self._fill[j], -j))
      emitted.append(self._pop(fullest))
    self.open.append([doc])
    self._fill.append(len(doc))
    if len(doc) == self.length:
      emitted.append(self._pop(len(self.open) - 1))
    return emitted

  def flush(self) -> list[Row]:
    rows, self.open, self._fill = self.open, [], []
    return rows

  def _pop(self, i: int) -> Row:
    self._fill.pop(i)
    return self.open.pop(i)

  def get_state(self) -> list[Row]:
    return [list(row) for row in self.open]

  def set_state(self, state: Sequence[Sequence[Sequence[int]]]) -> None:
    self.open = [[tuple(doc) for doc in row] for row in state]
    self._fill = [sum(len(doc) for doc in row) for row in self.open]


def row_arrays(row: Row, length: int, pad_id: int) -> dict[str, np.ndarray]:
  """tokens / segmentation / positions / trained of one row, padded to `length`.

  A negative entry -(t + 1) is token t that is not a target of the loss (a prompt token under
  sft_train_on_completion_only, see chat.signed); such a token is still attended to.
  """
  tokens = np.full(length, pad_id, dtype=np.int32)
  segmentation = np.zeros(length, dtype=np.int32)
  positions = np.zeros(length, dtype=np.int32)
  trained = np.zeros(length, dtype=bool)
  start = 0
  for segment, doc in enumerate(row, 1):
    end = start + len(doc)
    values = np.asarray(doc, dtype=np.int64)
    tokens[start:end] = np.where(values < 0, -values - 1, values)
    trained[start:end] = values >= 0
    segmentation[start:end] = segment
    positions[start:end] = np.arange(len(doc), dtype=np.int32)
    start = end
  return {"tokens": tokens, "segmentation": segmentation, "positions": positions, "trained": trained}


def make_batch(rows: Sequence[dict[str, np.ndarray]], batch_rows: int, pad_id: int) -> dict[str, np.ndarray]:
  """Stacks rows into the six batch arrays, adding all-padding rows up to `batch_rows`, and shifts targets.

  Position i has a target when token i + 1 is in the same document and trained.
  """
  length = len(rows[0]["tokens"]) if rows else 0
  tokens = np.full((batch_rows, length), pad_id, dtype=np.int32)
  segmentation = np.zeros((batch_rows, length), dtype=np.int32)
  positions = np.zeros((batch_rows, length), dtype=np.int32)
  trained = np.zeros((batch_rows, length), dtype=bool)
  for i, row in enumerate(rows):
    tokens[i], segmentation[i], positions[i] = row["tokens"], row["segmentation"], row["positions"]
    trained[i] = row["trained"]
  has_target = np.zeros_like(segmentation, dtype=bool)
  has_target[:, :-1] = (segmentation[:, 1:] == segmentation[:, :-1]) & (segmentation[:, :-1] != 0) & trained[:, 1:]
  targets = np.full_like(tokens, pad_id)
  targets[:, :-1] = np.where(has_target[:, :-1], tokens[:, 1:], pad_id)
  return {
      "inputs": tokens,
      "inputs_position": positions,
      "inputs_segmentation": segmentation,
      "targets": targets,
      "targets_position": np.where(has_target, positions, 0).astype(np.int32),
      "targets_segmentation": np.where(has_target, segmentation, 0).astype(np.int32),
  }


class _PackIterator(grain.DatasetIterator):
  """Iterator of PackIterDataset; state = parent position + open rows + rows waiting to be returned."""

  def __init__(self, parent, length: int, max_open: int, pad_id: int):
    super().__init__(parent)
    self._packer = FirstFitPacker(length, max_open)
    self._ready: collections.deque[Row] = collections.deque()
    self._pad_id = pad_id
    self._flushed = False

  def __next__(self) -> dict[str, np.ndarray]:
    while not self._ready:
      if self._flushed:
        raise StopIteration
      try:
        doc = next(self._parent)
      except StopIteration:
        self._flushed = True
        self._ready.extend(self._packer.flush())
        continue
      self._ready.extend(self._packer.add(doc))
    return row_arrays(self._ready.popleft(), self._packer.length, self._pad_id)

  def get_state(self) -> dict[str, Any]:
    return {
        "parent": self._parent.get_state(),
        "open": self._packer.get_state(),
        "ready": [list(row) for row in self._ready],
        "flushed": self._flushed,
    }

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state["parent"])
    self._packer.set_state(state["open"])
    self._ready = collections.deque([tuple(doc) for doc in row] for row in state["ready"])
    self._flushed = state["flushed"]


class PackIterDataset(grain.IterDataset):
  """Packs a stream of token-id documents into rows (dicts of tokens/segmentation/positions)."""

  def __init__(self, parent: grain.IterDataset, length: int, max_open: int, pad_id: int):
    super().__init__(parent)
    self._length, self._max_open, self._pad_id = length, max_open, pad_id

  def __iter__(self) -> _PackIterator:
    return _PackIterator(self._parent.__iter__(), self._length, self._max_open, self._pad_id)


class PairRow(grain.transforms.Map):
  """use_dpo: one (chosen, rejected) pair per row, as segments 1 and 2."""

  def __init__(self, length: int, pad_id: int):
    self._length, self._pad_id = length, pad_id

  def map(self, element):
    return row_arrays([list(doc) for doc in element], self._length, self._pad_id)


class PadRow(grain.transforms.Map):
  """packing=false: one document per row, padded."""

  def __init__(self, length: int, pad_id: int):
    self._length, self._pad_id = length, pad_id

  def map(self, element):
    return row_arrays([list(element)], self._length, self._pad_id)
