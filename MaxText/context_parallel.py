"""Load-balanced context parallelism: the token order that gives every `context` shard equal causal work.

With the sequence sharded over n context devices in natural order, device n-1's queries see the whole prefix while
device 0's see only its own chunk, so causal attention work grows linearly with the device index. Cutting each
sequence into 2n chunks and giving device i chunks i and 2n-1-i (upstream MaxText's `context_parallel_load_balance`)
pairs a short prefix with a long one, so each device does the same work.

The train and eval steps reorder every [batch, seq] array of the batch once, as it enters the step (inputs,
positions, segment ids, targets and the target mask move together, and the loss is a masked sum, so it does not
change); attention then builds its causal / sliding-window mask from `token_index`, the natural offset of each
(permuted) slot, so every query attends exactly to the keys it would in natural order. Pure functions, free of
Flax; the order is static (numpy), so it costs no device work to build.
"""

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np


def context_parallel_size(config) -> int:
  """The context mesh axis' total degree (ici x dcn) from the resolved config."""
  axes = list(config.mesh_axes)
  if "context" not in axes:
    return 1
  i = axes.index("context")
  return int(config.ici_parallelism[i]) * int(config.dcn_parallelism[i])


def is_load_balanced(config) -> bool:
  """Whether training permutes the sequence: load balancing asked for and a context axis to balance over."""
  return bool(config.context_parallel_load_balance) and context_parallel_size(config) > 1


def chunk_order(n: int) -> np.ndarray:
  """The 2n chunks in the order they are laid out: 0, 2n-1, 1, 2n-2, ... (device i gets chunks i and 2n-1-i)."""
  return np.stack([np.arange(n), 2 * n - 1 - np.arange(n)], axis=1).reshape(-1)


def load_balanced_order(length: int, n: int) -> np.ndarray:
  """order[j] = the natural offset of the token at permuted slot j, for a sequence of `length` and n shards."""
  if n <= 1:
    return np.arange(length, dtype=np.int32)
  if length % (2 * n):
    raise ValueError(f"sequence length {length} is not divisible by 2 x {n} context shards")
  chunks = np.arange(length, dtype=np.int32).reshape(2 * n, length // (2 * n))
  return chunks[chunk_order(n)].reshape(-1)


def _take_chunks(x, n: int, axis: int, order: np.ndarray):
  """x with its 2n chunks along `axis` taken in `order` (a chunk-wise gather, so GSPMD moves whole chunks)."""
  xp = jnp if isinstance(x, jax.Array) else np
  axis = axis % x.ndim
  shape = x.shape
  chunks = x.reshape(shape[:axis] + (2 * n, shape[axis] // (2 * n)) + shape[axis + 1 :])
  return xp.take(chunks, order, axis=axis).reshape(shape)


def reorder(x: jax.Array | np.ndarray, n: int, axis: int = 1):
  """Natural -> load-balanced order along `axis`."""
  return x if n <= 1 else _take_chunks(x, n, axis, chunk_order(n))


def restore(x: jax.Array | np.ndarray, n: int, axis: int = 1):
  """Load-balanced -> natural order along `axis` (the inverse of `reorder`)."""
  return x if n <= 1 else _take_chunks(x, n, axis, np.argsort(chunk_order(n)))


def reorder_batch(batch: Mapping[str, Any], config) -> dict[str, Any]:
  """Every [batch, seq] array of a training batch in load-balanced order (unchanged when not load-balanced)."""
  if not is_load_balanced(config):
    return dict(batch)
  n = context_parallel_size(config)
  return {k: reorder(v, n, axis=1) if v.ndim >= 2 else v for k, v in batch.items()}


def token_index(config, length: int, model_mode: str = "train") -> np.ndarray:
  """The natural offset of each slot of a `length`-token row the model sees: attention's causal order.

  Only training (and eval) rows are permuted; prefill and decode keep the natural order.
  """
  if model_mode == "train" and is_load_balanced(config):
    return load_balanced_order(length, context_parallel_size(config))
  return np.arange(length, dtype=np.int32)


def causal_work(length: int, n: int, balanced: bool, window: int = 0) -> np.ndarray:
  """Query-key pairs each of n context shards computes under a causal (optionally sliding-window) mask.

  Shard i holds the queries at slots [i * length/n, (i+1) * length/n) of the (possibly load-balanced) layout and
  attends over all keys (all-gathered), skipping the masked ones as a flash kernel does: a query at natural
  offset q sees min(q + 1, window) keys. Attention FLOPs are proportional (4 x head_dim x heads per pair forward).
  """
  order = load_balanced_order(length, n) if balanced else np.arange(length)
  seen = order.astype(np.int64) + 1
  if window > 0:
    seen = np.minimum(seen, window)
  return seen.reshape(n, length // n).sum(axis=1)


def in_natural_order(fn, n: int, *arrays, **kwargs):
  """fn(*arrays, **kwargs) for a kernel whose causal mask assumes natural order, on [B, S, ...] arrays in
  load-balanced order.

  The arrays (None passes through) are put back in natural order along S, and fn's output returned to the
  load-balanced one; n <= 1 is a plain call.
  """
  if n <= 1:
    return fn(*arrays, **kwargs)
  out = fn(*(None if x is None else restore(x, n, axis=1) for x in arrays), **kwargs)
  return reorder(out, n, axis=1)
