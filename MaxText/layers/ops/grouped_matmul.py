"""The dropless MoE's grouped matmul on CPU: rows sorted by group, each group's rows times its own matrix.

XLA:CPU lowers `jax.lax.ragged_dot` to a dense product of every row with every group's matrix and a mask, so a
top-2-of-8 layer costs all 8 experts' FLOPs (0.15x a dense MLP of the same active parameters, benchmarks/RESULTS.md).
`tiled_grouped_matmul` costs what the groups hold, in two parts:
- blocks: each group's first `block` rows (zero-padded where a group holds fewer), gathered into [groups, block, k]
  and multiplied as one batched matmul, at the speed of one large matmul (XLA:CPU runs 64-256-row pieces ~1.4x
  slower per FLOP, and a loop pays per piece). `block` is the smallest of a few sizes between 1x and 1.5x the mean
  group size that holds the largest group, picked at run time (a switch over programs compiled for each size).
- overflow: the rows past a group's block (only when a group exceeds 1.5x the mean), cut along a grid of
  `tile`-row tiles; a loop visits each (tile, group) pair that shares such rows, multiplying the tile (its other rows
  zeroed) by that group's matrix, as many visits as there are (a dynamic count, at most overflow tiles + groups).
Any group sizes give the same result (values and gradients); only the speed depends on the balance. The backward
pass is written out the same way (the input gradient by the transposed matrices, each group's weight gradient from
its block plus its visits), so autodiff does not stack a copy of the weights per visit.
"""

import functools
import math

import jax
import jax.numpy as jnp


