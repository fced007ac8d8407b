"""Token embedding and rotary position embeddings (RoPE)."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from MaxText.config import choices

ROPE_TYPES = choices("rope_type")


class Embed(nnx.Module):
  """Embedding table [vocab, embed]; `attend` reuses it as the output projection for tied logits.

  Also the learned position table (GPT-3), with `axes` naming its rows other than "vocab".
  """

  def __init__(
      self,
      num_embeddings: int,
      features: int,
      *,
      rngs: nnx.Rngs,
      dtype: jnp.dtype = jnp.float32,
      weight_dtype: jnp.dtype = jnp.float32,
      axes: tuple[str | None, str | None] = ("vocab", "embed"),
  ):
    self.num_embeddings = num_embeddings
    self.dtype = dtype
    init = nnx.initializers.normal(stddev=1.0)
    self.embedding = nnx.Param(
        init(rngs.params(), (num_embeddings, features), weight_dtype),
        out_sharding=axes,
        eager_sharding=False,
    )

  def __call__(self, tokens: jax.Array) -> jax.Array:
    # jnp.take fills out-of-range ids with NaN, so a tokenizer/vocab_size mismatch shows up as a NaN loss.
    return jnp.take(self.embedding[...], tokens, axis=0).astype(self.dtype)

  def attend(self, x: jax.Array, *, compute_dtype: jnp.dtype | None = None) -> jax.Array:
    dtype = compute_dtype or self.dtype
    # Accumulated in float32 (XLA:CPU's fast bf16 path, ops/matmul.py), rounded once to dtype.
    table = self.embedding[...].astype(dtype)
    return jnp.einsum("...e,ve->...v", x.astype(dtype), table, preferred_element_type=jnp.float32).astype(dtype)


def rope_inv_frequencies(
    head_dim: int,
    *,
    rope_type: str = "default",
    min_timescale: float = 1.0,
    max_timescale: float = 10_000.0,
    scaling_factor: float = 1.0,
    low_freq_factor: float = 1.0,
    high_freq_factor: float = 4.0,
    original_max_position_embeddings: int = 8192,
    yarn_beta_fast: float = 32.0,
    yarn_beta_slow: float = 1.0,
) -> np.ndarray:
  """Rotation frequencies (radians per position) of the head_dim/2 dimension pairs, as float32.

  default: 1 / timescale_i with timescales spaced geometrically from min_timescale to max_timescale (theta).
  none: all zeros, so the rotation is the identity (models without RoPE).
  linear: positions divided by `scaling_factor` (same as dividing every frequency).
  llama3.1: frequencies whose wavelength exceeds original_max_position_embeddings / low_freq_factor are divided by
  `scaling_factor`, those shorter than original / high_freq_factor are kept, and the band between is interpolated.
  yarn: pairs turning more than `yarn_beta_fast` times over original_max_position_embeddings are kept, those turning
  fewer than `yarn_beta_slow` times are divided by `scaling_factor`, with a linear ramp between (the ramp ends are
  rounded outwards, as DeepSeek and transformers do). Its mscale factors act on amplitudes, see RotaryEmbedding.
  """
  if rope_type not in ROPE_TYPES:
    raise ValueError(f"rope_type {rope_type!r} is not one of {ROPE_TYPES}")
  fraction = 2.0 * np.arange(head_dim // 2, dtype=np.float64) / head_dim
  inv_freq = 1.0 / (min_timescale * (max_timescale / min_timescale) ** fraction)
  if rope_type == "none":
    inv_freq = np.zeros_like(inv_freq)
  elif rope_type == "linear":
    inv_freq = inv_freq / scaling_factor
  elif rope_type == "llama3.1":
    wavelen = 2.0 * math.pi / inv_freq
    low_freq_wavelen = original_max_position_embeddings / low_freq_factor
    high_freq_wavelen = original_max_position_embeddings / high_freq_factor
    band = high_freq_factor - low_freq_factor  # 0: no band between kept and divided frequencies to interpolate
    smooth = (original_max_position_embeddings / wavelen - low_freq_factor) / (band if band else 1.0)
    interpolated = (1.0 - smooth) * inv_freq / scaling_factor + smooth * inv_freq
    inv_freq = np.where(
        wavelen < high_freq_wavelen,
        inv_freq,
        np.where(wavelen > low_freq_wavelen, inv_freq / scaling_factor, interpolated),
    )
  elif rope_type == "yarn":
    original = original_max_position_embeddings
    inv_freq = _yarn_inv_frequencies(
        inv_freq, head_dim, max_timescale, scaling_factor, original, yarn_beta_fast, yarn_beta_slow
    )
  return inv_freq.astype(np.float32)


def _yarn_inv_frequencies(
    inv_freq: np.ndarray, dim: int, base: float, factor: float, original: int, beta_fast: float, beta_slow: float
) -> np.ndarray:
  def pair_index(rotations):  # the (fractional) pair that turns `rotations` times over `original` positions
    return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

  low = max(math.floor(pair_index(beta_fast)), 0)
  high = min(math.ceil(pair_index(beta_slow)), dim - 1)
  ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / ((high - low) or 0.001), 0.0, 1.0)
  return inv_freq / factor * ramp + inv_freq * (1.0 - ramp)


def yarn_mscale(scaling_factor: float, mscale: float = 1.0) -> float:
  """YaRN's magnitude correction 0.1 * mscale * ln(factor) + 1 (1 when not extending the context)."""
  return 1.0 if scaling_factor <= 1 else 0.1 * mscale * math.log(scaling_factor) + 1.0


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray | jax.Array, amplitude: float = 1.0) -> jax.Array:
  """Rotates x [batch, seq, heads, head_dim] by position; pairs are (i, i + head_dim/2) (the Hugging Face layout).

  Angles and the rotation are computed in float32: bf16 angles at positions in the thousands are off by radians.
  `amplitude` multiplies the rotated vector (YaRN's attention factor).
  """
  angles = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq, jnp.float32)  # [B, S, D/2]
  sin = jnp.sin(angles)[:, :, None, :]
  cos = jnp.cos(angles)[:, :, None, :]
  if amplitude != 1.0:
    sin, cos = sin * amplitude, cos * amplitude
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


