"""Reads and writes Hugging Face safetensors checkpoints one tensor at a time, without torch or memory maps.

The format is an 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}}, then the
raw bytes. Reading seeks to one tensor's bytes (no mmap, so untouched tensors never count against host memory);
writing lays out every shard's header first, so tensors can then be written in any order as they are produced.
Either side may be a bucket (gs://, s3://, ... through etils.epath): reads are ranged reads of the object; writes
to a bucket go to a local shard first, uploaded (and deleted) as soon as all of its tensors are written, so local
disk holds about one shard.
"""

import dataclasses
import json
import math
import os
import pathlib
import shutil
import struct
import tempfile
from typing import Sequence

import ml_dtypes
import numpy as np
from etils import epath

from MaxText import storage

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}


def dtype_name(dtype) -> str:
  return _NAMES[np.dtype(dtype)]


@dataclasses.dataclass(frozen=True)
class TensorInfo:
  file: epath.Path
  dtype: np.dtype
  shape: tuple[int, ...]
  start: int  # absolute byte offset in the file
  nbytes: int


def _read_header(path: epath.Path) -> dict[str, TensorInfo]:
  with path.open("rb") as f:
    (length,) = struct.unpack("<Q", f.read(8))
    header = json.loads(f.read(length))
  out = {}
  for name, entry in header.items():
    if name == "__metadata__":
      continue
    if entry["dtype"] not in _DTYPES:
      raise ValueError(f"{path}: tensor {name} has unsupported dtype {entry['dtype']}")
    begin, end = entry["data_offsets"]
    out[name] = TensorInfo(path, _DTYPES[entry["dtype"]], tuple(entry["shape"]), 8 + length + begin, end - begin)
  return out


class SafetensorsReader:
  """All tensors of a checkpoint directory (one file, or shards listed by model.safetensors.index.json)."""

  def __init__(self, directory: str | os.PathLike):
    directory = storage.as_path(directory)
    index = directory / INDEX_FILE
    if index.is_file():
      files = sorted({directory / f for f in json.loads(index.read_text())["weight_map"].values()})
    else:
      files = sorted(directory.glob("*.safetensors"))
    if not files:
      raise FileNotFoundError(
          f"{directory}: no .safetensors files (PyTorch .bin checkpoints are not read; re-save them with"
          " save_pretrained(safe_serialization=True))"
      )
    self.tensors: dict[str, TensorInfo] = {}
    for path in files:
      for name, info in _read_header(path).items():
        if name in self.tensors:
          raise ValueError(f"tensor {name} appears in both {self.tensors[name].file} and {path}")
        self.tensors[name] = info

  def names(self) -> list[str]:
    return list(self.tensors)

  def read(self, name: str) -> np.ndarray:
    info = self.tensors[name]
    raw = np.empty(info.nbytes, np.uint8)
    with info.file.open("rb") as f:
      f.seek(info.start)
      if f.readinto(raw) != info.nbytes:
        raise ValueError(f"{info.file}: truncated data for tensor {name}")
    return raw.view(info.dtype).reshape(info.shape)


class SafetensorsWriter:
  """Writes named tensors, declared up front, into shards of at most `max_shard_bytes` (plus an index if several)."""

  def __init__(
      self,
      directory: str | os.PathLike,
      entries: Sequence[tuple[str, tuple[int, ...], np.dtype]],
      max_shard_bytes: int = 5 * 10**9,
  ):
    self.remote = storage.as_path(directory) if storage.is_remote(directory) else None
    self._tmp = tempfile.mkdtemp(prefix="maxtext-safetensors-") if self.remote is not None else None
    self.directory = pathlib.Path(self._tmp or directory)
    self.directory.mkdir(parents=True, exist_ok=True)
    shards: list[list[tuple[str, tuple[int, ...], np.dtype]]] = [[]]
    size = 0
    for name, shape, dtype in entries:
      nbytes = math.prod(shape) * np.dtype(dtype).itemsize
      if shards[-1] and size + nbytes > max_shard_bytes:
        shards.append([])
        size = 0
      shards[-1].append((name, tuple(shape), np.dtype(dtype)))
      size += nbytes
    self.where: dict[str, tuple[pathlib.Path, int, tuple[int, ...], np.dtype]] = {}
    self.pending = set()
    self._left: dict[pathlib.Path, int] = {}  # tensors not yet written, per shard
    weight_map, total = {}, 0
    for k, shard in enumerate(shards):
      path = self.directory / (SINGLE_FILE if len(shards) == 1 else f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors")
      total += self._lay_out(path, shard)
      weight_map.update({name: path.name for name, _, _ in shard})
    if len(shards) > 1:
      index = {"metadata": {"total_size": total}, "weight_map": weight_map}
      target = self.remote / INDEX_FILE if self.remote is not None else self.directory / INDEX_FILE
      target.write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")

  def _lay_out(self, path: pathlib.Path, shard) -> int:
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape, dtype in shard:
      nbytes = math.prod(shape) * dtype.itemsize
      header[name] = {"dtype": dtype_name(dtype), "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
      offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # data starts 8-byte aligned, as the reference writer does
    with open(path, "wb") as f:
      f.write(struct.pack("<Q", len(text)) + text)
      f.truncate(8 + len(text) + offset)
    for name, shape, dtype in shard:
      begin = header[name]["data_offsets"][0]
      self.where[name] = (path, 8 + len(text) + begin, shape, dtype)
      self.pending.add(name)
    self._left[path] = len(shard)
    return offset

  def write(self, name: str, array: np.ndarray):
    path, start, shape, dtype = self.where[name]
    if tuple(array.shape) != shape:
      raise ValueError(f"tensor {name}: shape {tuple(array.shape)}, declared {shape}")
    array = np.ascontiguousarray(array, dtype=dtype)
    with open(path, "r+b") as f:
      f.seek(start)
      array.reshape(-1).view(np.uint8).tofile(f)
    if name in self.pending:
      self.pending.discard(name)
      self._left[path] -= 1
      if self._left[path] == 0 and self.remote is not None:
        _upload(path, self.remote / path.name)
        path.unlink()

  def close(self):
    if self.pending:
      raise ValueError(f"tensors declared but never written: {sorted(self.pending)[:10]}")
    for path, left in self._left.items():  # shards without tensors (none in practice)
      if left == 0 and self.remote is not None and path.exists():
        _upload(path, self.remote / path.name)
    if self._tmp is not None:
      shutil.rmtree(self._tmp, ignore_errors=True)


def _upload(local: pathlib.Path, target: epath.Path):
  import fsspec  # pylint: disable=import-outside-toplevel

  fs, remote = fsspec.core.url_to_fs(str(target))
  fs.put_file(str(local), remote)
