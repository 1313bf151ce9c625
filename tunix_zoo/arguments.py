"""Checks of the arguments users pass to the public API, before any work starts.

Each check raises a :class:`~tunix_zoo.errors.ZooError` subclass naming the argument,
the value, and what to pass instead::

    float_dtype("bfloat16", "param_dtype")   # dtype('bfloat16')
    float_dtype(jnp.int8, "param_dtype")     # ArgumentError: ... is not a floating dtype
"""

from __future__ import annotations

import operator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tunix_zoo.errors import ArgumentError, GenerationError, LoraError, ShardingError

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
        f"values. {_DTYPE_FIX} To quantize the weights, pass quantization='int8' (or 'int4', 'nf4', 'fp8').")
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


def _is_int(value: Any) -> bool:
  """Whether ``value`` is an integer (a Python, numpy or 0-d integer JAX one), not a bool."""
  if isinstance(value, (bool, np.bool_)):
    return False
  try:
    operator.index(value)
  except TypeError:
    return False
  return True


def check_generate(max_new_tokens: Any, seed: Any, pad_id: Any, eos_ids: Any) -> None:
  """Raises GenerationError for ``generate`` arguments of the wrong type (the sampling
  settings' ranges are checked by ``generate`` itself)."""
  for name, value in (("max_new_tokens", max_new_tokens), ("seed", seed), ("pad_id", pad_id)):
    if not _is_int(value):
      raise GenerationError(f"{name} must be an integer, got {type(value).__name__} {value!r}.")
  if pad_id < 0:
    raise GenerationError(f"pad_id must be a token id >= 0, got {pad_id}.")
  ids = [eos_ids] if _is_int(eos_ids) or isinstance(eos_ids, str) else eos_ids
  if ids is not None and (isinstance(ids, str) or not all(_is_int(i) and i >= 0 for i in ids)):
    raise GenerationError(f"eos_ids must be a token id or a list of token ids, got {eos_ids!r}.")


def check_lora(module_path: Any, param_dtype: Any) -> None:
  """Raises a ZooError for ``apply_lora`` arguments of the wrong type."""
  if not isinstance(module_path, str):
    raise LoraError(f"module_path must be a regex string, got {type(module_path).__name__} "
                    f"{module_path!r}.")
  float_dtype(param_dtype, "param_dtype")
