"""dataset_type=tfds: prepared TFDS datasets in array_record format, read as random-access data sources.

Needs no TensorFlow: `tfds.data_source`-style random access decodes records with numpy. `dataset_name`
(`name[/config][:version]`) is looked up under `dataset_path`; with an empty `dataset_name`, `dataset_path`
is itself a prepared dataset directory (the one holding dataset_info.json), opened with `builder_from_directory`.
`dataset_path` may be a bucket URL (gs://...): tfds reads its metadata through etils.epath and the array_record
shards through array_record's own GCS reader.
"""

import grain

from MaxText import storage
from MaxText.config_schema import ConfigError
from MaxText.input_pipeline import file_sources, text_pipeline


def _builder(name: str, config, name_key: str):
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

  data_dir = file_sources.resolve_path(config.dataset_path)
  if not data_dir:
    raise ConfigError("dataset_path: required for dataset_type=tfds (the TFDS data_dir or a prepared dataset dir)")
  storage.check_readable("dataset_path", data_dir, kind="dir")  # missing bucket / object / credentials, named
  try:
    if name:
      return tfds.builder(name, data_dir=data_dir)
    return tfds.builder_from_directory(data_dir)
  except Exception as e:  # pylint: disable=broad-exception-caught
    what = f"{name_key}: {name!r} under {data_dir}" if name else f"dataset_path: {data_dir}"
    raise ConfigError(f"{what} is not a prepared TFDS dataset: {e}") from None


def source(name: str, split: str, config, name_key: str, split_key: str) -> text_pipeline.DocumentSource:
  builder = _builder(name, config, name_key)
  splits = sorted(builder.info.splits.keys())
  if split.split("[")[0] not in splits:
    raise ConfigError(f"{split_key}: split {split!r} not in {builder.name}; available: {splits}")
  try:
    records = builder.as_data_source(split=split)
  except Exception as e:  # pylint: disable=broad-exception-caught
    raise ConfigError(
        f"{name_key or 'dataset_path'}: {builder.name} cannot be read as a random-access source ({e}); prepare it"
        " with file_format=array_record"
    ) from None
  label = f"{builder.name}[{split}]"
  parts = text_pipeline.RecordParts(grain.MapDataset.source(records))
  return text_pipeline.DocumentSource(name=label, key=name_key or "dataset_path", part=parts)


def train_sources(config):
  return [source(config.dataset_name, config.train_split, config, "dataset_name", "train_split")]


def make_iterators(config, mesh):
  [train] = train_sources(config)
  eval_sources = None
  if config.eval_interval > 0:
    name = config.eval_dataset_name or config.dataset_name
    key = "eval_dataset_name" if config.eval_dataset_name else "dataset_name"
    eval_sources = [source(name, config.eval_split, config, key, "eval_split")]
  return text_pipeline.make_iterators(config, mesh, [train], eval_sources)
