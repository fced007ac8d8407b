"""Quantized matmuls for DenseGeneral (attention projections and MLP), built on Google's `qwix` library.

Modes (`quantization` in base.yml):
  int8   weights (per output channel) and activations (per token) in int8, int8 x int8 -> int32 matmul.
  int8w  weights only in int8; activations stay in `dtype` (XLA fuses the dequantization into the matmul).
  fp8    weights and activations in float8_e4m3fn, incoming gradients in float8_e5m2, each with a per-tensor scale
         from the current tensor (current scaling). Runs in emulation on CPU; XLA rewrites it to fp8 GEMMs on GPU.

Training uses straight-through gradients: the backward pass is the float gradient of the matmul of the *dequantized*
operands (so rounding is invisible to the gradient), computed from the quantized residuals the forward kept.

For decode, `checkpoint_is_quantized` stores each quantized kernel as int8 plus a float32 `kernel_scale` (one per
output channel), which `quantize_params` produces from float params and `save_quantized_params_path` writes to disk.
"""

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import qwix

from MaxText.config import choices
from MaxText.config.numerics import STORED_QUANTIZATION
from MaxText.config_schema import ConfigError

MODES = tuple(mode for mode in choices("quantization") if mode)  # "" = off
STORED_MODES = STORED_QUANTIZATION  # modes whose kernels can be stored quantized (int8 + scale)
SCALE_NAME = "kernel_scale"


@dataclasses.dataclass(frozen=True)
class QuantSpec:
  """How one DenseGeneral quantizes: `mode` is one of MODES; `stored` keeps its kernel as int8 + kernel_scale."""

  mode: str
  stored: bool = False

  def __post_init__(self):
    if self.mode not in MODES:
      raise ValueError(f"quantization mode {self.mode!r} is not one of {MODES}")
    if self.stored and self.mode not in STORED_MODES:
      raise ValueError(f"quantization mode {self.mode!r} cannot be stored quantized (only {STORED_MODES})")

  @property
  def weight_qtype(self) -> jnp.dtype:
    return jnp.float8_e4m3fn if self.mode == "fp8" else jnp.int8

  @property
  def act_qtype(self) -> jnp.dtype | None:
    return {"int8": jnp.int8, "int8w": None, "fp8": jnp.float8_e4m3fn}[self.mode]

  @property
  def grad_qtype(self) -> jnp.dtype | None:
    return jnp.float8_e5m2 if self.mode == "fp8" else None

  @property
  def per_tensor(self) -> bool:
    # fp8 GEMMs (cuBLASLt through XLA) take scalar scales; int8 keeps per-channel scales for accuracy.
    return self.mode == "fp8"


def spec_from_config(config) -> QuantSpec | None:
  """The QuantSpec the config asks for (None when `quantization` is ""); ConfigError for a bad combination."""
  mode = config.quantization
  if not mode:
    if config.checkpoint_is_quantized or config.save_quantized_params_path:
      key = "checkpoint_is_quantized" if config.checkpoint_is_quantized else "save_quantized_params_path"
      raise ConfigError(f"{key}: needs quantization set to one of {list(STORED_MODES)}")
    return None
  stored = config.checkpoint_is_quantized or bool(config.save_quantized_params_path)
  if stored and mode not in STORED_MODES:
    key = "checkpoint_is_quantized" if config.checkpoint_is_quantized else "save_quantized_params_path"
    raise ConfigError(
        f"{key}: quantized checkpoints hold int8 weights; quantization={mode!r} must be one of " f"{list(STORED_MODES)}"
    )
  return QuantSpec(mode, stored=stored)


def _keep_axes(ndim: int, contracting: tuple[int, ...]) -> tuple[int, ...]:
  return tuple(a for a in range(ndim) if a not in contracting)


def _quantize(a: jax.Array, qtype, keep_axes: tuple[int, ...], per_tensor: bool) -> qwix.QArray:
  """Symmetric absmax quantization with one scale per index of `keep_axes` (or one for the whole tensor)."""
  return qwix.quantize(a, qtype, channelwise_axes=() if per_tensor else keep_axes)


def _dims(x_ndim: int, n_in: int):
  """dot_general dimension numbers contracting x's last n_in axes with the kernel's first n_in."""
  return (tuple(range(x_ndim - n_in, x_ndim)), tuple(range(n_in))), ((), ())


def _qdot_fwd(x: jax.Array, w: jax.Array, n_in: int, spec: QuantSpec):
  dims = _dims(x.ndim, n_in)
  (x_c, w_c), _ = dims
  qx = x if spec.act_qtype is None else _quantize(x, spec.act_qtype, _keep_axes(x.ndim, x_c), spec.per_tensor)
  qw = _quantize(w, spec.weight_qtype, _keep_axes(w.ndim, w_c), spec.per_tensor)
  y = qwix.dot_general(qx, qw, dims).astype(x.dtype)
  return y, (qx, qw)


