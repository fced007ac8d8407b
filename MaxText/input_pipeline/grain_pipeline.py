"""dataset_type=grain: ArrayRecord, Parquet, JSON-lines and text files, globs and weighted mixtures.

`grain_train_files` / `grain_eval_files` are `glob[:weight];glob[:weight]`. ArrayRecord files are split between
data streams record by record. The other formats are split by file when the file count is a multiple of the
stream count (a process then loads only its streams' files), otherwise by record.
"""

import functools
import logging

import grain

from MaxText.config_schema import ConfigError
from MaxText.input_pipeline import file_sources, quickstart_data, text_pipeline

logger = logging.getLogger("MaxText")


class _FileParts:
  """`DocumentSource.part` over files: whole files per stream where they split evenly, else every n-th record."""

  def __init__(self, pattern: str, files: list[str], kind: str, config, key: str):
    self._pattern, self._files, self._kind = pattern, files, kind
    self._columns, self._key = list(config.train_data_columns), key
    self._logged = False

  def _open(self, files) -> grain.MapDataset:
    if self._kind == "arrayrecord":
      return grain.MapDataset.source(file_sources.ArrayRecordSource(files))
    return grain.MapDataset.source(file_sources.ColumnarSource(files, self._kind, self._columns, self._key))

  @functools.cached_property
  def _every_record(self) -> grain.MapDataset:
    return self._open(self._files)

  def __call__(self, index: int, count: int) -> grain.MapDataset:
    # ArrayRecord reads single records cheaply; the other formats load whole files, so they split by file.
    by_file = self._kind != "arrayrecord"
    if by_file and count > 1 and len(self._files) % count == 0:
      return self._open(self._files[index::count])
    if by_file and count > 1 and not self._logged:
      self._logged = True
      logger.info(
          "Data %s: %d files do not split evenly over %d data streams: split by record, every process loads all",
          self._pattern,
          len(self._files),
          count,
      )
    return text_pipeline.RecordParts(self._every_record)(index, count)


def sources_from_files(spec: str, key: str, config):
  """One DocumentSource per mixture entry of `spec` (the value of config key `key`)."""
  sources = []
  for pattern, weight in file_sources.parse_mixture(spec, key):
    quickstart_data.build_if_default(pattern)
    files = file_sources.expand(pattern, key)
    kind = file_sources.file_type(files, config.grain_file_type, key)
    parts = _FileParts(pattern, files, kind, config, key)
    sources.append(text_pipeline.DocumentSource(name=pattern, key=key, part=parts, weight=weight))
  return sources


def train_sources(config):
  """The training data as sources of records, e.g. for train_tokenizer."""
  if not config.grain_train_files:
    raise ConfigError("grain_train_files: required for dataset_type=grain")
  return sources_from_files(config.grain_train_files, "grain_train_files", config)


def make_iterators(config, mesh):
  train = train_sources(config)
  eval_sources = None
  if config.eval_interval > 0:
    if not config.grain_eval_files:
      raise ConfigError("grain_eval_files: required when eval_interval > 0 (or set eval_interval=-1)")
    eval_sources = sources_from_files(config.grain_eval_files, "grain_eval_files", config)
  return text_pipeline.make_iterators(config, mesh, train, eval_sources)
