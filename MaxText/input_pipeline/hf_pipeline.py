"""dataset_type=hf: Hugging Face `datasets` over data files (json, parquet, text, arrow, csv) or a dataset directory.

`hf_path` names a packaged builder (`json`, `parquet`, `text`, `arrow`, `csv`) that reads `hf_data_files` /
`hf_eval_files`, or a directory: one written by `save_to_disk`, or one `load_dataset` understands, read at
`train_split` / `eval_split`. Datasets are memory-mapped Arrow tables with random access, so the shared grain
pipeline runs on top and the iterator is checkpointable like the grain one.

Files and directories may be in a bucket (gs://...): `datasets` copies them to local disk through fsspec first
(data files into HF_DATASETS_CACHE, a saved dataset into a temporary directory).
"""

import grain

from MaxText.config_schema import ConfigError
from MaxText.input_pipeline import file_sources, text_pipeline


def _load(config, files_spec: str, files_key: str, split: str, split_key: str):
  import datasets  # pylint: disable=import-outside-toplevel

  path = config.hf_path
  if not path:
    raise ConfigError("hf_path: required for dataset_type=hf (json | parquet | text | arrow | csv, or a local dir)")
  if files_spec:
    files = [
        f
        for pattern, _ in file_sources.parse_mixture(files_spec, files_key)
        for f in file_sources.expand(pattern, files_key)
    ]
    try:
      return datasets.load_dataset(path, data_files=files, split="train"), files_spec
    except (FileNotFoundError, ValueError) as e:
      raise ConfigError(f"hf_path: cannot read {files_key}={files_spec!r} with builder {path!r}: {e}") from None
  local = file_sources.resolve_path(path)
  if not file_sources.epath.Path(local).is_dir():
    raise ConfigError(f"{files_key}: required unless hf_path is a local dataset directory (hf_path={path!r})")
  try:
    loaded = datasets.load_from_disk(local)
  except FileNotFoundError:
    loaded = None
  try:
    if loaded is None:
      return datasets.load_dataset(local, split=split), f"{path}[{split}]"
    if isinstance(loaded, datasets.DatasetDict):
      return loaded[split], f"{path}[{split}]"
    return loaded, path
  except (KeyError, ValueError) as e:
    raise ConfigError(f"{split_key}: split {split!r} not found in {path}: {e}") from None


def source(config, files_spec: str, files_key: str, split: str, split_key: str) -> text_pipeline.DocumentSource:
  dataset, label = _load(config, files_spec, files_key, split, split_key)
  missing = [c for c in config.train_data_columns if c not in dataset.column_names]
  if missing:
    raise ConfigError(f"train_data_columns: {missing} not in {label} (its columns: {sorted(dataset.column_names)})")
  dataset = dataset.select_columns(list(config.train_data_columns))
  parts = text_pipeline.RecordParts(grain.MapDataset.source(dataset))
  return text_pipeline.DocumentSource(name=label, key=files_key, part=parts)


def train_sources(config):
  return [source(config, config.hf_data_files, "hf_data_files", config.train_split, "train_split")]


def make_iterators(config, mesh):
  [train] = train_sources(config)
  eval_sources = None
  if config.eval_interval > 0:
    eval_sources = [source(config, config.hf_eval_files, "hf_eval_files", config.eval_split, "eval_split")]
  return text_pipeline.make_iterators(config, mesh, [train], eval_sources)