@dataclasses.dataclass(frozen=True)
class RotaryEmbedding:
  """RoPE settings as plain numbers: hashable, so modules holding one keep a comparable graphdef and no parameters."""

  head_dim: int
  rope_type: str = "default"
  min_timescale: float = 1.0
  max_timescale: float = 10_000.0
  scaling_factor: float = 1.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192
  yarn_beta_fast: float = 32.0
  yarn_beta_slow: float = 1.0
  yarn_mscale: float = 0.0  # 0 = unset, as in transformers
  yarn_mscale_all_dim: float = 0.0

  @classmethod
  def from_config(cls, config, head_dim: int) -> "RotaryEmbedding":
    return cls(
        head_dim=head_dim,
        rope_type=config.rope_type,
        min_timescale=config.rope_min_timescale,
        max_timescale=config.rope_max_timescale,
        scaling_factor=config.rope_scaling_factor,
        low_freq_factor=config.rope_low_freq_factor,
        high_freq_factor=config.rope_high_freq_factor,
        original_max_position_embeddings=config.rope_original_max_position_embeddings,
        yarn_beta_fast=config.rope_yarn_beta_fast,
        yarn_beta_slow=config.rope_yarn_beta_slow,
        yarn_mscale=config.rope_yarn_mscale,
        yarn_mscale_all_dim=config.rope_yarn_mscale_all_dim,
    )

  @classmethod
  def local_from_config(cls, config, head_dim: int) -> "RotaryEmbedding | None":
    """The sliding-window layers' own RoPE (`local_rope_max_timescale`, unscaled), or None when they share it."""
    if config.local_rope_max_timescale <= 0:
      return None
    return cls(head_dim=head_dim, min_timescale=config.rope_min_timescale, max_timescale=config.local_rope_max_timescale)

  def inv_frequencies(self) -> np.ndarray:
    amplitude_only = ("head_dim", "yarn_mscale", "yarn_mscale_all_dim")
    fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in amplitude_only}
    return rope_inv_frequencies(self.head_dim, **fields)

  def amplitude(self) -> float:
    """What the rotated vectors are multiplied by: YaRN's attention factor (transformers' attention_scaling), else 1.

    With both mscales set (DeepSeek) it is mscale(factor, yarn_mscale) / mscale(factor, yarn_mscale_all_dim), else
    mscale(factor).
    """
    if self.rope_type != "yarn":
      return 1.0
    if self.yarn_mscale and self.yarn_mscale_all_dim:
      factor = self.scaling_factor
      return yarn_mscale(factor, self.yarn_mscale) / yarn_mscale(factor, self.yarn_mscale_all_dim)
    return yarn_mscale(self.scaling_factor)

  def softmax_scale_multiplier(self) -> float:
    """DeepSeek's YaRN correction of the attention softmax scale: mscale(factor, yarn_mscale_all_dim) squared."""
    if self.rope_type != "yarn" or not self.yarn_mscale_all_dim:
      return 1.0
    return yarn_mscale(self.scaling_factor, self.yarn_mscale_all_dim) ** 2

  def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
    if self.rope_type == "none":
      return x
    return apply_rope(x, positions, self.inv_frequencies(), self.amplitude())
