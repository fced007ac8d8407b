"""Orbax checkpoints: {checkpoint_dir}/{step}/{items,iter}, params-only export, and resume.

`items` holds the train state {step, params, opt_state} (pure dicts of arrays); `iter` holds each
process's data-iterator position as JSON. Locally Orbax writes a step into a temporary directory and renames it
when every item is committed; on object stores (gs://) it writes the step directory in place and adds
`commit_success.txt` last. Either way only committed steps are listed, loaded, or taken as "the newest step"
(`committed_steps`), so an interrupted save (even kill -9 mid-write) is never read and is replaced on the next save.
Paths may be local or any URL epath and tensorstore both support (MaxText/storage.py).
"""

import dataclasses
import json
import logging
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from MaxText import storage

logger = logging.getLogger("MaxText")

ITEMS = "items"
ITER = "iter"
COMMIT_MARKER = "commit_success.txt"  # Orbax's marker of a finished step on object stores (no atomic rename)
_TMP_INFIX = ".orbax-checkpoint-tmp"


def is_committed(step_dir) -> bool:
  """True when the step (or params-only) checkpoint directory finished writing."""
  path = storage.as_path(step_dir)
  if _TMP_INFIX in path.name:
    return False
  if storage.is_remote(step_dir):
    return (path / COMMIT_MARKER).exists()
  return path.is_dir()


def committed_steps(directory) -> list[int]:
  """Steps under a checkpoints/ `directory` that finished writing, newest first (reads only)."""
  path = storage.as_path(directory)
  if not path.exists():
    return []
  steps = [int(p.name) for p in path.iterdir() if p.name.isdigit()]
  return [s for s in sorted(steps, reverse=True) if is_committed(path / str(s))]


def resolve(path) -> str:
  """A checkpoint directory to read: `path` itself (a step or params-only checkpoint) or, for a run's
  checkpoints/ directory, its newest committed step. FileNotFoundError says which it was not."""
  p = storage.as_path(path)
  if not p.exists():
    raise FileNotFoundError(storage.describe_failure(path))
  if (p / ITEMS).exists() or (p / "_METADATA").exists() or (p / "_CHECKPOINT_METADATA").exists():
    if not is_committed(path):
      raise FileNotFoundError(f"{path} is an unfinished (uncommitted) checkpoint")
    return str(path)
  steps = committed_steps(path)
  if not steps:
    raise FileNotFoundError(f"{path} holds no committed checkpoint (neither a step directory nor a checkpoints/ dir)")
  return storage.join(path, str(steps[0]))


def holds_full_state(path) -> bool:
  """True when the checkpoint at `path` (step or params-only directory) has an optimizer state."""
  items = _items_path(path)
  with ocp.PyTreeCheckpointer() as ckptr:
    meta = ckptr.metadata(items)
  tree = meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta.tree
  return "opt_state" in tree


class DataIteratorHandler(ocp.CheckpointHandler):
  """Saves an iterator's `get_state()` dict as one JSON file per process."""

  def _file(self, directory: epath.Path) -> epath.Path:
    return directory / f"process_{jax.process_index()}-of-{jax.process_count()}.json"

  def save(self, directory: epath.Path, args: "DataIteratorSave"):  # pylint: disable=arguments-differ
    self._file(directory).write_text(json.dumps(args.item.get_state()))

  def restore(self, directory: epath.Path, args: "DataIteratorRestore"):  # pylint: disable=arguments-differ
    path = self._file(directory)
    if path.exists():
      state = json.loads(path.read_text())
    else:  # written by a different process count: merge what every process saved
      state = _merge_iterator_states([json.loads(f.read_text()) for f in sorted(directory.glob("process_*.json"))], path)
    args.item.set_state(state)
    return args.item

  def metadata(self, directory: epath.Path):
    del directory

  def finalize(self, directory: epath.Path):
    del directory

  def close(self):
    pass


