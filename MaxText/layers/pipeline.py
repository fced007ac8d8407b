"""Pipeline parallelism over the `stage` mesh axis: GPipe fill and drain, and MaxText's circular schedule.

The pipelined part of the decoder stack is `blocks` scan units (one layer, or one period of interleaved dense/MoE
layers). With S stages and R repeats each stage holds R non-adjacent groups of Lps = blocks / (S R) units: unit
g = (r S + s) Lps + k belongs to stage s, repeat r. Stored that way, a stacked parameter's layer axis [blocks]
becomes [R, S, Lps], a row-major reshape, so a pipelined checkpoint differs from an unpipelined one only by that
reshape (`to_pipelined` / `from_pipelined`), and the S axis is sharded over `stage`: each stage's devices hold only
its own layers.

A step splits the batch into M micro-batches that flow through the stages for M R + S - 1 iterations. In each
iteration every stage runs its current group on its current micro-batch (a shard_map over the stage axis: stage
s's devices run stage s's program, sharded by GSPMD over the other axes), then the activations move one stage on
with a collective-permute (shard_map + ppermute over `stage`). Stage 0 reads micro-batch t mod M from a buffer that
the last stage writes back to, which is what lets a micro-batch go round the stages R times (the circular schedule
needs M >= S). The bubble, the share of stage-iterations that compute nothing useful, is (S - 1) / (M R + S - 1).
"""

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from MaxText import sharding

STAGE_AXIS = "stage"  # the mesh axis stages are laid over
# Logical names of the [R, S, Lps] axes that replace a stacked parameter's "layers" axis (rules: S -> stage).
REPEAT_NAME, STAGE_NAME, LAYERS_NAME = "layers_repeat", "layers_stage", "layers"
# Logical names of the activations between stages, [S, micro-batch, seq, embed], and of the micro-batch buffer.
STAGE_ACTIVATION = ("activation_stage",) + sharding.EMBED_ACTIVATION
BUFFER_ACTIVATION = (None,) + sharding.EMBED_ACTIVATION


@dataclasses.dataclass(frozen=True)
class Schedule:
  """S stages, R repeats, M micro-batches over `blocks` scan units."""

  stages: int
  repeats: int
  microbatches: int
  blocks: int
  remat_iterations: bool = True  # recompute each iteration's stage forward in the backward pass (see run)

  @property
  def per_stage(self) -> int:
    """Lps: consecutive units a stage runs per visit."""
    return self.blocks // (self.stages * self.repeats)

  @property
  def iterations(self) -> int:
    return self.microbatches * self.repeats + self.stages - 1

  @property
  def bubble_fraction(self) -> float:
    return (self.stages - 1) / self.iterations


def schedule_from_config(config, blocks: int) -> Schedule | None:
  """The config's Schedule, or None when it has one stage (no pipeline)."""
  if config.pipeline_stages <= 1:
    return None
  return Schedule(
      config.pipeline_stages,
      config.num_pipeline_repeats,
      config.pipeline_microbatches,
      blocks,
      config.pipeline_remat_iterations,
  )


def describe(schedule: Schedule, batch: int) -> str:
  """The start-up line: the schedule and its bubble."""
  return (
      f"Pipeline: {schedule.stages} stages x {schedule.repeats} repeats, {schedule.per_stage} scan units per stage"
      f" visit, {schedule.microbatches} micro-batches of {batch // schedule.microbatches} sequences;"
      f" {schedule.iterations} iterations, bubble fraction {schedule.bubble_fraction:.3f}"
      + ("; each iteration recomputed in the backward pass" if schedule.remat_iterations else "")
  )


