"""Input pipelines: `create_data_iterators(config, mesh)` picks one by `dataset_type`.

Every iterator yields dicts of global int32 jax.Arrays of shape [global_batch_size_to_load, max_target_length]
with keys `inputs`, `inputs_position`, `inputs_segmentation`, `targets`, `targets_position`,
`targets_segmentation` (segmentation 0 marks padding / no target). Iterators offer `get_state()` (JSON-able
position of this process, or None if not checkpointable), `set_state(state)` and `reset()` (rewind; the train
loop rewinds the eval iterator before every eval).
"""

import importlib

_MODULES = {
    "synthetic": "MaxText.input_pipeline.synthetic",
    "grain": "MaxText.input_pipeline.grain_pipeline",
    "tfds": "MaxText.input_pipeline.tfds_pipeline",
    "hf": "MaxText.input_pipeline.hf_pipeline",
}


def create_data_iterators(config, mesh):
  """Returns (train_iterator, eval_iterator or None) for `config.dataset_type`.

  Raises config_schema.ConfigError for bad data settings (missing files, unknown columns, ...) before any
  compilation happens.
  """
  module = importlib.import_module(_MODULES[config.dataset_type])
  return module.make_iterators(config, mesh)