def _merge_iterator_states(states: list, missing: epath.Path):
  """One state from those of another process count: identical states (e.g. a step counter) or disjoint streams."""
  if not states:
    raise FileNotFoundError(f"{missing}: no data-iterator state in this checkpoint")
  if all(s == states[0] for s in states):
    return states[0]
  if all(isinstance(s, dict) and set(s) == {"streams"} for s in states):
    return {"streams": {k: v for s in states for k, v in s["streams"].items()}}
  raise ValueError(f"{missing}: the data-iterator states of {len(states)} processes cannot be merged for this process")


@ocp.args.register_with_handler(DataIteratorHandler, for_save=True)
@dataclasses.dataclass
class DataIteratorSave(ocp.args.CheckpointArgs):
  item: Any


@ocp.args.register_with_handler(DataIteratorHandler, for_restore=True)
@dataclasses.dataclass
class DataIteratorRestore(ocp.args.CheckpointArgs):
  item: Any


class CheckpointMismatchError(ValueError):
  """A checkpoint that reads fine but holds a different tree (model or optimizer) than the config builds."""


# Orbax's words for a readable checkpoint whose tree or shapes differ from the restore target.
_MISMATCH_MARKERS = ("tree structures do not match", "Shape mismatch", "shape mismatch", "Requested shape")


def _checkpointable(data_iterator) -> bool:
  return data_iterator is not None and hasattr(data_iterator, "get_state") and data_iterator.get_state() is not None


def create_manager(config) -> Optional[ocp.CheckpointManager]:
  if not config.enable_checkpointing:
    return None
  options = ocp.CheckpointManagerOptions(
      save_interval_steps=1,  # the train loop decides when; see save()
      max_to_keep=config.max_num_checkpoints_to_keep or None,
      enable_async_checkpointing=config.async_checkpointing,
      create=True,
  )
  return ocp.CheckpointManager(
      storage.as_path(storage.absolute(config.checkpoint_dir)),
      options=options,
      item_handlers={ITEMS: ocp.StandardCheckpointHandler(), ITER: DataIteratorHandler()},
  )


def save(manager: ocp.CheckpointManager, step: int, state, data_iterator=None) -> bool:
  args = {ITEMS: ocp.args.StandardSave(state)}
  if _checkpointable(data_iterator):
    args[ITER] = DataIteratorSave(data_iterator)
  step_dir = epath.Path(manager.directory) / str(step)
  if step in manager.all_steps():
    # Only reached when resuming skipped this step as unreadable: replace it rather than fail the run.
    logger.warning("WARNING: replacing unreadable checkpoint at step %d", step)
    manager.delete(step)
  elif storage.is_remote(manager.directory) and step_dir.exists():
    # A save killed mid-write on an object store leaves the step directory without its commit marker.
    logger.warning("WARNING: removing the unfinished checkpoint at %s before saving step %d again", step_dir, step)
    step_dir.rmtree()
  saved = manager.save(step, args=ocp.args.Composite(**args), force=True)
  if saved:
    logger.info(
        "Saving checkpoint for step %d to %s (%s)",
        step,
        manager.directory,
        "async" if manager._options.enable_async_checkpointing else "sync",
    )
  return saved


def _abstract_with_shardings(abstract_state, shardings):
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings)


