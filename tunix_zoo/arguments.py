"""Checks of the arguments users pass to the public API, before any work starts.

Each check raises a :class:`~tunix_zoo.errors.ZooError` subclass naming the argument,
the value, and what to pass instead::

    float_dtype("bfloat16", "param_dtype")   # dtype('bfloat16')
    float_dtype(jnp.int8, "param_dtype")     # ArgumentError: ... is not a floating dtype
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tunix_zoo.errors import ArgumentError, ShardingError

_DTYPE_FIX = "Pass a floating dtype: 'float32', 'bfloat16' or 'float16' (or jnp.bfloat16 ...)."


def float_dtype(value: Any, name: str) -> np.dtype | None:
  """``value`` as a floating numpy dtype (None stays None), else raises ArgumentError.

  Integer and bool dtypes are refused: casting float weights to them silently rounds
  every value (to zeros, for initialised weights).
  """
  if value is None:
    return None
  try:
    dtype = np.dtype(jnp.dtype(value))
  except (TypeError, ValueError):
    raise ArgumentError(f"{name}={value!r} is not a dtype. {_DTYPE_FIX}") from None
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ArgumentError(
        f"{name}={dtype.name} is not a floating dtype: weights cast to it would lose their "
        f"values. {_DTYPE_FIX} To quantise, load in a float dtype and quantise with qwix.")
  return dtype


def mesh_or_none(mesh: Any, name: str = "mesh") -> jax.sharding.Mesh | None:
  """``mesh`` if it is None or a ``jax.sharding.Mesh``, else raises ShardingError."""
  if mesh is None or isinstance(mesh, jax.sharding.Mesh):
    return mesh
  shape = "shape"
  if isinstance(mesh, str) and "x" in mesh.lower():
    shape = "(" + mesh.lower().replace("x", ", ") + ")"
  raise ShardingError(
      f"{name} must be a jax.sharding.Mesh (or None for one device), got "
      f"{type(mesh).__name__} {mesh!r}. Build one: jax.make_mesh({shape}, ('fsdp', 'tp')).")


def positive_int(value: Any, name: str, *, allow_zero: bool = False) -> int:
  """``value`` if it is an int > 0 (>= 0 with ``allow_zero``), else raises ArgumentError."""
  low = 0 if allow_zero else 1
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
    raise ArgumentError(f"{name}={value!r} must be an integer >= {low}.")
  return int(value)


def one_of(value: Any, name: str, choices: tuple[str, ...]) -> str:
  """``value`` if it is one of ``choices``, else raises ArgumentError listing them."""
  if value not in choices:
    raise ArgumentError(f"{name}={value!r} is not one of {', '.join(map(repr, choices))}.")
  return value
