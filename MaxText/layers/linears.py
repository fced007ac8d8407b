"""Dense projections with logical axis names, and the (gated) MLP block."""

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from MaxText import lora, sharding
from MaxText.layers import quantization
from MaxText.layers import ops
from MaxText.layers.ops import matmul
from MaxText.layers.quantization import QuantSpec

Shape = int | Sequence[int]

_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "linear": lambda x: x,
    "tanh": jnp.tanh,
    "sigmoid": jax.nn.sigmoid,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
  """The activation function for a name in `mlp_activations`."""
  try:
    return _ACTIVATIONS[name]
  except KeyError:
    raise ValueError(f"unknown activation {name!r}; known: {sorted(_ACTIVATIONS)}") from None


# checkpoint_name of every DenseGeneral matmul result: remat "minimal" keeps it, so the explicit-backward matmul (a
# custom VJP that dot-matching policies cannot see) saves what a plain dot would.
DENSE_OUTPUT_NAME = "dense_output"


def _as_tuple(x: Shape) -> tuple[int, ...]:
  return (x,) if isinstance(x, int) else tuple(x)


class DenseGeneral(nnx.Module):
  """y = x . kernel, contracting x's last `len(in_features)` axes with the kernel's leading ones.

  The kernel keeps its multi-dimensional shape (e.g. [embed, heads, head_dim]) so each dimension gets its own logical
  axis name and shards independently; it is stored in `weight_dtype` and cast to `dtype` for the matmul.
  With `quant` the matmul is quantized (layers/quantization.py); with `quant.stored` the kernel is held as int8 plus
  a per-output-channel `kernel_scale` (decode from a quantized checkpoint). `matmul_backward` is the resolved
  `dense_matmul_backward` (ops/matmul.py: "autodiff" | "explicit"; "auto" picks by the running backend).
  With `lora_rank` > 0 it also holds a LoRA adapter, y += lora_scale * (x . lora_a) . lora_b: lora_a [in..., rank]
  starts random, lora_b [rank, out...] at zero (so a fresh adapter changes nothing); MaxText/lora.py trains only them.
  Given a `lora_rng`, the adapter's input goes through dropout at `lora_dropout` (training only).
  """

  def __init__(
      self,
      in_features: Shape,
      out_features: Shape,
      *,
      kernel_axes: tuple[str | None, ...],
      rngs: nnx.Rngs,
      dtype: jnp.dtype = jnp.float32,
      weight_dtype: jnp.dtype = jnp.float32,
      use_bias: bool = False,
      bias_axes: tuple[str | None, ...] | None = None,
      quant: QuantSpec | None = None,
      matmul_backward: str = "auto",
      lora_rank: int = 0,
      lora_scale: float = 1.0,
      lora_dropout: float = 0.0,
  ):
    self.in_features = _as_tuple(in_features)
    self.out_features = _as_tuple(out_features)
    self.dtype = dtype
    n_in, n_out = len(self.in_features), len(self.out_features)
    if len(kernel_axes) != n_in + n_out:
      raise ValueError(f"kernel_axes {kernel_axes} does not name {n_in + n_out} kernel dimensions")
    init = nnx.initializers.variance_scaling(
        1.0, "fan_in", "truncated_normal", in_axis=tuple(range(n_in)), out_axis=tuple(range(n_in, n_in + n_out))
    )
    shape = self.in_features + self.out_features
    # Params carry logical names only (eager_sharding=False, here and in every layer): placement comes from jit
    # out_shardings via sharding.state_shardings, so a module builds the same with or without a mesh.
    self.quant = quant
    if matmul_backward == "auto":
      matmul_backward = ops.auto_dense_matmul_backward(jax.default_backend())
    self.matmul_backward = matmul_backward
    if quant is not None and quant.stored:
      self.kernel = nnx.Param(jnp.zeros(shape, jnp.int8), out_sharding=kernel_axes, eager_sharding=False)
      scale_shape = (1,) * n_in + self.out_features
      self.kernel_scale = nnx.Param(
          jnp.ones(scale_shape, jnp.float32), out_sharding=(None,) * n_in + kernel_axes[n_in:], eager_sharding=False
      )
    else:
      self.kernel = nnx.Param(init(rngs.params(), shape, weight_dtype), out_sharding=kernel_axes, eager_sharding=False)
    if use_bias:
      names = bias_axes if bias_axes is not None else kernel_axes[n_in:]
      self.bias = nnx.Param(jnp.zeros(self.out_features, weight_dtype), out_sharding=names, eager_sharding=False)
    else:
      self.bias = None
    self.lora_scale = lora_scale
    self.lora_dropout = lora_dropout
    if lora_rank > 0:
      # The rank dimension is small and unnamed (replicated); in/out dimensions shard like the kernel's.
      a_init = nnx.initializers.variance_scaling(1.0, "fan_in", "normal", in_axis=tuple(range(n_in)), out_axis=n_in)
      self.lora_a = nnx.Param(
          a_init(rngs.params(), self.in_features + (lora_rank,), weight_dtype),
          out_sharding=tuple(kernel_axes[:n_in]) + (None,),
          eager_sharding=False,
      )
      self.lora_b = nnx.Param(
          jnp.zeros((lora_rank,) + self.out_features, weight_dtype),
          out_sharding=(None,) + tuple(kernel_axes[n_in:]),
          eager_sharding=False,
      )
    else:
      self.lora_a = self.lora_b = None

  def merged_kernel(self, dtype: jnp.dtype) -> jax.Array:
    """The float kernel with the adapter folded in (W + s A.B), for callers that use the kernel itself."""
    kernel = self.kernel[...].astype(dtype)
    if self.lora_a is None:
      return kernel
    delta = jnp.tensordot(self.lora_a[...].astype(dtype), self.lora_b[...].astype(dtype), axes=1)
    return kernel + self.lora_scale * delta

  def __call__(
      self, x: jax.Array, *, compute_dtype: jnp.dtype | None = None, lora_rng: jax.Array | None = None
  ) -> jax.Array:
    dtype = compute_dtype or self.dtype
    n_in = len(self.in_features)
    if self.quant is not None and self.quant.stored:
      y = quantization.stored_dot(x.astype(dtype), self.kernel[...], self.kernel_scale[...], n_in, self.quant)
    elif self.quant is not None:
      y = quantization.quantized_dot(x.astype(dtype), self.kernel[...].astype(dtype), n_in, self.quant)
    else:
      y = matmul.dense_matmul(x.astype(dtype), self.kernel[...].astype(dtype), n_in, self.matmul_backward)
      y = checkpoint_name(y, DENSE_OUTPUT_NAME)
    if self.lora_a is not None:
      x_lora = lora.dropout(x.astype(dtype), self.lora_dropout, lora_rng)
      h = jnp.tensordot(x_lora, self.lora_a[...].astype(dtype), axes=n_in)
      y = y + self.lora_scale * jnp.tensordot(h, self.lora_b[...].astype(dtype), axes=1)
    if self.bias is not None:
      y = y + self.bias[...].astype(dtype)
    return y


