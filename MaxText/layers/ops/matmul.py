"""DenseGeneral's matmul, x [..., *in] . kernel [*in, *out] -> [..., *out], with two backward passes.

`dense_matmul_backward` picks one:
- "autodiff": one dot_general, differentiated by JAX (the accelerator default: XLA lays the backward out itself).
- "explicit": the same forward with a custom VJP that writes the backward as two plain contractions (the CPU
  default). Autodiff's transpose of the forward dot_general makes XLA:CPU compute the kernel gradient as a
  transposed dot with freshly transposed [tokens, features] operands, outside its fast matmul library; spelled
  out, all three matmuls of a layer run there (a llama-small SwiGLU MLP's forward + backward went from 145 to
  196 GFLOP/s, benchmarks/RESULTS.md). The math is the same contraction, so values and gradients agree to rounding.
  Its bfloat16/float16 matmuls accumulate in float32 and round once (as TPU and GPU matmuls do): XLA:CPU runs a
  bfloat16 dot with bfloat16 results on a slow generic path and one with float32 results in its matmul library,
  on AMX hosts at 3x float32's speed (benchmarks/RESULTS.md).
"""

import functools

import jax
import jax.numpy as jnp

from MaxText.layers.ops import DENSE_MATMUL_BACKWARDS


def _contract(x: jax.Array, kernel: jax.Array, n_in: int, result_dtype=None) -> jax.Array:
  contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
  return jax.lax.dot_general(x, kernel, (contract, ((), ())), preferred_element_type=result_dtype)


def accumulate_dtype(dtype) -> jnp.dtype | None:
  """float32 for sub-32-bit floats (the dot accumulates in float32 and is rounded once), else the dot's own."""
  return jnp.float32 if jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).bits < 32 else None


def _accumulated_contract(x: jax.Array, kernel: jax.Array, n_in: int) -> jax.Array:
  return _contract(x, kernel, n_in, accumulate_dtype(x.dtype)).astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def explicit_vjp_dot(x: jax.Array, kernel: jax.Array, n_in: int) -> jax.Array:
  """The dense contraction over x's last `n_in` axes, with the backward pass written out (see the module doc)."""
  return _accumulated_contract(x, kernel, n_in)


def _explicit_fwd(x, kernel, n_in):
  return _accumulated_contract(x, kernel, n_in), (x, kernel)


def _explicit_bwd(n_in, residuals, g):
  x, kernel = residuals
  n_lead = x.ndim - n_in
  # dx: g's out axes against the kernel's out axes; dkernel: x and g contracted over their leading (token) axes.
  acc = accumulate_dtype(g.dtype)
  dx = jax.lax.dot_general(
      g, kernel, ((tuple(range(n_lead, g.ndim)), tuple(range(n_in, kernel.ndim))), ((), ())), preferred_element_type=acc
  )
  dk = jax.lax.dot_general(x, g, ((tuple(range(n_lead)), tuple(range(n_lead))), ((), ())), preferred_element_type=acc)
  return dx.astype(x.dtype), dk.astype(kernel.dtype)


explicit_vjp_dot.defvjp(_explicit_fwd, _explicit_bwd)


def dense_matmul(x: jax.Array, kernel: jax.Array, n_in: int, backward: str) -> jax.Array:
  """x [..., *in] . kernel [*in, *out] -> [..., *out]; `backward` is one of DENSE_MATMUL_BACKWARDS."""
  if backward == "explicit":
    return explicit_vjp_dot(x, kernel, n_in)
  if backward == "autodiff":
    return _contract(x, kernel, n_in)
  raise ValueError(f"dense matmul backward {backward!r} is not one of {DENSE_MATMUL_BACKWARDS}")
