"""Gated feed-forward block: ``down(act(gate(x)) * up(x))``.

Example::

    mlp = GatedMLP(1024, 3072, "silu", rngs=nnx.Rngs(0))
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from tunix_zoo.errors import ConfigMismatchError
from tunix_zoo.layers.basic import Linear

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
  if name not in ACTIVATIONS:
    raise ConfigMismatchError(
        f"Activation {name!r} is not supported; supported: {', '.join(sorted(ACTIVATIONS))}."
    )
  return ACTIVATIONS[name]


class GatedMLP(nnx.Module):
  """SwiGLU / GeGLU feed-forward with HF's ``gate_proj``, ``up_proj``, ``down_proj``."""

  def __init__(
      self,
      hidden_size: int,
      intermediate_size: int,
      act: str,
      *,
      rngs: nnx.Rngs | None,
      dtype: Any = jnp.float32,
      param_dtype: Any = jnp.float32,
  ):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    activation(act)  # Fail at construction, not at the first forward.
    self.act = act
    self.gate_proj = Linear(hidden_size, intermediate_size, ("mlp", "embed"), **kw)
    self.up_proj = Linear(hidden_size, intermediate_size, ("mlp", "embed"), **kw)
    self.down_proj = Linear(intermediate_size, hidden_size, ("embed", "mlp"), **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down_proj(activation(self.act)(self.gate_proj(x)) * self.up_proj(x))