class MlpBlock(nnx.Module):
  """Feed-forward block: one input projection per activation, multiplied together, then the output projection.

  `activations=("silu", "linear")` is SwiGLU (Llama), `("gelu_tanh", "linear")` GeGLU (Gemma); a single activation
  is a plain MLP (GPT-3, with `use_bias`). Projections are named `wi_0, wi_1, ...` (or `wi` when there is one) and
  `wo`, the names checkpoint converters and remat policies use. `matmul_backward` goes to every projection;
  `lora(name)` gives each projection its DenseGeneral LoRA arguments (lora.dense_kwargs).
  """

  def __init__(
      self,
      emb_dim: int,
      mlp_dim: int,
      activations: Sequence[str],
      *,
      rngs: nnx.Rngs,
      dtype: jnp.dtype = jnp.float32,
      weight_dtype: jnp.dtype = jnp.float32,
      use_bias: bool = False,
      quant: QuantSpec | None = None,
      matmul_backward: str = "auto",
      lora: Callable[[str], dict] = lambda name: {},
  ):
    self.activation_names = tuple(activations)
    kw = dict(rngs=rngs, dtype=dtype, weight_dtype=weight_dtype, use_bias=use_bias, quant=quant)
    kw["matmul_backward"] = matmul_backward
    if len(self.activation_names) == 1:
      self.wi = DenseGeneral(emb_dim, mlp_dim, kernel_axes=("embed", "mlp"), **kw, **lora("wi"))
    else:
      for i in range(len(self.activation_names)):
        name = f"wi_{i}"
        setattr(self, name, DenseGeneral(emb_dim, mlp_dim, kernel_axes=("embed", "mlp"), **kw, **lora(name)))
    self.wo = DenseGeneral(mlp_dim, emb_dim, kernel_axes=("mlp", "embed"), **kw, **lora("wo"))

  def _input_projection(self, i: int) -> DenseGeneral:
    return self.wi if len(self.activation_names) == 1 else getattr(self, f"wi_{i}")

  def __call__(self, x: jax.Array, *, lora_rng: jax.Array | None = None) -> jax.Array:
    """`lora_rng`: the adapters' dropout key (training with lora_dropout), else None."""
    hidden = None
    for i, name in enumerate(self.activation_names):
      h = checkpoint_name(self._input_projection(i)(x, lora_rng=lora.subkey(lora_rng, i)), f"mlpwi_{i}")
      h = activation(name)(h)
      hidden = h if hidden is None else hidden * h
    hidden = sharding.with_logical_constraint(hidden, ("activation_batch", "activation_length", "activation_mlp"))
    hidden = checkpoint_name(hidden, "mlp_hidden")
    out = checkpoint_name(self.wo(hidden, lora_rng=lora.subkey(lora_rng, len(self.activation_names))), "mlpwo")
    return sharding.with_logical_constraint(out, ("activation_batch", "activation_length", "activation_embed"))