def _schedule(lo: jax.Array, hi: jax.Array, tiles: int, tile: int):
  """The (tile, group) visits covering each group's rows [lo, hi): per visit (group, tile index, lo, hi), and the
  number of real visits (the rest of the `tiles + groups - 1` entries are spare)."""
  groups = lo.shape[0]
  first = lo // tile
  counts = jnp.where(hi > lo, (jnp.maximum(hi, 1) - 1) // tile - first + 1, 0)
  done = jnp.cumsum(counts)
  visit = jnp.arange(tiles + groups - 1)
  group = jnp.minimum(jnp.searchsorted(done, visit, side="right"), groups - 1)
  real = visit < done[-1]
  index = jnp.where(real, first[group] + visit - (done[group] - counts[group]), 0)
  schedule = tuple(
      a.astype(jnp.int32) for a in (group, index, jnp.where(real, lo[group], 0), jnp.where(real, hi[group], 0))
  )
  return schedule, done[-1]


def _padded(x: jax.Array, tile: int) -> jax.Array:
  pad = -x.shape[0] % tile
  return jnp.pad(x, ((0, pad), (0, 0))) if pad else x


def _rows_of(x: jax.Array, start, lo, hi, tile: int) -> jax.Array:
  """Rows [start, start + tile) of x, those outside [lo, hi) zeroed."""
  rows = start + jnp.arange(tile)
  return jnp.where(((rows >= lo) & (rows < hi))[:, None], jax.lax.dynamic_slice_in_dim(x, start, tile, 0), 0)


def _add_rows(out: jax.Array, start, update: jax.Array) -> jax.Array:
  current = jax.lax.dynamic_slice_in_dim(out, start, update.shape[0], 0)
  return jax.lax.dynamic_update_slice_in_dim(out, current + update.astype(out.dtype), start, 0)


def _matrix(rhs: jax.Array, group) -> jax.Array:
  # A dynamic slice, not a gather (`rhs[group]`), so the loop reads and updates one matrix in place.
  return jax.lax.dynamic_index_in_dim(rhs, group, keepdims=False)


# Block sizes, as multiples of the mean group size: the smallest that holds the largest group runs, so a routing whose
# largest group is within 1.5x the mean pays no overflow loop, and the padding follows the imbalance in steps of 1/16
# up to 1.125x (a random router's largest of 8 experts is 1.03-1.1x the mean at 2-4k tokens).
_BLOCK_STEPS = (1.0, 1.0625, 1.125, 1.25, 1.5)


def _blocks(lhs, rhs, rows_per_group) -> tuple[int, ...]:
  mean = -(-lhs.shape[0] // rhs[0].shape[0]) if rows_per_group is None else rows_per_group
  return tuple(sorted({max(8, math.ceil(mean * step / 8) * 8) for step in _BLOCK_STEPS}))


class _Layout:
  """Where each group's first `block` rows go in [groups, block] slots, for rows sorted by group."""

  def __init__(self, group_sizes: jax.Array, rows: int, block: int):
    ends = jnp.cumsum(group_sizes)
    starts = ends - group_sizes
    self.groups, self.block = group_sizes.shape[0], block
    position = jnp.arange(block)
    # [groups, block]: the row each slot holds, and whether it holds one.
    self.slot_valid = position[None, :] < group_sizes[:, None]
    self.slot_row = jnp.where(self.slot_valid, starts[:, None] + position[None, :], 0)
    # Per row: its slot (flattened), and whether it has one (rows past a block or past every group do not).
    row = jnp.arange(rows)
    group = jnp.minimum(jnp.searchsorted(ends, row, side="right"), self.groups - 1)
    offset = row - starts[group]
    self.row_in_block = (row < ends[-1]) & (offset < block)
    self.row_slot = jnp.where(self.row_in_block, group * block + offset, 0)

  def to_blocks(self, x: jax.Array, zero_empty: bool = True) -> jax.Array:
    """[rows, d] -> [groups, block, d]. Empty slots are zero, or with `zero_empty=False` a copy of some row: enough
    where every product of an empty slot meets a zero (the other operand's empty slot) or is never read."""
    blocks = x[self.slot_row]
    return jnp.where(self.slot_valid[..., None], blocks, 0) if zero_empty else blocks

  def from_blocks(self, blocks: jax.Array, dtype) -> jax.Array:
    """[groups, block, d] -> [rows, d], rows without a slot zero."""
    flat = blocks.reshape(self.groups * self.block, -1)
    return jnp.where(self.row_in_block[:, None], flat[self.row_slot], 0).astype(dtype)


def _by_block(parts, blocks, group_sizes, *operands):
  """parts[i](*operands, group_sizes) for the smallest block blocks[i] holding the largest group (the last, with the
  overflow loop, if none does)."""
  pick = jnp.minimum(jnp.searchsorted(jnp.array(blocks), jnp.max(group_sizes)), len(blocks) - 1)
  return jax.lax.switch(pick, parts, *operands, group_sizes)


def _overflow(group_sizes, block):
  """Per group, the rows [lo, hi) past its block."""
  ends = jnp.cumsum(group_sizes)
  starts = ends - group_sizes
  return starts + jnp.minimum(group_sizes, block), ends


def _block_product(x, rhs, group_sizes, *, block):
  layout = _Layout(group_sizes, x.shape[0], block)
  x_blocks = layout.to_blocks(x, zero_empty=False)  # empty slots' products are never read
  return tuple(
      layout.from_blocks(jnp.einsum("gck,gkn->gcn", x_blocks, r, preferred_element_type=jnp.float32), x.dtype)
      for r in rhs
  )


def _product_with_overflow(lhs, rhs, group_sizes, *, block, tile):
  x = _padded(lhs, tile)
  schedule, count = _schedule(*_overflow(group_sizes, block), x.shape[0] // tile, tile)

  def visit(i, outs):
    group, index, lo, hi = (a[i] for a in schedule)
    start = index * tile
    rows = _rows_of(x, start, lo, hi, tile)
    return tuple(
        _add_rows(out, start, jnp.dot(rows, _matrix(r, group), preferred_element_type=jnp.float32))
        for out, r in zip(outs, rhs)
    )

  outs = jax.lax.fori_loop(0, count, visit, _block_product(x, rhs, group_sizes, block=block))
  return tuple(out[: lhs.shape[0]] for out in outs)


def _parts(fn, with_overflow, blocks, tile):
  """One program per block size; only the largest has the overflow loop (a loop inside an XLA:CPU conditional
  copies its carry, ~9 ms a call here, so the common, balanced case runs none)."""
  return [functools.partial(fn, block=b) for b in blocks[:-1]] + [
      functools.partial(with_overflow, block=blocks[-1], tile=tile)
  ]


def _forward(lhs, rhs, group_sizes, rows_per_group, tile):
  blocks = _blocks(lhs, rhs, rows_per_group)
  return _by_block(_parts(_block_product, _product_with_overflow, blocks, tile), blocks, group_sizes, lhs, rhs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _grouped(lhs, rhs, group_sizes, rows_per_group, tile):
  return _forward(lhs, rhs, group_sizes, rows_per_group, tile)


def tiled_grouped_matmul(
    lhs: jax.Array,
    rhs: jax.Array | tuple[jax.Array, ...],
    group_sizes: jax.Array,
    rows_per_group: int | None = None,
    tile: int = 64,
):
  """lhs [m, k] rows sorted by group, rhs [groups, k, n], group_sizes [groups] (summing to at most m; rows past the
  sum belong to no group and come out zero) -> [m, n]. A tuple of rhs gives a tuple of products of the same rows
  (gathered into blocks once; the gated MLP's two input projections). `rows_per_group`: the expected group size
  the blocks are sized from (default m / groups; pass it when many rows belong to no group, as on an
  expert-parallel shard)."""
  several = isinstance(rhs, (tuple, list))
  out = _grouped(lhs, tuple(rhs) if several else (rhs,), group_sizes, rows_per_group, tile)
  return out if several else out[0]


def _fwd(lhs, rhs, group_sizes, rows_per_group, tile):
  return _forward(lhs, rhs, group_sizes, rows_per_group, tile), (lhs, rhs, group_sizes)


def _block_gradients(x, grads, rhs, group_sizes, *, block):
  """The blocks' dx = sum_i g_i . rhs_i^T and drhs_i = x^T . g_i, one batched matmul each."""
  layout = _Layout(group_sizes, x.shape[0], block)
  x_blocks = layout.to_blocks(x, zero_empty=False)  # meets g's zeroed empty slots in drhs; dx's are never read
  dx, drhs = 0, []
  for g, r in zip(grads, rhs):
    g_blocks = layout.to_blocks(g)
    dx = dx + jnp.einsum("gcn,gkn->gck", g_blocks, r, preferred_element_type=jnp.float32)
    drhs.append(jnp.einsum("gck,gcn->gkn", x_blocks, g_blocks, preferred_element_type=jnp.float32))
  return layout.from_blocks(dx, x.dtype), tuple(drhs)


def _gradients_with_overflow(lhs, grads, rhs, group_sizes, *, block, tile):
  x, grads = _padded(lhs, tile), tuple(_padded(g, tile) for g in grads)
  schedule, count = _schedule(*_overflow(group_sizes, block), x.shape[0] // tile, tile)

  def visit(i, carry):
    dx, drhs = carry
    group, index, lo, hi = (a[i] for a in schedule)
    start = index * tile
    x_rows = _rows_of(x, start, lo, hi, tile)
    new_drhs = []
    for g, r, d in zip(grads, rhs, drhs):
      g_rows = _rows_of(g, start, lo, hi, tile)
      # dx rows: g . rhs[group]^T; drhs[group]: x rows^T . g rows (both restricted to the group's rows).
      contract_n = (((1,), (1,)), ((), ()))
      dx = _add_rows(
          dx, start, jax.lax.dot_general(g_rows, _matrix(r, group), contract_n, preferred_element_type=jnp.float32)
      )
      d_w = jax.lax.dot_general(x_rows, g_rows, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
      new_drhs.append(jax.lax.dynamic_update_index_in_dim(d, _matrix(d, group) + d_w, group, 0))
    return dx, tuple(new_drhs)

  dx, drhs = jax.lax.fori_loop(0, count, visit, _block_gradients(x, grads, rhs, group_sizes, block=block))
  return dx[: lhs.shape[0]], drhs


def _bwd(rows_per_group, tile, residuals, grads):
  lhs, rhs, group_sizes = residuals
  blocks = _blocks(lhs, rhs, rows_per_group)
  parts = _parts(_block_gradients, _gradients_with_overflow, blocks, tile)
  grads = tuple(g.astype(lhs.dtype) for g in grads)
  dx, drhs = _by_block(parts, blocks, group_sizes, lhs, grads, rhs)
  return dx, tuple(d.astype(r.dtype) for d, r in zip(drhs, rhs)), None


_grouped.defvjp(_fwd, _bwd)
