"""Converts a model state between the scanned layer layout and the unscanned (per-layer) one.

Scanned:   decoder/layers/<param path>     each array stacked over layers at `param_scan_axis` (logical name "layers")
Unscanned: decoder/layers/<i>/<param path> one array per layer
When layers differ in kind (dense and MoE layers, see decoders.StackLayout), scanned params are grouped instead:
decoder/layers/prefix/<param path> and decoder/layers/block_<r>/<param path>; layer kinds are told apart by their
parameter names, so the conversion needs no config.

Both nnx States (Variables keep their metadata, the "layers" logical name is removed/inserted; abstract
ShapeDtypeStruct values work too, for restore targets) and plain nested dicts of arrays (params only, e.g. a
checkpoint's pure dict or a Hugging Face conversion) are accepted; the result has the input's kind.
"""

from typing import Any

import jax
import numpy as np
from flax import nnx, traverse_util

from MaxText.layers.decoders import LAYERS_PATH, StackLayout, stack_layout

_LAYERS = "layers"


def _flatten(tree) -> tuple[dict[tuple, Any], bool]:
  if isinstance(tree, nnx.State):
    return dict(tree.flat_state()), True
  return traverse_util.flatten_dict(tree), False


def _unflatten(flat: dict[tuple, Any], is_state: bool):
  if is_state:
    return nnx.State.from_flat_path(sorted(flat.items(), key=lambda kv: tuple(map(str, kv[0]))))
  return traverse_util.unflatten_dict(flat)


def _axis(leaf, param_scan_axis: int) -> int:
  # Non-param variables (e.g. KV caches) are stacked on the leading axis, as scan_axes() in decoders.py does.
  if isinstance(leaf, nnx.Variable) and not isinstance(leaf, nnx.Param):
    return 0
  return param_scan_axis


def _value(leaf):
  return leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf


def _with_value(leaf, value, names):
  if not isinstance(leaf, nnx.Variable):
    return value
  new = leaf.replace(value)
  if names is not None:
    new.set_metadata(out_sharding=names)
  return new


def _names(leaf):
  if not isinstance(leaf, nnx.Variable):
    return None
  names = leaf.get_metadata().get("out_sharding")
  return tuple(names) if names else None


def _take(value, i: int, axis: int):
  if isinstance(value, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct(value.shape[:axis] + value.shape[axis + 1 :], value.dtype)
  index = (slice(None),) * axis + (i,)
  return value[index]


def _stack(values: list, axis: int):
  first = values[0]
  if isinstance(first, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct(first.shape[:axis] + (len(values),) + first.shape[axis:], first.dtype)
  if isinstance(first, np.ndarray):
    return np.stack(values, axis=axis)
  return jax.numpy.stack(values, axis=axis)


def _is_layer_path(path: tuple) -> bool:
  return path[: len(LAYERS_PATH)] == LAYERS_PATH


def _groups_of(flat: dict) -> set[str] | None:
  """The StackLayout group names under decoder/layers when the layers differ by kind, else None."""
  n = len(LAYERS_PATH)
  top = {str(path[n]) for path in flat if _is_layer_path(path) and len(path) > n}
  if top and all(t == "prefix" or (t.startswith("block_") and t[len("block_") :].isdigit()) for t in top):
    return top
  return None


def stacks_disagree(stored, stacked) -> bool:
  """Whether a stored scanned tree stacks its layers by kind (prefix / block_<r>) while `stacked` (a config's tree
  through unscanned_to_scanned) does not group them the same way. Kinds are told apart by parameter names, which a
  partial tree (say LoRA adapters on attention alone) lacks: then only the stored group names place the layers."""
  groups = _groups_of(_flatten(stored)[0])
  return groups is not None and groups != _groups_of(_flatten(stacked)[0])


def scanned_to_unscanned(tree, param_scan_axis: int):
  """Splits each stacked decoder-layer array into per-layer entries decoder/layers/<i>/...."""
  flat, is_state = _flatten(tree)
  out = {}
  n = len(LAYERS_PATH)
  groups = _groups_of(flat)
  sizes = {}  # group -> stacked count, to place block layers after the prefix
  layout = None
  if groups is not None:
    for path, leaf in flat.items():
      if _is_layer_path(path):
        sizes.setdefault(str(path[n]), _value(leaf).shape[_axis(leaf, param_scan_axis)])
    layout = StackLayout(
        sizes.get("prefix", 0) + sum(v for k, v in sizes.items() if k != "prefix"),
        sizes.get("prefix", 0),
        len(groups - {"prefix"}),
    )
  for path, leaf in flat.items():
    if not _is_layer_path(path):
      out[path] = leaf
      continue
    if layout is None:
      indices, rest = None, path[n:]
    else:
      indices, rest = layout.layer_indices(str(path[n])), path[n + 1 :]
    axis = _axis(leaf, param_scan_axis)
    value, names = _value(leaf), _names(leaf)
    if names is not None:
      if names[axis] != _LAYERS:
        raise ValueError(f"{'/'.join(map(str, path))}: axis {axis} is named {names[axis]!r}, not 'layers'")
      names = names[:axis] + names[axis + 1 :]
    for j in range(value.shape[axis]):
      i = j if indices is None else indices[j]
      out[path[:n] + (i,) + rest] = _with_value(leaf, _take(value, j, axis), names)
  return _unflatten(out, is_state)


def unscanned_to_scanned(tree, param_scan_axis: int):
  """Stacks per-layer entries decoder/layers/<i>/... into one array per parameter (layer index at the scan axis).

  Layers of different kinds (MoE and dense, told apart by their parameter names) are stacked as StackLayout says.
  """
  flat, is_state = _flatten(tree)
  out, by_layer = {}, {}
  n = len(LAYERS_PATH)
  for path, leaf in flat.items():
    if not _is_layer_path(path):
      out[path] = leaf
      continue
    layer = path[n]
    if isinstance(layer, str) and layer.isdigit():
      layer = int(layer)  # pure dicts read back from checkpoints may carry string keys
    by_layer.setdefault(layer, {})[path[n + 1 :]] = leaf
  if not by_layer:
    return _unflatten(out, is_state)
  if sorted(by_layer) != list(range(len(by_layer))):
    raise ValueError(f"{'/'.join(LAYERS_PATH)}: layers {sorted(by_layer)} are not 0..{len(by_layer) - 1}")
  layout = stack_layout([frozenset(by_layer[i]) for i in range(len(by_layer))])
  for group, _, _ in layout.groups():
    indices = layout.layer_indices(group)
    prefix = LAYERS_PATH + ((group,) if group else ())
    for rest in by_layer[indices[0]]:
      leaves = [by_layer[i][rest] for i in indices]
      axis = _axis(leaves[0], param_scan_axis)
      names = _names(leaves[0])
      if names is not None:
        names = names[:axis] + (_LAYERS,) + names[axis:]
      out[prefix + rest] = _with_value(leaves[0], _stack([_value(x) for x in leaves], axis), names)
  return _unflatten(out, is_state)
