"""Rotary position embeddings: default, linear-scaled and Llama 3-scaled frequencies.

Example::

    inv_freq = inverse_frequencies(RopeConfig(theta=1e6), head_dim=128)
    q = apply_rope(q, positions, inv_freq)  # q: [B, T, N, H], positions: [B, T]
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from tunix_zoo.config import RopeConfig


def inverse_frequencies(rope: RopeConfig, head_dim: int) -> np.ndarray:
  """``1 / theta^(2i/d)`` in float32, scaled as the rope kind says (as transformers does)."""
  exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
  inv_freq = (np.float32(1.0) / (np.float32(rope.theta) ** exponents)).astype(np.float32)
  if rope.kind == "linear":
    return (inv_freq / np.float32(rope.factor)).astype(np.float32)
  if rope.kind == "llama3":
    return _llama3_scaled(inv_freq, rope)
  return inv_freq


def _llama3_scaled(inv_freq: np.ndarray, rope: RopeConfig) -> np.ndarray:
  old_len = rope.original_max_position_embeddings
  low_freq_wavelen = old_len / rope.low_freq_factor
  high_freq_wavelen = old_len / rope.high_freq_factor
  wavelen = 2 * math.pi / inv_freq
  scaled = np.where(wavelen > low_freq_wavelen, inv_freq / rope.factor, inv_freq)
  smooth = (old_len / wavelen - rope.low_freq_factor) / (
      rope.high_freq_factor - rope.low_freq_factor
  )
  smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
  is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
  return np.where(is_medium, smoothed, scaled).astype(np.float32)


class RotaryAngles(NamedTuple):
  """The float32 cos and sin ``[B, T, 1, H]`` of positions' rotary angles for one set of
  frequencies. A scanned layer stack computes them once for all its layers, since XLA
  does not hoist them out of the loop and would compute them again in every layer.

  Example::

      angles = rotary_angles(positions, inverse_frequencies(RopeConfig(theta=1e6), 128))
      q = apply_rope(q, angles)  # the same as apply_rope(q, positions, inv_freq)
  """

  cos: jax.Array
  sin: jax.Array


def rotary_angles(positions: jax.Array, inv_freq: np.ndarray) -> RotaryAngles:
  """The rotary angles' cos and sin of ``positions`` ``[B, T]`` at frequencies ``inv_freq``."""
  freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [B, T, H/2]
  angles = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
  return RotaryAngles(jnp.cos(angles), jnp.sin(angles))


def apply_rope(x: jax.Array, positions: jax.Array | RotaryAngles,
               inv_freq: np.ndarray | None = None) -> jax.Array:
  """Rotates ``x`` ``[B, T, N, H]`` by ``positions`` ``[B, T]`` at frequencies ``inv_freq``
  (rotate-half layout), or by their :class:`RotaryAngles` computed beforehand (then
  ``inv_freq`` is not needed)."""
  angles = positions if isinstance(positions, RotaryAngles) else rotary_angles(positions, inv_freq)
  cos, sin = angles.cos.astype(x.dtype), angles.sin.astype(x.dtype)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return x * cos + rotated * sin
