"""Token cross-entropy (+ z-loss) from logits: the plain path of `head_loss` (ops/head_loss.py fuses it with the
output head's matmul)."""

import jax
import jax.numpy as jnp


def cross_entropy_and_log_z(
    logits: jax.Array, targets: jax.Array, z_loss_multiplier: float
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(total, z_loss, log_z) per token in float32: log_z = logsumexp(logits), total = log_z - target logit + z_loss."""
  logits = logits.astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  z_loss = z_loss_multiplier * jnp.square(log_z)
  return log_z - target_logit + z_loss, z_loss, log_z


def cross_entropy(logits: jax.Array, targets: jax.Array, z_loss_multiplier: float) -> tuple[jax.Array, jax.Array]:
  """Per-token cross entropy (+ z-loss) in float32; returns (total, z_loss), each shaped like targets."""
  total, z_loss, _ = cross_entropy_and_log_z(logits, targets, z_loss_multiplier)
  return total, z_loss
