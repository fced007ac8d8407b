"""The dropless MoE's grouped matmul on CPU: rows sorted by group, each group's rows times its own matrix.

XLA:CPU lowers `jax.lax.ragged_dot` to a dense product of every row with every group's matrix and a mask, so a
top-2-of-8 layer costs all 8 experts' FLOPs (0.15x a dense MLP of the same active parameters, benchmarks/RESULTS.md).
`tiled_grouped_matmul` costs what the groups hold: the rows are cut into tiles of `tile` rows, and a loop visits
each (tile, group) pair that shares rows, multiplying the tile (its other groups' rows zeroed) by that group's
matrix. Rows are sorted, so there are at most tiles + groups - 1 visits; the loop runs that many (a static count),
the spare ones as no-ops. The backward pass is written out the same way (the input gradient by the transposed
matrices, each group's weight gradient accumulated from its visits), so autodiff does not stack a copy of the
weights per visit.
"""

import functools

import jax
import jax.numpy as jnp


def _schedule(group_sizes: jax.Array, tiles: int, tile: int):
  """Per visit: (group, tile index, first row, end row) of the group's rows; spare visits cover no rows."""
  groups = group_sizes.shape[0]
  ends = jnp.cumsum(group_sizes)
  starts = ends - group_sizes
  first = starts // tile
  counts = jnp.where(group_sizes > 0, (jnp.maximum(ends, 1) - 1) // tile - first + 1, 0)
  done = jnp.cumsum(counts)
  visit = jnp.arange(tiles + groups - 1)
  group = jnp.minimum(jnp.searchsorted(done, visit, side="right"), groups - 1)
  real = visit < done[-1]
  index = jnp.where(real, first[group] + visit - (done[group] - counts[group]), 0)
  lo = jnp.where(real, starts[group], 0)
  hi = jnp.where(real, ends[group], 0)
  return tuple(a.astype(jnp.int32) for a in (group, index, lo, hi))


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


def _forward(lhs, rhs, group_sizes, tile):
  x = _padded(lhs, tile)
  schedule = _schedule(group_sizes, x.shape[0] // tile, tile)

  def visit(out, step):
    group, index, lo, hi = step
    start = index * tile
    product = jnp.dot(_rows_of(x, start, lo, hi, tile), rhs[group], preferred_element_type=jnp.float32)
    return _add_rows(out, start, product), None

  out, _ = jax.lax.scan(visit, jnp.zeros((x.shape[0], rhs.shape[2]), lhs.dtype), schedule)
  return out[: lhs.shape[0]]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def tiled_grouped_matmul(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, tile: int = 128) -> jax.Array:
  """lhs [m, k] rows sorted by group, rhs [groups, k, n], group_sizes [groups] (summing to at most m; rows past the
  sum belong to no group and come out zero) -> [m, n]."""
  return _forward(lhs, rhs, group_sizes, tile)


def _fwd(lhs, rhs, group_sizes, tile):
  return _forward(lhs, rhs, group_sizes, tile), (lhs, rhs, group_sizes)


def _bwd(tile, residuals, grad):
  lhs, rhs, group_sizes = residuals
  x, g = _padded(lhs, tile), _padded(grad.astype(lhs.dtype), tile)
  schedule = _schedule(group_sizes, x.shape[0] // tile, tile)

  def visit(carry, step):
    dx, drhs = carry
    group, index, lo, hi = step
    start = index * tile
    g_rows = _rows_of(g, start, lo, hi, tile)
    # dx rows: g . rhs[group]^T; drhs[group]: x rows^T . g rows (both restricted to the group's rows).
    dx_rows = jax.lax.dot_general(g_rows, rhs[group], (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    d_w = jax.lax.dot_general(
        _rows_of(x, start, lo, hi, tile), g_rows, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32
    )
    return (_add_rows(dx, start, dx_rows), drhs.at[group].add(d_w)), None

  init = (jnp.zeros_like(x), jnp.zeros(rhs.shape, jnp.float32))
  (dx, drhs), _ = jax.lax.scan(visit, init, schedule)
  return dx[: lhs.shape[0]], drhs.astype(rhs.dtype), None


tiled_grouped_matmul.defvjp(_fwd, _bwd)