def _qdot_bwd(n_in: int, spec: QuantSpec, residuals, g: jax.Array):
  qx, qw = residuals
  x = qwix.dequantize(qx) if isinstance(qx, qwix.QArray) else qx
  w = qwix.dequantize(qw)
  if spec.grad_qtype is not None:
    g = qwix.dequantize(_quantize(g, spec.grad_qtype, (), per_tensor=True))
  # Straight-through: the float gradient of dot(dequantized x, dequantized w).
  _, vjp = jax.vjp(lambda a, b: jax.lax.dot_general(a, b, _dims(x.ndim, n_in)), x, w)
  return vjp(g.astype(x.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _qdot(x: jax.Array, w: jax.Array, n_in: int, spec: QuantSpec) -> jax.Array:
  return _qdot_fwd(x, w, n_in, spec)[0]


_qdot.defvjp(_qdot_fwd, _qdot_bwd)


def quantized_dot(x: jax.Array, kernel: jax.Array, n_in: int, spec: QuantSpec) -> jax.Array:
  """x . kernel over x's last `n_in` axes and the kernel's first `n_in`, quantized as `spec` says (float kernel).

  Both operands must already be in the compute dtype; the result is in that dtype.
  """
  return _qdot(x, kernel, n_in, spec)


def stored_dot(x: jax.Array, kernel: jax.Array, scale: jax.Array, n_in: int, spec: QuantSpec) -> jax.Array:
  """x . kernel for a kernel stored as int8 + per-output-channel scale (decode only: no gradient to the kernel)."""
  dims = _dims(x.ndim, n_in)
  if spec.act_qtype is None:
    # Per-output-channel scales factor out of the contraction: scaling the output instead of the weight saves a pass
    # over the weight. As a 2-D matmul: XLA:CPU fuses the int8 -> float convert into a fast GEMM only in 2-D (a 3-D
    # kernel fell back to a ~4x slower loop).
    batch, out_shape = x.shape[: x.ndim - n_in], kernel.shape[n_in:]
    in_size = math.prod(kernel.shape[:n_in])
    y = jnp.dot(x.reshape(*batch, in_size), kernel.reshape(in_size, -1).astype(x.dtype))
    return y.reshape(*batch, *out_shape) * scale.reshape(out_shape).astype(x.dtype)
  qw = qwix.QArray(qvalue=kernel, scale=scale.astype(x.dtype), qtype=jnp.int8)
  qx = _quantize(x, spec.act_qtype, _keep_axes(x.ndim, dims[0][0]), False)
  return qwix.dot_general(qx, qw, dims).astype(x.dtype)


def quantize_kernel(kernel: jax.Array, n_in: int) -> tuple[jax.Array, jax.Array]:
  """(int8 kernel, float32 scale) with one scale per output channel; the scale keeps size-1 input dims."""
  q = qwix.quantize(kernel.astype(jnp.float32), jnp.int8, channelwise_axes=tuple(range(n_in, kernel.ndim)))
  return q.qvalue, q.scale


def _is_array(x: Any) -> bool:
  return hasattr(x, "shape") and hasattr(x, "dtype")


def quantize_params(params: dict, quantized_abstract: dict) -> dict:
  """Float params pure dict -> the layout of `quantized_abstract` (a model built with checkpoint_is_quantized).

  Every kernel whose module has a `kernel_scale` there becomes int8 with its scale; the other leaves are unchanged.
  The axes the scale keeps at full size are the output channels (and a scanned stack's layer axis), so this works on
  either layer layout.
  """
  if not isinstance(quantized_abstract, dict):
    return params
  if SCALE_NAME in quantized_abstract:
    kernel = params["kernel"]
    want = quantized_abstract[SCALE_NAME].shape
    keep = tuple(a for a in range(kernel.ndim) if want[a] == kernel.shape[a])
    q = qwix.quantize(jnp.asarray(kernel, jnp.float32), jnp.int8, channelwise_axes=keep)
    out = dict(params)
    out["kernel"], out[SCALE_NAME] = q.qvalue, q.scale.astype(quantized_abstract[SCALE_NAME].dtype)
    return out
  missing = sorted(set(quantized_abstract) - set(params))
  if missing:
    raise ValueError(f"params lack {missing} that the quantized model has")
  return {k: quantize_params(params[k], quantized_abstract[k]) for k in quantized_abstract}


def float_layout(tree: dict, weight_dtype: jnp.dtype | None = None) -> dict:
  """The float counterpart of a quantized params layout: no `kernel_scale`, kernels in `weight_dtype`.

  Works on abstract params (ShapeDtypeStructs) and on any tree with the same keys (e.g. shardings, when
  `weight_dtype` is None the kernels are kept as they are).
  """
  if not isinstance(tree, dict):
    return tree
  if SCALE_NAME in tree:
    out = {k: v for k, v in tree.items() if k != SCALE_NAME}
    if weight_dtype is not None:
      out["kernel"] = jax.ShapeDtypeStruct(tree["kernel"].shape, weight_dtype)
    return out
  return {k: float_layout(v, weight_dtype) for k, v in tree.items()}


def param_bytes(params: Any) -> int:
  """Bytes held by the arrays of a params tree (concrete or abstract)."""
  return sum(int(x.size) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(params) if _is_array(x))