def to_pipelined(x, axis: int, stages: int, repeats: int):
  """[..., blocks, ...] at `axis` -> [..., R, S, Lps, ...] (jax arrays or ShapeDtypeStructs)."""
  shape = x.shape
  new = shape[:axis] + (repeats, stages, shape[axis] // (stages * repeats)) + shape[axis + 1 :]
  if isinstance(x, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct(new, x.dtype)
  return x.reshape(new)


def from_pipelined(x, axis: int):
  """[..., R, S, Lps, ...] at `axis` -> [..., blocks, ...]."""
  shape = x.shape
  new = shape[:axis] + (shape[axis] * shape[axis + 1] * shape[axis + 2],) + shape[axis + 3 :]
  if isinstance(x, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct(new, x.dtype)
  return x.reshape(new)


def pipelined_names(names: tuple, axis: int) -> tuple:
  """A stacked parameter's logical names with its "layers" axis at `axis` replaced by the [R, S, Lps] names."""
  return names[:axis] + (REPEAT_NAME, STAGE_NAME, LAYERS_NAME) + names[axis + 1 :]


def unpipelined_names(names: tuple, axis: int) -> tuple:
  return names[:axis] + (LAYERS_NAME,) + names[axis + 3 :]


def _stage_mesh(stages: int):
  """The current (abstract) mesh when it has a `stage` axis of `stages` devices, else None (e.g. an abstract
  trace without the stage mesh, where the pipeline runs the same values without stage collectives)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or STAGE_AXIS not in mesh.shape or mesh.shape[STAGE_AXIS] != stages:
    return None
  return mesh


def _shift(x: jax.Array, stages: int) -> jax.Array:
  """Stage s's activations to stage s + 1 (the last stage's wrap to stage 0): one collective-permute."""
  mesh = _stage_mesh(stages)
  perm = [(s, (s + 1) % stages) for s in range(stages)]
  if mesh is None:
    return jnp.roll(x, 1, axis=0)  # no stage mesh (e.g. an abstract trace): the same values
  return jax.shard_map(
      lambda a: jax.lax.ppermute(a, STAGE_AXIS, perm),
      mesh=mesh,
      in_specs=P(STAGE_AXIS),
      out_specs=P(STAGE_AXIS),
      axis_names={STAGE_AXIS},
  )(x)


def _over_stages(one_stage: Callable, stages: int, axis: int) -> Callable:
  """one_stage(w, h, pos, seg, repeat, stage) for one stage -> the same over all S stages at once: weights with the S
  axis at axis + 1 ([R, S, Lps] at `axis`), the other arguments with S leading; outputs with S leading.

  On the stage mesh it is a shard_map over `stage` alone: each stage's devices trace and run their own stage's
  program, which GSPMD shards over the remaining axes exactly like the unpipelined stack (a vmap with spmd_axis_name
  leaves the stage axis to GSPMD, and on TPU some weight gradients then came out as a full all-reduce per layer
  where the unpipelined scan reduce-scatters them: 0.64 vs 0.08 GiB of all-reduce on a v5e-8 test model).
  Without that mesh (an abstract trace) it is a plain vmap with the same values.
  """
  mesh = _stage_mesh(stages)
  if mesh is None:
    return jax.vmap(one_stage, in_axes=(axis + 1, 0, 0, 0, 0, 0))

  def local(w, h, pos, seg, repeat, stage):  # this stage's slice of every argument: a size-1 S axis
    w = jax.tree.map(lambda a: jnp.squeeze(a, axis + 1), w)
    first = lambda a: None if a is None else a[0]
    y, aux = one_stage(w, first(h), first(pos), first(seg), first(repeat), first(stage))
    return y[None], jax.tree.map(lambda a: a[None], aux)

  def run_stages(w, h, pos, seg, repeat, stage):
    w_spec = jax.tree.map(lambda _: P(*([None] * (axis + 1)), STAGE_AXIS), w)
    s_spec = P(STAGE_AXIS)
    in_specs = (w_spec, s_spec, s_spec, None if seg is None else s_spec, s_spec, s_spec)
    # check_vma=False: custom VJPs inside the layers (e.g. the grouped matmul's) return cotangents that do not carry
    # the stage axis's varying-value type, which the check would reject; every argument is split over `stage`.
    return jax.shard_map(
        local, mesh=mesh, in_specs=in_specs, out_specs=(s_spec, s_spec), axis_names={STAGE_AXIS}, check_vma=False
    )(w, h, pos, seg, repeat, stage)

  return run_stages


def _microbatches(x: jax.Array, m: int) -> jax.Array:
  """[B, ...] -> [M, B / M, ...]: micro-batch i takes rows i, i + M, ..., so each device keeps its own rows."""
  return jnp.swapaxes(x.reshape((x.shape[0] // m, m) + x.shape[1:]), 0, 1)


def _unmicrobatch(x: jax.Array) -> jax.Array:
  return jnp.swapaxes(x, 0, 1).reshape((x.shape[0] * x.shape[1],) + x.shape[2:])


def run(
    schedule: Schedule,
    stage_fn: Callable,
    weights,
    x: jax.Array,
    positions: jax.Array,
    segment_ids: jax.Array | None,
    axis: int,
):
  """Runs the pipelined units on x [B, T, E]; returns (y [B, T, E], aux summed over micro-batches).

  `weights`: a pytree of arrays with the [R, S, Lps] axes at `axis`. `stage_fn(weights, x, positions, segment_ids,
  first_unit)` runs one stage's Lps units (weights with [Lps] at `axis`, `first_unit` the canonical index of the
  first) on one micro-batch [B / M, T, E] and returns (y, aux) with aux leaves stacked [Lps, ...]. The returned aux
  has leaves [blocks, ...] in canonical unit order (from_pipelined's), each summed over the micro-batches.
  """
  s_count, r_count, m_count, lps = schedule.stages, schedule.repeats, schedule.microbatches, schedule.per_stage
  if x.shape[0] % m_count:
    raise ValueError(f"batch {x.shape[0]} does not split into {m_count} pipeline micro-batches")
  stage_ids = jnp.arange(s_count, dtype=jnp.int32)
  pos_mb = _microbatches(positions, m_count)
  seg_mb = None if segment_ids is None else _microbatches(segment_ids, m_count)
  buffer = sharding.with_logical_constraint(_microbatches(x, m_count), BUFFER_ACTIVATION)

  def one_stage(w, h, pos, seg, repeat, stage):
    if r_count == 1:  # the same weights every iteration: loop-invariant, so autodiff never stacks copies of them
      w = jax.tree.map(lambda a: jax.lax.index_in_dim(a, 0, axis, keepdims=False), w)
    else:
      w = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, repeat, axis, keepdims=False), w)
    return stage_fn(w, h, pos, seg, (repeat * s_count + stage) * lps)

  stages_fn = _over_stages(one_stage, s_count, axis)
  if schedule.remat_iterations:
    # Without this, every iteration keeps what its stage visit saves for the backward pass (per the layers' remat
    # policy: at least each layer's input), bubble iterations included, and with R > 1 also each iteration's
    # dynamically selected weights and all computed from them. With it, an iteration
    # keeps only its stage inputs and the backward pass recomputes the visit (the layers' own remat policy applies
    # inside): Llama 3.1 405B on v5p-1024 (stage=2 x fsdp=128 x tensor=2, batch 0.5) needs 59.2 GiB of temporaries
    # instead of 116.2 (benchmarks/RESULTS.md), for one more forward pass of the stack.
    stages_fn = jax.checkpoint(stages_fn, policy=jax.checkpoint_policies.nothing_saveable, prevent_cse=False)

  def write_back(buffer, outputs, t):
    """Moves the activations of iteration t one stage on; the last stage's finished visit lands in the buffer (the
    next repeat's input, or the final output). Returns (buffer, shifted activations)."""
    shifted = _shift(outputs, s_count)
    visit = t - (s_count - 1)  # the last stage's visit in iteration t
    valid = (visit >= 0) & (visit < m_count * r_count)
    # Stage 0 now holds it; a masked sum over stages (an all-reduce of one micro-batch) hands it to every stage's
    # copy of the buffer, where indexing the stage-sharded array would gather all of it.
    arrived = jnp.sum(jnp.where((stage_ids == 0)[:, None, None, None], shifted, 0), axis=0)
    slot = jnp.mod(visit, m_count)
    old = jax.lax.dynamic_index_in_dim(buffer, slot, 0, keepdims=False)
    buffer = jax.lax.dynamic_update_index_in_dim(buffer, jnp.where(valid, arrived, old), slot, 0)
    return sharding.with_logical_constraint(buffer, BUFFER_ACTIVATION), shifted

  def iteration(carry, t):
    buffer, outputs, aux_sum = carry
    buffer, inputs = write_back(buffer, outputs, t - 1)
    done = t - stage_ids  # micro-batch visits stage s has started before this iteration
    valid = (done >= 0) & (done < m_count * r_count)
    micro = jnp.mod(done, m_count)
    repeat = jnp.clip(done // m_count, 0, r_count - 1)
    first = jax.lax.dynamic_index_in_dim(buffer, jnp.mod(t, m_count), 0, keepdims=True)
    inputs = jnp.where((stage_ids == 0)[:, None, None, None], first, inputs)
    inputs = sharding.with_logical_constraint(inputs, STAGE_ACTIVATION)
    pos = pos_mb[micro]
    seg = None if seg_mb is None else seg_mb[micro]
    outputs, aux = stages_fn(weights, inputs, pos, seg, repeat, stage_ids)
    outputs = sharding.with_logical_constraint(outputs, STAGE_ACTIVATION)
    # aux [S, Lps, ...] -> its (repeat, stage) slot of [R, S, Lps, ...], counted only for real visits.
    hit = (jnp.arange(r_count)[:, None] == repeat[None, :]) & valid[None, :]

    def add(acc, a):
      h = hit.reshape(hit.shape + (1,) * (a.ndim - 1)).astype(acc.dtype)
      return acc + h * a[None].astype(acc.dtype)

    aux_sum = jax.tree.map(add, aux_sum, aux)
    return (buffer, outputs, aux_sum), None

  outputs = jnp.zeros((s_count,) + buffer.shape[1:], x.dtype)
  outputs = sharding.with_logical_constraint(outputs, STAGE_ACTIVATION)
  shapes = jax.eval_shape(
      stages_fn, weights, outputs, pos_mb[:s_count], None if seg_mb is None else seg_mb[:s_count], stage_ids, stage_ids
  )[1]
  aux_sum = jax.tree.map(lambda a: jnp.zeros((r_count,) + a.shape, a.dtype), shapes)
  (buffer, outputs, aux_sum), _ = jax.lax.scan(
      iteration, (buffer, outputs, aux_sum), jnp.arange(schedule.iterations, dtype=jnp.int32)
  )
  buffer, _ = write_back(buffer, outputs, schedule.iterations - 1)
  aux = jax.tree.map(lambda a: from_pipelined(a, 0), aux_sum)
  return _unmicrobatch(buffer), aux


def relayout_compatible(stored, wanted) -> bool:
  """True when two shapes of one stacked parameter differ only by how its layer axis is split ([units] vs
  [R, S, Lps], or another R/S split), so a row-major reshape turns one layout into the other."""
  stored, wanted = tuple(stored), tuple(wanted)
  if stored == wanted:
    return True
  for i in range(min(len(stored), len(wanted))):
    for ns, nw in ((1, 3), (3, 1), (3, 3)):
      if len(stored) - ns != len(wanted) - nw or stored[:i] != wanted[:i] or stored[i + ns :] != wanted[i + nw :]:
        continue
      if math.prod(stored[i : i + ns]) == math.prod(wanted[i : i + nw]):
        return True
  return False
