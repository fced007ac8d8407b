"""Normalization layers: RMSNorm and LayerNorm, and the config's choice between them."""

import jax
import jax.numpy as jnp
from flax import nnx


class RMSNorm(nnx.Module):
  """Root-mean-square norm over the last axis with a learned scale, applied as (scale_offset + scale).

  The statistics and the scaling run in float32 whatever `dtype` is: in bfloat16 the mean of squares loses enough
  precision to shift the output visibly. `scale_offset=1` is Gemma's (1 + scale) with scales initialized at 0, so
  a checkpoint stores the same numbers its source model does.
  """

  def __init__(
      self,
      num_features: int,
      *,
      epsilon: float = 1e-6,
      dtype: jnp.dtype = jnp.float32,
      weight_dtype: jnp.dtype = jnp.float32,
      scale_names: tuple[str, ...] = ("norm",),
      scale_offset: float = 0.0,
  ):
    self.epsilon = epsilon
    self.dtype = dtype
    self.scale_offset = scale_offset
    init = jnp.full((num_features,), 1.0 - scale_offset, weight_dtype)
    self.scale = nnx.Param(init, out_sharding=scale_names, eager_sharding=False)

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.epsilon)
    return (y * (self.scale_offset + self.scale[...].astype(jnp.float32))).astype(self.dtype)


class LayerNorm(RMSNorm):
  """Mean-and-variance norm over the last axis with a learned scale (plus `scale_offset`) and bias, in float32."""

  def __init__(
      self,
      num_features: int,
      *,
      epsilon: float = 1e-5,
      weight_dtype: jnp.dtype = jnp.float32,
      scale_names: tuple[str, ...] = ("norm",),
      **kw,  # dtype, scale_offset: as RMSNorm
  ):
    super().__init__(num_features, epsilon=epsilon, weight_dtype=weight_dtype, scale_names=scale_names, **kw)
    self.bias = nnx.Param(jnp.zeros((num_features,), weight_dtype), out_sharding=scale_names, eager_sharding=False)

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon)
    y = y * (self.scale_offset + self.scale[...].astype(jnp.float32)) + self.bias[...].astype(jnp.float32)
    return y.astype(self.dtype)


NORMS = {"rmsnorm": RMSNorm, "layernorm": LayerNorm}  # keys: normalization_type's choices (a test keeps them equal)


def create_norm(config, num_features: int) -> RMSNorm | LayerNorm:
  """The model norm the config asks for (`normalization_type`, epsilon, scale offset, dtypes)."""
  return NORMS[config.normalization_type](
      num_features,
      epsilon=config.normalization_layer_epsilon,
      dtype=config.dtype,
      weight_dtype=config.weight_dtype,
      scale_offset=config.normalization_scale_offset,
  )
