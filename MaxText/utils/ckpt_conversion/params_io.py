"""Params-only Orbax checkpoints ({"params": ...}, the layout checkpointing.save_params writes), streamed.

Writing goes through Orbax's partial saves: each batch of arrays is added to one checkpoint and dropped from host
memory, so converting a model never holds all of it. A save briefly needs a second copy of its batch (Orbax's
serialization buffers), so peak memory is about twice max(batch budget, largest array). Reading restores just the
arrays asked for, as numpy.

A bucket destination (gs://, ...) is staged on local disk (Orbax's partial saves write local directories only) and
uploaded at `finalize`: the converted checkpoint then needs that much free space under TMPDIR.
"""

import ctypes
import logging
import pathlib
import shutil
import tempfile
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import traverse_util
from orbax.checkpoint.experimental import v1 as ocp_v1

from MaxText import checkpointing, storage

Path = tuple[str | int, ...]
logger = logging.getLogger("MaxText")


def release_freed_memory():
  """Returns freed heap pages to the OS (glibc keeps them per thread arena, so RSS would only ever grow)."""
  try:
    ctypes.CDLL(None).malloc_trim(0)
  except (OSError, AttributeError):  # not glibc
    pass


class StreamingParamsWriter:
  """Adds arrays to a params checkpoint at `path` in batches of up to `flush_bytes` (or one larger array).

  Call `finalize` at the end; until then the checkpoint lives in `<path>.partial`.
  """

  def __init__(self, path: str, flush_bytes: int = 128 * 2**20):
    self.remote = storage.as_path(path) if storage.is_remote(path) else None
    if self.remote is not None:
      if self.remote.exists():
        raise FileExistsError(f"{path} already exists; choose another output directory or remove it")
      self._tmp = tempfile.mkdtemp(prefix="maxtext-params-")
      self.path = pathlib.Path(self._tmp) / "params"
    else:
      self.path = pathlib.Path(path).absolute()
      if self.path.exists():
        raise FileExistsError(f"{self.path} already exists; choose another output directory or remove it")
    self.staging = self.path.with_name(self.path.name + ".partial")
    shutil.rmtree(self.staging, ignore_errors=True)  # a conversion that died half way
    self.flush_bytes = flush_bytes
    self.buffer: dict[Path, np.ndarray] = {}
    self.buffered = 0
    self.written = 0

  def make_room(self, nbytes: int):
    """Saves the batch now if `nbytes` more would overflow it: call before allocating big arrays to add."""
    if self.buffer and self.buffered + nbytes > self.flush_bytes:
      self.flush()

  def add(self, path: Path, array: np.ndarray):
    self.make_room(array.nbytes)
    self.buffer[path] = array
    self.buffered += array.nbytes
    if self.buffered >= self.flush_bytes:
      self.flush()

  def flush(self):
    if not self.buffer:
      return
    ocp_v1.partial.save(self.staging, traverse_util.unflatten_dict({("params",) + p: a for p, a in self.buffer.items()}))
    self.written += self.buffered
    self.buffer, self.buffered = {}, 0
    release_freed_memory()

  def finalize(self):
    self.flush()
    ocp_v1.partial.finalize(self.staging)
    # A partial save keeps the tree under "state/"; that directory alone is the usual params checkpoint.
    shutil.move(self.staging / "state", self.path)
    shutil.rmtree(self.staging)
    if self.remote is not None:
      logger.info("Uploading the params checkpoint to %s", self.remote)
      upload_tree(self.path, str(self.remote))
      shutil.rmtree(self._tmp, ignore_errors=True)


# Orbax's commit marker on object stores, where a checkpoint directory is written in place (no rename): without it
# Orbax reads the directory as an incomplete checkpoint. Written last, so an interrupted upload stays incomplete.
COMMIT_MARKER = "commit_success.txt"


def upload_tree(local: pathlib.Path, url: str):
  """Copies the Orbax checkpoint directory `local` to `url` (a bucket prefix), file by file, then commits it."""
  import fsspec  # pylint: disable=import-outside-toplevel

  fs, root = fsspec.core.url_to_fs(url)
  for file in sorted(p for p in local.rglob("*") if p.is_file()):
    fs.put_file(str(file), f"{root}/{file.relative_to(local).as_posix()}")
  fs.pipe_file(f"{root}/{COMMIT_MARKER}", f"Checkpoint commit was successful to {url}".encode())


class ParamsReader:
  """Arrays of a params-only checkpoint (or a training step directory), by path, in its stored layout."""

  def __init__(self, path: str):
    self.tree = checkpointing.stored_params_tree(path)
    root = epath.Path(path)
    self.items = root / checkpointing.ITEMS if (root / checkpointing.ITEMS).exists() else root
    self.unscanned = checkpointing.layers_are_unscanned(self.tree)

  def shape(self, path: Path) -> tuple[int, ...]:
    node: Any = self.tree
    for key in path:
      node = node[str(key)] if str(key) in node else node[key]
    return tuple(node.shape)

  def read(self, paths: list[Path]) -> list[np.ndarray]:
    """The arrays at `paths` as numpy, in their stored dtype; one restore for all of them."""
    flat = {}
    for p in paths:
      meta = self.tree
      for key in p:
        meta = meta[str(key)] if str(key) in meta else meta[key]
      flat[("params",) + tuple(str(k) for k in p)] = jax.ShapeDtypeStruct(tuple(meta.shape), meta.dtype)
    target = traverse_util.unflatten_dict(flat)
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
    with ocp.PyTreeCheckpointer() as ckptr:
      out = ckptr.restore(
          self.items, args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True)
      )
    out = traverse_util.flatten_dict(out)
    return [np.asarray(out[("params",) + tuple(str(k) for k in p)]) for p in paths]
