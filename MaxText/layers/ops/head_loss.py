"""The output head's matmul fused with the token cross-entropy, with its own backward pass (`head_loss: fused`).

`head_loss` picks how the training loss meets the head:
- "logits" (the accelerator default): the model computes the logits, then `losses.cross_entropy`, all autodiff'd.
- "fused" (the CPU default): `fused_head_cross_entropy` takes the final-normed hidden states and the head's
  kernel and writes the backward out: the logits gradient is softmax - one_hot, formed once, and the two head
  gradients are plain matmuls. Autodiff of the unfused form scatters into a [tokens, vocab] zero array
  (take_along_axis) and XLA:CPU then transposes the [tokens, vocab] gradient for the kernel's matmul; on
  llama-small (vocab 32000) fusing takes the head + loss from 2.9 s to 2.2 s per step (benchmarks/RESULTS.md).
Values and gradients are the same math. Soft-capped, quantized or biased heads always take the logits path.

`num_vocab_tiling` N > 1 (`tiled_cross_entropy`) runs either path on N chunks of the sequence, one after another
under a scan whose body is rematerialized, so only one chunk's [batch, seq / N, vocab] logits (and its gradient) is
live, in the forward pass and in the backward pass; the head's gradient accumulates over the chunks.
"""

import functools

import jax
import jax.numpy as jnp

from MaxText import sharding
from MaxText.layers import losses

_LOGITS_AXES = sharding.LOGITS_ACTIVATION


def _head_logits(x, kernel, kernel_is_vocab_major: bool, compute_dtype):
  spec = "bse,ve->bsv" if kernel_is_vocab_major else "bse,ev->bsv"
  logits = jnp.einsum(
      spec, x.astype(compute_dtype), kernel.astype(compute_dtype), preferred_element_type=jnp.float32
  ).astype(jnp.float32)
  return sharding.with_logical_constraint(logits, _LOGITS_AXES)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def fused_head_cross_entropy(
    x: jax.Array,
    kernel: jax.Array,
    targets: jax.Array,
    z_loss_multiplier: float,
    kernel_is_vocab_major: bool,
    compute_dtype,
) -> tuple[jax.Array, jax.Array]:
  """losses.cross_entropy(x @ kernel, targets) for hidden states x [B, S, E] and a head kernel [E, V] ([V, E] when
  `kernel_is_vocab_major`, a tied embedding table); the matmul runs in compute_dtype with float32 results."""
  out, _ = _fused_fwd(x, kernel, targets, z_loss_multiplier, kernel_is_vocab_major, compute_dtype)
  return out


def _fused_fwd(x, kernel, targets, z_loss_multiplier, kernel_is_vocab_major, compute_dtype):
  logits = _head_logits(x, kernel, kernel_is_vocab_major, compute_dtype)
  total, z_loss, log_z = losses.cross_entropy_and_log_z(logits, targets, z_loss_multiplier)
  # The logits are kept for the backward pass, as autodiff would keep them: recomputing costs a vocab matmul.
  return (total, z_loss), (x, kernel, targets, logits, log_z)


def _fused_bwd(z_loss_multiplier, kernel_is_vocab_major, compute_dtype, residuals, cotangents):
  x, kernel, targets, logits, log_z = residuals
  g_total, g_z = cotangents
  # d total / d logits = softmax * (1 + 2 z log_z) - one_hot;  d z_loss / d logits = softmax * 2 z log_z.
  dz = 2.0 * z_loss_multiplier * log_z
  scale = g_total * (1.0 + dz) + g_z * dz
  one_hot = jnp.arange(logits.shape[-1], dtype=targets.dtype) == targets[..., None]
  d_logits = jnp.exp(logits - log_z[..., None]) * scale[..., None] - jnp.where(one_hot, g_total[..., None], 0.0)
  d_logits = sharding.with_logical_constraint(d_logits.astype(compute_dtype), _LOGITS_AXES)
  k = kernel.astype(compute_dtype)
  if kernel_is_vocab_major:
    dx = jnp.einsum("bsv,ve->bse", d_logits, k, preferred_element_type=jnp.float32)
    dk = jnp.einsum("bsv,bse->ve", d_logits, x.astype(compute_dtype), preferred_element_type=jnp.float32)
  else:
    dx = jnp.einsum("bsv,ev->bse", d_logits, k, preferred_element_type=jnp.float32)
    dk = jnp.einsum("bse,bsv->ev", x.astype(compute_dtype), d_logits, preferred_element_type=jnp.float32)
  return dx.astype(x.dtype), dk.astype(kernel.dtype), None


fused_head_cross_entropy.defvjp(_fused_fwd, _fused_bwd)


def tiled_cross_entropy(
    model, hidden: jax.Array, targets: jax.Array, z_loss_multiplier: float, num_tiles: int
) -> tuple[jax.Array, jax.Array]:
  """model.cross_entropy(hidden, targets, z_loss_multiplier) (a Transformer's per-token (total, z_loss)), computed
  over `num_tiles` sequence chunks one at a time (`num_vocab_tiling`).

  hidden [B, S, E] and targets [B, S] are cut along the sequence (S % num_tiles == 0), not along the flattened
  tokens, so every chunk keeps the batch's sharding and all devices work on each chunk. The scan body is
  rematerialized: the backward pass recomputes one chunk's logits at a time instead of keeping all of them, and the
  scan's transpose accumulates the head's gradient over the chunks (XLA keeps that sum sharded like the head).
  """
  if num_tiles == 1:
    return model.cross_entropy(hidden, targets, z_loss_multiplier)
  batch, length = targets.shape
  if length % num_tiles:
    raise ValueError(f"num_vocab_tiling: {num_tiles} chunks do not divide the sequence of {length} tokens")
  chunk = length // num_tiles
  # [B, S, ...] -> [N, B, S / N, ...]: chunk n holds tokens n * S/N .. (n+1) * S/N - 1 of every row.
  split = lambda a: jnp.moveaxis(a.reshape((batch, num_tiles, chunk) + a.shape[2:]), 1, 0)

  @functools.partial(jax.checkpoint, prevent_cse=False)  # in a scan, CSE across iterations cannot happen
  def one_chunk(x, t):
    x = sharding.with_logical_constraint(x, sharding.EMBED_AND_LOGITS_ACTIVATION)
    t = sharding.with_logical_constraint(t, _LOGITS_AXES[:2])
    return model.cross_entropy(x, t, z_loss_multiplier)

  _, (total, z_loss) = jax.lax.scan(lambda carry, xt: (carry, one_chunk(*xt)), None, (split(hidden), split(targets)))
  merge = lambda a: jnp.moveaxis(a, 0, 1).reshape(batch, length)
  return merge(total), merge(z_loss)
