"""Device mesh and logical-axis sharding.

Model code names array dimensions logically (`embed`, `mlp`, `heads`, `activation_batch`, ...);
`logical_axis_rules` from the config map each name to the mesh axes it shards over. A dimension is sharded
over every listed mesh axis that is larger than 1, not already used by an earlier dimension, and (when the
shape is known) keeps the dimension divisible, so one rule set serves every mesh shape.
"""

import contextlib
import contextvars
import math
from typing import Any, Optional, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from MaxText.config_schema import ConfigError

Rules = Sequence[Sequence[Any]]
# Logical names of the residual stream [batch, seq, embed] between layers.
EMBED_ACTIVATION = ("activation_batch", "activation_length", "activation_embed")
# The embedding's output and the head + loss, outside the layer stack: their batch also splits over `stage`, so
# pipeline stages share that work instead of each repeating it (inside the stack `stage` holds the layers).
EMBED_AND_LOGITS_BATCH = "activation_embed_and_logits_batch"
EMBED_AND_LOGITS_ACTIVATION = (EMBED_AND_LOGITS_BATCH, "activation_length", "activation_embed")
LOGITS_ACTIVATION = (EMBED_AND_LOGITS_BATCH, "activation_length", "activation_vocab")

# The mesh and rules that `with_logical_constraint` uses inside model code; set by `use_mesh`.
_ACTIVE: contextvars.ContextVar[Optional[tuple[Mesh, Rules]]] = contextvars.ContextVar("maxtext_mesh", default=None)


def create_mesh(config, devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """The device mesh from the config's filled ici_*/dcn_* degrees over `mesh_axes`."""
  devices = list(jax.devices() if devices is None else devices)
  ici, dcn = list(config.ici_parallelism), list(config.dcn_parallelism)
  if math.prod(ici) * math.prod(dcn) != len(devices):
    raise ConfigError(f"ici_*/dcn_*_parallelism: mesh {ici} x {dcn} does not cover {len(devices)} devices")
  if math.prod(dcn) > 1:
    array = mesh_utils.create_hybrid_device_mesh(
        ici,
        dcn,
        devices,
        process_is_granule=not hasattr(devices[0], "slice_index"),
        allow_split_physical_axes=config.allow_split_physical_axes,
    )
  else:
    try:
      array = mesh_utils.create_device_mesh(ici, devices, allow_split_physical_axes=config.allow_split_physical_axes)
    except (ValueError, NotImplementedError):
      # Device kinds without a topology-aware layout (e.g. uncommon GPU counts): plain row-major order.
      array = np.array(devices).reshape(ici)
  return Mesh(array, tuple(config.mesh_axes), axis_types=(AxisType.Auto,) * len(config.mesh_axes))


def _rule_table(rules: Rules) -> dict[str, tuple[str, ...]]:
  table = {}
  for name, axes in rules:
    axes = tuple(axes) if isinstance(axes, (list, tuple)) else (axes,)
    table.setdefault(name, axes)
  return table


def logical_to_mesh_spec(
    logical: Sequence[Optional[str]],
    rules: Rules,
    mesh: Mesh,
    shape: Optional[Sequence[int]] = None,
    exclude: Sequence[str] = (),
) -> PartitionSpec:
  """PartitionSpec for an array whose dimensions carry the given logical names (None = replicated); mesh axes in
  `exclude` are left out."""
  table = _rule_table(rules)
  used: set[str] = set(exclude)
  spec = []
  for dim, name in enumerate(logical):
    if name is None:
      spec.append(None)
      continue
    if name not in table:
      raise ValueError(f"logical axis {name!r} has no entry in logical_axis_rules")
    chosen, product = [], 1
    for axis in table[name]:
      size = mesh.shape[axis]
      if size == 1 or axis in used:
        continue
      if shape is not None and shape[dim] % (product * size):
        continue
      chosen.append(axis)
      product *= size
    used.update(chosen)
    spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
  while spec and spec[-1] is None:
    spec.pop()
  return PartitionSpec(*spec)


def logical_to_sharding(logical, rules: Rules, mesh: Mesh, shape=None) -> NamedSharding:
  return NamedSharding(mesh, logical_to_mesh_spec(logical, rules, mesh, shape))


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: Rules):
  """Makes `mesh` and `rules` the ones model code constrains activations with (and jax's current mesh)."""
  token = _ACTIVE.set((mesh, rules))
  try:
    with jax.set_mesh(mesh):
      yield mesh
  finally:
    _ACTIVE.reset(token)


def with_logical_constraint(x: jax.Array, logical: Sequence[Optional[str]]) -> jax.Array:
  """Constrains an activation's sharding by logical names; a no-op outside `use_mesh`."""
  active = _ACTIVE.get()
  if active is None:
    return x
  mesh, rules = active
  abstract = jax.sharding.get_abstract_mesh()
  if not abstract.empty and abstract.manual_axes:
    # Inside a shard_map: the manual axes are already split off, and the constraint names the current (abstract) mesh.
    spec = logical_to_mesh_spec(logical, rules, mesh, x.shape, exclude=abstract.manual_axes)
    return jax.lax.with_sharding_constraint(x, NamedSharding(abstract, spec))
  return jax.lax.with_sharding_constraint(x, logical_to_sharding(logical, rules, mesh, x.shape))


def _logical_names(leaf) -> Optional[tuple]:
  """Logical axis names stored on an nnx Variable (flax keeps them as `out_sharding` metadata)."""
  get = getattr(leaf, "get_metadata", None)
  if get is None:
    return None
  meta = get()
  names = meta.get("out_sharding", None) or meta.get("sharding_names", None) or meta.get("sharding", None)
  return tuple(names) if names else None


def state_shardings(state, rules: Rules, mesh: Mesh):
  """NamedShardings for an nnx State (or any tree of Variables / arrays), from their logical names.

  Leaves without logical names are replicated, which is right for scalars such as step counters.
  """

  def one(leaf):
    names = _logical_names(leaf)
    value = leaf.get_value() if hasattr(leaf, "get_value") else leaf
    shape = getattr(value, "shape", ())
    if names is None or len(names) != len(shape):
      return NamedSharding(mesh, PartitionSpec())
    return logical_to_sharding(names, rules, mesh, shape)

  return jax.tree.map(one, state, is_leaf=lambda x: hasattr(x, "get_metadata"))


def data_sharding(config, mesh: Mesh, shape: Sequence[int]) -> NamedSharding:
  """Sharding of an input batch: the batch dimension over `data_sharding`'s axes (those that divide it).

  `data_sharding` is upstream MaxText's nested form ([[axis, ...]], the first group shards the batch) or a flat
  list of axis names.
  """
  groups = list(config.data_sharding)
  first = groups[0] if groups else []
  axes = list(first) if isinstance(first, (list, tuple)) else [g for g in groups if isinstance(g, str)]
  rules = [("batch", axes)]
  return logical_to_sharding(("batch",) + (None,) * (len(shape) - 1), rules, mesh, shape)
