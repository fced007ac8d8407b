"""dataset_type=grain: ArrayRecord, Parquet, JSON-lines and text files, globs and weighted mixtures.

`grain_train_files` / `grain_eval_files` are `glob[:weight];glob[:weight]`. ArrayRecord files are sharded across
processes record by record. The other formats are sharded by file when the file count is a multiple of the data
shard count (each process then reads only its files), otherwise by record.
"""

import logging

import grain

from MaxText.config_schema import ConfigError
from MaxText.input_pipeline import distributed_batch, file_sources, quickstart_data, text_pipeline

logger = logging.getLogger("MaxText")


def sources_from_files(spec: str, key: str, config, shard_index: int = 0, shard_count: int = 1):
  """One DocumentSource per mixture entry of `spec` (the value of config key `key`) for one data shard."""
  sources = []
  for pattern, weight in file_sources.parse_mixture(spec, key):
    quickstart_data.build_if_default(pattern)
    files = file_sources.expand(pattern, key)
    kind = file_sources.file_type(files, config.grain_file_type, key)
    presharded = kind != "arrayrecord" and shard_count > 1 and len(files) % shard_count == 0
    if presharded:
      files = files[shard_index::shard_count]
    elif kind != "arrayrecord" and shard_count > 1:
      logger.info(
          "Data %s: %d files do not split evenly over %d data shards; every process loads all of them",
          pattern,
          len(files),
          shard_count,
      )
    if kind == "arrayrecord":
      source = file_sources.ArrayRecordSource(files)
    else:
      source = file_sources.ColumnarSource(files, kind, config.train_data_columns, key)
    sources.append(
        text_pipeline.DocumentSource(
            name=pattern, key=key, dataset=grain.MapDataset.source(source), weight=weight, presharded=presharded
        )
    )
  return sources


def train_sources(config):
  """The training data as sources of records (all of it, unsharded), e.g. for train_tokenizer."""
  if not config.grain_train_files:
    raise ConfigError("grain_train_files: required for dataset_type=grain")
  return sources_from_files(config.grain_train_files, "grain_train_files", config)


def make_iterators(config, mesh):
  share = distributed_batch.process_share(config, mesh)
  shard = (share.shard_index, share.shard_count)
  if not config.grain_train_files:
    raise ConfigError("grain_train_files: required for dataset_type=grain")
  train = sources_from_files(config.grain_train_files, "grain_train_files", config, *shard)
  eval_sources = None
  if config.eval_interval > 0:
    if not config.grain_eval_files:
      raise ConfigError("grain_eval_files: required when eval_interval > 0 (or set eval_interval=-1)")
    eval_sources = sources_from_files(config.grain_eval_files, "grain_eval_files", config, *shard)
  return text_pipeline.make_iterators(config, mesh, train, eval_sources)
