"""Random-access record sources over files: ArrayRecord, Parquet, JSON lines and plain text, local or in a bucket.

ArrayRecord is read record by record (each process touches only its own records). Parquet, JSON-lines and text
have no record index, so a file is loaded into memory (only the needed columns, as Arrow arrays) the first time
one of its records is read and then kept, since shuffled reads jump between files; for corpora larger than host
memory, convert them to ArrayRecord. Sources drop their
loaded data when pickled, so grain worker processes load what they read themselves.

Records come out as dicts (column -> value) or, for text files and raw-text ArrayRecords, as str.

Paths may be URLs (gs://, s3://, ... through etils.epath / fsspec; ArrayRecord through array_record's own reader,
which knows local files and gs://). Globs may use `**` (any depth), in buckets too: epath refuses it, so bucket globs
go through fsspec (one listing of the prefix) and local ones through the glob module.
"""

import bisect
import glob
import json
import os
import pathlib
from typing import Any, Optional, Sequence

import grain
from etils import epath

from MaxText import storage
from MaxText.config_schema import ConfigError

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
_WILDCARDS = set("*?[")
_TYPES_BY_SUFFIX = {
    ".parquet": "parquet",
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".ndjson": "jsonl",
    ".txt": "text",
    ".text": "text",
    ".arrayrecord": "arrayrecord",
    ".array_record": "arrayrecord",
}


def resolve_path(path: str) -> str:
  """A relative path missing from the working directory is also looked up from the repository root."""
  if not path or "://" in path or pathlib.Path(path).is_absolute() or _exists(path):
    return path
  candidate = REPO_ROOT / path
  return str(candidate) if _exists(str(candidate)) or _has_wildcard(path) else path


def _exists(path: str) -> bool:
  if _has_wildcard(path):
    return bool(_glob(path))
  return epath.Path(path).exists()


def _has_wildcard(path: str) -> bool:
  return any(c in _WILDCARDS for c in path)


def _glob(pattern: str) -> list[str]:
  return [f for f, _ in _glob_sizes(pattern)]


def _glob_sizes(pattern: str) -> list[tuple[str, Optional[int]]]:
  """(file, size or None when not listed) for every file `pattern` matches, sorted by name."""
  if storage.is_remote(pattern):
    import fsspec  # pylint: disable=import-outside-toplevel

    fs, _ = fsspec.core.url_to_fs(pattern)
    prefix = storage.scheme(pattern) + "://"
    found = fs.glob(pattern, detail=True)
    return sorted(
        (prefix + name.split("://", 1)[-1], info.get("size"))
        for name, info in found.items()
        if info.get("type") == "file"
    )
  return sorted((p, None) for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))


def parse_mixture(spec: str, key: str) -> list[tuple[str, float]]:
  """`glob[:weight];glob[:weight]` -> [(glob, weight)]; a missing weight is 1."""
  out = []
  for item in (s.strip() for s in spec.split(";")):
    if not item:
      continue
    pattern, weight = item, 1.0
    head, sep, tail = item.rpartition(":")
    if sep and "/" not in tail:
      try:
        pattern, weight = head, float(tail)
      except ValueError:
        pass  # a ':' that is part of the path
    if weight <= 0:
      raise ConfigError(f"{key}: weight {weight} of {pattern!r} must be positive")
    out.append((pattern, weight))
  if not out:
    raise ConfigError(f"{key}: no files given")
  return out


def expand(pattern: str, key: str) -> list[str]:
  """The files a glob (or plain path) names, sorted; ConfigError names `key` when there are none or one is empty."""
  resolved = resolve_path(pattern)
  problem = storage.credentials_problem(resolved)  # before gcsfs, which would retry for minutes
  if problem:
    raise ConfigError(f"{key}: {problem}")
  try:
    if _has_wildcard(resolved):
      found = _glob_sizes(resolved)
      if not found:
        raise ConfigError(f"{key}: glob {pattern!r} matches no files")
    else:
      storage.check_readable(key, resolved)
      if epath.Path(resolved).is_dir():
        raise ConfigError(f"{key}: {pattern} is a directory; give a file or a glob such as {pattern.rstrip('/')}/*")
      found = [(resolved, None)]
    for f, size in found:
      if (epath.Path(f).stat().length if size is None else size) == 0:
        raise ConfigError(f"{key}: {f} is empty")
  except ConfigError:
    raise
  except Exception as e:  # pylint: disable=broad-exception-caught  # fsspec clients raise many types
    raise ConfigError(f"{key}: {storage.describe_failure(resolved, e)}") from None
  return [f for f, _ in found]


