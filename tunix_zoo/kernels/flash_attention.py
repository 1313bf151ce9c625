"""Causal attention without a mask array through cuDNN's flash attention.

``jax.nn.dot_product_attention`` defaults to its XLA path (about 12x slower on an H100
for a prefill), so cuDNN must be asked for. jax's cuDNN attention carries its own
partitioning rules, so on a mesh it needs no ``shard_map`` of ours: the SPMD
partitioner splits it over batch and heads.

Example::

    out = flash_attention.attend(q, k, v, scale=0.125, window=None, setting="auto")
    if out is None:  # Not a GPU, or shapes cuDNN refuses: XLA's path serves.
      ...
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tunix_zoo.errors import KernelError
from tunix_zoo.kernels.policy import runs_kernel


def why_unsupported(q: jax.Array, softcap: float | None = None) -> str | None:
  """Why cuDNN's flash attention cannot serve queries ``q`` ``[B, T, N, H]``; None when
  it may (cuDNN still refuses some head sizes and lengths while tracing)."""
  if softcap is not None:
    return "soft-capped logits (the cap needs the logits, which flash attention never forms)"
  if jax.default_backend() != "gpu":
    return f"the {jax.default_backend()} backend (cuDNN needs a GPU)"
  if q.dtype not in (jnp.bfloat16, jnp.float16):
    return f"{jnp.dtype(q.dtype).name} queries (cuDNN's flash attention takes 16-bit floats)"
  return None


def supports(q: jax.Array, softcap: float | None = None) -> bool:
  """Whether cuDNN's flash attention may serve ``q`` (see :func:`why_unsupported`)."""
  return why_unsupported(q, softcap) is None


def attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    scale: float,
    window: int | None,
    *,
    setting: str,
    softcap: float | None = None,
) -> jax.Array | None:
  """Causal attention of ``q`` ``[B, T, N, H]`` over ``k, v`` ``[B, T, K, H]`` (limited to
  ``window`` keys) through cuDNN where the policy's ``setting`` runs it; None where XLA's
  path should serve, also under ``"auto"`` where cuDNN refuses the shapes while tracing.
  A forced ``"cudnn"`` raises KernelError instead."""
  if not runs_kernel("flash_attention", setting, why_unsupported(q, softcap)):
    return None
  try:
    return jax.nn.dot_product_attention(
        q, k, v, scale=scale, is_causal=True,
        local_window_size=None if window is None else (window - 1, 0), implementation="cudnn",
    )
  except (ValueError, NotImplementedError, RuntimeError) as error:
    if setting == "cudnn":
      raise KernelError(f"KernelPolicy(flash_attention='cudnn'): cuDNN refused: {error}") from error
    return None
