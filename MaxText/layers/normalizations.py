"""Normalization layers."""

import jax
import jax.numpy as jnp
from flax import nnx


class RMSNorm(nnx.Module):
  """Root-mean-square norm over the last axis with a learned scale.

  The statistics and the scaling run in float32 whatever `dtype` is: in bfloat16 the mean of squares loses enough
  precision to shift the output visibly.
  """

  def __init__(
      self,
      num_features: int,
      *,
      epsilon: float = 1e-6,
      dtype: jnp.dtype = jnp.float32,
      weight_dtype: jnp.dtype = jnp.float32,
      scale_names: tuple[str, ...] = ("norm",),
  ):
    self.epsilon = epsilon
    self.dtype = dtype
    self.scale = nnx.Param(jnp.ones((num_features,), weight_dtype), out_sharding=scale_names, eager_sharding=False)

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.epsilon)
    return (y * self.scale[...].astype(jnp.float32)).astype(self.dtype)