def restore_latest(manager: ocp.CheckpointManager, abstract_state, shardings, data_iterator=None):
  """Restores the newest committed step that reads back; returns (state, step) or (None, None).

  A step that fails to read (corrupt or partial files) is skipped with a warning, falling back to the
  previous one, so a damaged latest checkpoint costs one checkpoint period rather than the run.
  """
  target = _abstract_with_shardings(abstract_state, shardings)
  listed = set(manager.all_steps())
  steps = [s for s in committed_steps(manager.directory) if s in listed]
  for i, step in enumerate(steps):
    args = {ITEMS: ocp.args.StandardRestore(target)}
    has_iter = (epath.Path(manager.directory) / str(step) / ITER).exists()
    if has_iter and _checkpointable(data_iterator):
      args[ITER] = DataIteratorRestore(data_iterator)
    try:
      relayout = _relayout_target(epath.Path(manager.directory) / str(step) / ITEMS, abstract_state)
      if relayout is None:
        restored = manager.restore(step, args=ocp.args.Composite(**args))
      else:
        # Written with another pipeline layout: arrays come back in theirs, then are reshaped and placed.
        logger.info("Checkpoint at step %d has another pipeline layer layout; reshaping it to this run's", step)
        items = _restore_relayout(epath.Path(manager.directory) / str(step) / ITEMS, relayout, abstract_state, shardings)
        restored = {ITEMS: items}
        if ITER in args:
          restored[ITER] = manager.restore(step, args=ocp.args.Composite(**{ITER: args[ITER]}))[ITER]
    except Exception as e:  # orbax/tensorstore raise many types for damaged files
      first_line = str(e).splitlines()[0][:300] if str(e) else ""
      if any(m in str(e) for m in _MISMATCH_MARKERS):
        raise CheckpointMismatchError(
            f"checkpoint at step {step} in {manager.directory} does not match this config's model/optimizer"
            f" ({first_line}); use the settings it was written with, or another run_name"
        ) from None
      if i + 1 == len(steps):
        raise CheckpointMismatchError(
            f"no checkpoint in {manager.directory} could be restored (last error: {first_line})"
        ) from e
      logger.warning(
          "WARNING: checkpoint at step %d in %s could not be restored (%s: %s); falling back to step %d",
          step,
          manager.directory,
          type(e).__name__,
          first_line,
          steps[i + 1],
      )
      continue
    if _checkpointable(data_iterator) and not has_iter:
      logger.warning(
          "Checkpoint at step %d has no data-iterator state; the data pipeline restarts from its beginning", step
      )
    logger.info("Restored checkpoint at step %d from %s", step, manager.directory)
    return restored[ITEMS], step
  return None, None


def _items_path(path: str) -> epath.Path:
  path = storage.as_path(storage.absolute(path))
  if not path.exists():
    raise FileNotFoundError(f"checkpoint path {path} does not exist")
  if (path / ITEMS).exists():  # a step directory of a training run: use its state item
    path = path / ITEMS
  return path


def _restore_subtree(path: epath.Path, target: dict):
  """Restores just the keys in `target` from a PyTree checkpoint directory (partial restore)."""
  restore_args = ocp.checkpoint_utils.construct_restore_args(target)
  with ocp.PyTreeCheckpointer() as ckptr:
    return ckptr.restore(path, args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True))


def layers_are_unscanned(tree) -> bool:
  """True when decoder/layers holds one entry per layer (keys 0, 1, ...) rather than stacked arrays."""
  layers = tree.get("decoder", {}).get("layers", {}) if isinstance(tree, dict) else {}
  return bool(layers) and all(str(k).isdigit() for k in layers)


def stored_params_tree(path: str) -> dict:
  """The params subtree of a checkpoint's metadata (shapes and dtypes, no data)."""
  path = _items_path(path)
  with ocp.PyTreeCheckpointer() as ckptr:
    meta = ckptr.metadata(path)
  tree = meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta.tree
  if "params" not in tree:
    raise ValueError(f"{path}: no 'params' in this checkpoint (keys: {sorted(tree)})")
  return tree["params"]


