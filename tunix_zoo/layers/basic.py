"""Linear, embedding and RMSNorm layers that keep the checkpoint's parameter layout.

Weights are stored as checkpoints store them (a linear weight is ``[out, in]``) so
loading and export are slice copies; each parameter carries ``logical_axes`` that
:mod:`tunix_zoo.sharding` maps onto the mesh.

Example::

    proj = Linear(1024, 2048, ("mlp", "embed"), rngs=nnx.Rngs(0))
    y = proj(x)  # x: [..., 1024] -> [..., 2048]
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from tunix_zoo import sharding
from tunix_zoo.kernels import gemv
from tunix_zoo.kernels.policy import KernelPolicy

INIT_STDDEV = 0.02


def init_value(
    rngs: nnx.Rngs | None, shape: tuple[int, ...], dtype: Any, fill: float | None = None
) -> jax.Array | jax.ShapeDtypeStruct:
  """A parameter's initial value: ``fill`` everywhere, or normal(0, 0.02) when None.

  ``rngs=None`` builds an abstract parameter (shape and dtype only) for a model that is
  about to be loaded: plain Python, no tracing, so a 405B model's structure takes well
  under a second (``nnx.eval_shape`` with Rngs draws took 16 s).
  """
  if rngs is None:
    return jax.ShapeDtypeStruct(shape, jnp.dtype(dtype))
  if fill is not None:
    return jnp.full(shape, fill, dtype)
  return (INIT_STDDEV * jax.random.normal(rngs.params(), shape)).astype(dtype)


def param(
    rngs: nnx.Rngs | None,
    shape: tuple[int, ...],
    dtype: Any,
    logical_axes: tuple[str | None, ...],
    fill: float | None = None,
) -> nnx.Param:
  """A parameter with its logical axes; ``init_fill`` metadata records how it starts,
  so ``AutoModel.from_config`` can initialise it in place on a mesh."""
  return nnx.Param(
      init_value(rngs, shape, dtype, fill), logical_axes=logical_axes, init_fill=fill
  )


class Linear(nnx.Module):
  """``y = x @ weight.T (+ bias)`` with ``weight`` laid out ``[out, in]`` as in HF.

  :func:`tunix_zoo.layers.quantized.quantize_linears` may quantize it: ``quantization``
  then says how, ``weight`` holds the quantized values and ``weight_scale`` their scales.
  """

  def __init__(
      self,
      in_features: int,
      out_features: int,
      logical_axes: tuple[str | None, str | None],
      *,
      use_bias: bool = False,
      rngs: nnx.Rngs | None,
      dtype: Any = jnp.float32,
      param_dtype: Any = jnp.float32,
  ):
    self.dtype = dtype
    self.weight = param(rngs, (out_features, in_features), param_dtype, logical_axes)
    self.bias = (
        param(rngs, (out_features,), param_dtype, logical_axes[:1], fill=0.0) if use_bias else None
    )
    self.quantization = None
    self.weight_scale = nnx.data(None)  # a Param once quantized
    self.kernel_policy = KernelPolicy()  # its gemv and (once quantized) quantized_matmul

  @property
  def dense_shape(self) -> tuple[int, int]:
    """``(out, in)``: the weight's shape, quantized or not."""
    return tuple(self.weight.get_metadata().get("dense_shape") or self.weight.shape)

  def __call__(self, x: jax.Array) -> jax.Array:
    kind = self.quantization and self.quantization.kind
    out_features, in_features = self.dense_shape[-2:]
    if gemv.takes(x, out_features, in_features, kind, self.kernel_policy):
      scales = None if kind is None else self.weight_scale[...]
      y = gemv.product(x.astype(self.dtype), self.weight[...], scales, kind=kind,
                       dtype=self.dtype)
    elif self.quantization is None:
      y = jnp.einsum("...i,oi->...o", x.astype(self.dtype), self.weight[...].astype(self.dtype))
    else:
      values = self.weight.get_value()
      # The model's record of the mesh axes (an Auto mesh's types inside jit have none).
      axes = tuple(v.get_metadata().get("out_sharding") for v in (self.weight,
                                                                   self.weight_scale))
      y = self.quantization.matmul(x, values, self.weight_scale[...], self.dtype,
                                   kernel=self.kernel_policy.quantized_matmul,
                                   mesh=sharding.mesh_of(values),
                                   axes=None if None in axes else axes)
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y


class Embedding(nnx.Module):
  """Token embedding ``[vocab, hidden]``; ``attend`` reuses it as a tied LM head."""

  def __init__(
      self,
      vocab_size: int,
      hidden_size: int,
      *,
      rngs: nnx.Rngs | None,
      dtype: Any = jnp.float32,
      param_dtype: Any = jnp.float32,
  ):
    self.dtype = dtype
    self.weight = param(rngs, (vocab_size, hidden_size), param_dtype, ("vocab", "embed"))
    self.kernel_policy = KernelPolicy()  # its gemv setting, for attend

  def __call__(self, tokens: jax.Array) -> jax.Array:
    return jnp.take(self.weight[...], tokens, axis=0).astype(self.dtype)

  def attend(self, x: jax.Array) -> jax.Array:
    if gemv.takes(x, *self.weight.shape, None, self.kernel_policy):
      return gemv.product(x.astype(self.dtype), self.weight[...], dtype=self.dtype)
    return jnp.einsum("...e,ve->...v", x.astype(self.dtype), self.weight[...].astype(self.dtype))


class RMSNorm(nnx.Module):
  """RMS normalisation computed in float32; ``offset=1`` gives Gemma's ``(1 + w)`` scale.

  With ``offset`` the weight starts at 0, as Gemma checkpoints store it.
  """

  def __init__(
      self,
      dim: int,
      *,
      rngs: nnx.Rngs | None,
      eps: float = 1e-6,
      offset: float = 0.0,
      dtype: Any = jnp.float32,
      param_dtype: Any = jnp.float32,
  ):
    self.eps = eps
    self.offset = offset
    self.dtype = dtype
    fill = 0.0 if offset else 1.0
    self.weight = param(rngs, (dim,), param_dtype, ("norm",), fill)

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    if self.offset:
      # Gemma scales in float32 before casting back.
      return (normed * (self.offset + self.weight[...].astype(jnp.float32))).astype(self.dtype)
    # Llama casts back first, then scales in the compute dtype.
    return self.weight[...].astype(self.dtype) * normed.astype(self.dtype)

  @classmethod
  def of(cls, dim: int, config: Any, *, rngs: nnx.Rngs | None, dtype: Any,
         param_dtype: Any) -> "RMSNorm":
    """The norm a decoder config asks for (its epsilon and Gemma's ``1 + w`` offset)."""
    return cls(dim, rngs=rngs, eps=config.norm_eps, offset=config.norm_offset, dtype=dtype,
               param_dtype=param_dtype)