def file_type(files: Sequence[str], requested: str, key: str) -> str:
  """grain_file_type, or the type every file's extension agrees on."""
  if requested != "auto":
    return requested
  kinds = set()
  for f in files:
    name = pathlib.PurePath(f).name
    kind = _TYPES_BY_SUFFIX.get(pathlib.PurePath(f).suffix.lower())
    if kind is None and ".array_record" in name:  # tfds shards: name.array_record-00000-of-00004
      kind = "arrayrecord"
    if kind is None:
      raise ConfigError(f"grain_file_type: cannot tell the format of {f} (from {key}); set grain_file_type")
    kinds.add(kind)
  if len(kinds) > 1:
    raise ConfigError(f"grain_file_type: {key} mixes formats {sorted(kinds)}; give them as separate mixture entries")
  return kinds.pop()


def _decode_example(data: bytes) -> Optional[dict[str, Any]]:
  """A serialized tf.train.Example as {feature: value}, or None when `data` is not one."""
  from tensorflow_datasets.proto import tf_example_pb2  # pylint: disable=import-outside-toplevel

  example = tf_example_pb2.Example()
  try:
    example.ParseFromString(data)
  except Exception:  # pylint: disable=broad-exception-caught
    return None
  if not example.features.feature:
    return None
  out = {}
  for name, feature in example.features.feature.items():
    values = list(getattr(feature, feature.WhichOneof("kind")).value) if feature.WhichOneof("kind") else []
    out[name] = values[0] if len(values) == 1 else values
  return out


def _record_format(data: bytes) -> str:
  if data[:1] == b"{":
    try:
      if isinstance(json.loads(data), dict):
        return "json"
    except ValueError:
      pass
  return "example" if _decode_example(data) is not None else "text"


class ArrayRecordSource(grain.sources.RandomAccessDataSource):
  """ArrayRecord files whose records are tf.train.Example protos, JSON objects or raw UTF-8 text.

  The record format is detected once from the first record and then assumed for all of them.
  """

  def __init__(self, files: Sequence[str]):
    self._source = grain.sources.ArrayRecordDataSource(list(files))
    self._format = _record_format(self._source[0]) if len(self._source) else "text"

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int):
    data = self._source[index]
    if self._format == "json":
      return json.loads(data)
    if self._format == "example":
      return _decode_example(data)
    return data.decode("utf-8", errors="replace")


class ColumnarSource(grain.sources.RandomAccessDataSource):
  """Parquet, JSON-lines or text files, each loaded on first use; only `columns` are kept."""

  def __init__(self, files: Sequence[str], kind: str, columns: Sequence[str], key: str):
    self._files = list(files)
    self._kind = kind
    self._columns = list(columns)
    self._key = key
    self._cache: dict[int, Any] = {}
    lengths = [self._count(i) for i in range(len(self._files))]
    self._starts = [0]
    for n in lengths:
      self._starts.append(self._starts[-1] + n)

  def _count(self, i: int) -> int:
    if self._kind == "parquet":
      import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel

      with epath.Path(self._files[i]).open("rb") as f:
        meta = pq.ParquetFile(f)
        names = meta.schema_arrow.names
        missing = [c for c in self._columns if c not in names]
        if missing:
          raise ConfigError(f"train_data_columns: {missing} not in {self._files[i]} (its columns: {sorted(names)})")
        return meta.metadata.num_rows
    data = self._load(i)
    return len(data) if self._kind == "text" else len(data[self._columns[0]])

  def _load(self, i: int):
    if i in self._cache:
      return self._cache[i]
    path = self._files[i]
    if self._kind == "text":
      lines = [line for line in epath.Path(path).read_text().splitlines() if line.strip()]
      import pyarrow as pa  # pylint: disable=import-outside-toplevel

      table = pa.array(lines, type=pa.large_string())
    else:
      table = self._read_table(path)
    self._cache[i] = table
    return table

  def _read_table(self, path: str):
    import pyarrow as pa  # pylint: disable=import-outside-toplevel
    import pyarrow.json as pj  # pylint: disable=import-outside-toplevel
    import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel

    try:
      with epath.Path(path).open("rb") as f:
        if self._kind == "parquet":
          table = pq.read_table(f, columns=self._columns)
        else:
          table = pj.read_json(f, read_options=pj.ReadOptions(block_size=1 << 24))
    except (pa.ArrowInvalid, OSError) as e:
      raise ConfigError(f"{self._key}: cannot read {path} as {self._kind}: {e}") from None
    missing = [c for c in self._columns if c not in table.column_names]
    if missing:
      raise ConfigError(f"train_data_columns: {missing} not in {path} (its columns: {sorted(table.column_names)})")
    return {c: table.column(c).combine_chunks() for c in self._columns}

  def __len__(self) -> int:
    return self._starts[-1]

  def __getitem__(self, index: int):
    i = bisect.bisect_right(self._starts, index) - 1
    data = self._load(i)
    row = index - self._starts[i]
    if self._kind == "text":
      return data[row].as_py()
    return {c: data[c][row].as_py() for c in self._columns}

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_cache"] = {}
    return state

  def __repr__(self) -> str:
    return f"ColumnarSource({self._kind}, {len(self._files)} files)"