def load_params(path: str, abstract_params, shardings, param_scan_axis: int = 1):
  """Params from a params-only checkpoint ({"params": ...}) or a full train-state checkpoint.

  The stored layer layout (scanned or unscanned; a pipelined run's stage split of the layer axis) is detected and
  converted to `abstract_params`'s, and values are cast to its dtypes, so any of these checkpoints loads into any
  config of the same model.
  """
  from MaxText.layers import scan_layout  # pylint: disable=import-outside-toplevel

  items = _items_path(path)
  stored_unscanned = layers_are_unscanned(stored_params_tree(path))
  want_unscanned = layers_are_unscanned(abstract_params)
  if stored_unscanned == want_unscanned:
    relayout = _relayout_target(items, {"params": abstract_params})
    if relayout is None:
      target = {"params": _abstract_with_shardings(abstract_params, shardings)}
      return _restore_subtree(items, target)["params"]
    logger.info("Reshaping the pipeline layer layout of %s to this config's", path)
    return _restore_relayout(items, relayout, {"params": abstract_params}, {"params": shardings})["params"]
  logger.info(
      "Converting %s layers of %s to the %s layout",
      "unscanned" if stored_unscanned else "scanned",
      path,
      "unscanned" if want_unscanned else "scanned",
  )
  # Both sides in the scanned layout, where a pipelined run's [R, S, Lps] layer axis is a reshape of [units].
  host = _restore_subtree(items, {"params": _stored_abstract(items)["params"]})["params"]
  if stored_unscanned:
    host = scan_layout.unscanned_to_scanned(host, param_scan_axis)
  plain = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), abstract_params)
  want = scan_layout.unscanned_to_scanned(plain, param_scan_axis) if want_unscanned else plain
  if want_unscanned and scan_layout.stacks_disagree(host, want):  # the stored stacks' names place the layers
    host = scan_layout.scanned_to_unscanned(host, param_scan_axis)
    host = jax.tree.map(lambda x, a: np.asarray(x).astype(a.dtype).reshape(a.shape), host, plain)
    return jax.device_put(host, shardings)
  host = jax.tree.map(lambda x, a: np.asarray(x).astype(a.dtype).reshape(a.shape), host, want)
  if want_unscanned:
    host = scan_layout.scanned_to_unscanned(host, param_scan_axis)
  return jax.device_put(host, shardings)


def load_full_state(path: str, abstract_state, shardings):
  items = _items_path(path)
  relayout = _relayout_target(items, abstract_state)
  if relayout is not None:
    return _restore_relayout(items, relayout, abstract_state, shardings)
  return _restore_subtree(items, _abstract_with_shardings(abstract_state, shardings))


def _key_name(key) -> str:
  for attr in ("key", "idx", "name"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _stored_abstract(items: epath.Path):
  """A checkpoint item's tree as stored (nested dicts/lists of ShapeDtypeStructs), from its metadata."""
  with ocp.PyTreeCheckpointer() as ckptr:
    meta = ckptr.metadata(items)
  tree = meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta.tree
  return jax.tree.map(
      lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), tree, is_leaf=lambda m: hasattr(m, "shape")
  )


def _relayout_target(items: epath.Path, abstract):
  """`abstract` (no shardings) with the checkpoint's shapes where only a stacked layer axis is split differently (a
  pipelined run's [R, S, Lps] vs [units]); None when nothing needs reshaping."""
  from MaxText.layers import pipeline  # pylint: disable=import-outside-toplevel

  flat = jax.tree_util.tree_flatten_with_path(_stored_abstract(items))[0]
  stored = {tuple(_key_name(k) for k in path): leaf.shape for path, leaf in flat}
  differs = False

  def one(path, leaf):
    nonlocal differs
    key = tuple(_key_name(k) for k in path)
    have = stored.get(key)
    in_layers = any(key[i : i + 2] == ("decoder", "layers") for i in range(len(key)))
    if have is None or have == tuple(leaf.shape) or not in_layers or not pipeline.relayout_compatible(have, leaf.shape):
      return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype)
    differs = True
    return jax.ShapeDtypeStruct(have, leaf.dtype)

  target = jax.tree_util.tree_map_with_path(one, abstract)
  return target if differs else None


def _restore_relayout(items: epath.Path, target, abstract, shardings):
  """Restores `target` (stored shapes) to host memory, reshapes each array to `abstract`'s and places it."""
  host = _restore_subtree(items, target)
  return jax.device_put(jax.tree.map(lambda x, a: np.asarray(x).reshape(a.shape), host, abstract), shardings)


def save_params(path: str, params):
  """Writes a params-only checkpoint that `load_parameters_path` (train, decode, api) reads."""
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(storage.as_path(storage.absolute(path)), {"params": params}, force=True)
    ckptr.wait_until_finished()
