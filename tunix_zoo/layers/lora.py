"""``LoRALinear``: a :class:`Linear` with a trainable low-rank update (LoRA).

``y = x @ W.T (+ b) + dropout(x) @ A.T @ B.T * alpha / rank`` with the base ``weight``
(and ``bias``) kept as they were and the adapters ``lora_a`` ``[rank, in]`` and
``lora_b`` ``[out, rank]`` held as ``nnx.LoRAParam``, laid out as PEFT stores them.
``lora_b`` starts at zero, so a fresh adapter leaves the layer's output unchanged.
A stacked Linear of a scanned model (``weight`` ``[layers, out, in]``) gets stacked
adapters ``[layers, rank, in]`` and ``[layers, out, rank]``, one per layer.

Each adapter carries the logical axis of the base weight's side it touches (``lora_a``
the in-axis, ``lora_b`` the out-axis), so it shards like the base weight on a mesh, and
that side's mesh axes as ``out_sharding`` (what ``nnx.get_partition_spec`` reads).
:func:`tunix_zoo.lora.apply_lora` puts these layers into a model.

Example::

    proj = Linear(1024, 2048, ("mlp", "embed"), rngs=nnx.Rngs(0))
    adapted = LoRALinear(proj, rank=8, alpha=16.0, rngs=nnx.Rngs(1))
    y = adapted(x)               # == proj(x) until lora_b is trained
    plain = adapted.merged()     # a Linear with W + B @ A * alpha / rank
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from tunix_zoo.layers.basic import Linear
from tunix_zoo.layers.stacked import LAYER_NUMBER, STACKED_LAYERS


@functools.lru_cache(maxsize=64)
def _initialiser(shape: tuple[int, ...], dtype: Any, bound: float, out_sharding: Any):
  """A jitted ``key -> uniform(-bound, bound)`` (zeros for ``bound == 0``) created directly
  in ``out_sharding``; cached, so all layers of one shape share one compiled program."""

  def init(key: jax.Array) -> jax.Array:
    if bound == 0:
      return jnp.zeros(shape, dtype)
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)

  return jax.jit(init, out_shardings=out_sharding)


@functools.lru_cache(maxsize=64)
def _merger(out_sharding: Any):
  """A jitted ``(W, A, B, scale) -> W + B @ A * scale`` landing in ``out_sharding``."""

  def merge(weight: jax.Array, lora_a: jax.Array, lora_b: jax.Array, scale: float):
    # In float32 at full precision: TPUs would otherwise multiply in bfloat16.
    delta = jnp.einsum(
        "...or,...ri->...oi", lora_b.astype(jnp.float32), lora_a.astype(jnp.float32),
        precision=jax.lax.Precision.HIGHEST,
    )
    return (weight.astype(jnp.float32) + scale * delta).astype(weight.dtype)

  return jax.jit(merge, static_argnames="scale", out_shardings=out_sharding)


def _float_dtype(linear: Linear) -> Any:
  """The weight's dtype, or for a quantized weight its scales' (the model's param dtype)."""
  return (linear.weight if linear.weight_scale is None else linear.weight_scale).dtype


@functools.lru_cache(maxsize=64)
def _dequantizer(quantization: Any, dtype: Any, out_sharding: Any):
  """A jitted ``(values, scales) -> W`` in ``dtype``, landing in ``out_sharding``."""
  return jax.jit(lambda values, scales: quantization.dequantize(values, scales, dtype),
                 out_shardings=out_sharding)


class LoRALinear(Linear):
  """A :class:`Linear` plus LoRA adapters, called exactly like the Linear it adapts.

  Args:
    base: the Linear to adapt; its ``weight`` and ``bias`` variables are reused, not
      copied.
    rank: the adapters' inner dimension.
    alpha: the update is scaled by ``alpha / rank`` (PEFT's ``lora_alpha``).
    dropout: dropout rate on the adapter's input; active until ``model.eval()``.
    rngs: draws ``lora_a`` (PEFT's default: uniform in ``±1/sqrt(in)``) and the dropout
      keys. None builds shape-only adapters, as ``init_value`` does, for planning.
    param_dtype: the adapters' dtype; by default the base weight's.
    shardings: where ``lora_a`` and ``lora_b`` are created (e.g. ``NamedSharding``s on
      the base weight's mesh); None leaves placement to JAX.
  """

  def __init__(
      self,
      base: Linear,
      rank: int,
      alpha: float,
      *,
      dropout: float = 0.0,
      rngs: nnx.Rngs | None,
      param_dtype: Any = None,
      shardings: tuple[Any, Any] = (None, None),
  ):
    self.dtype = base.dtype
    self.weight = base.weight
    self.bias = base.bias
    self.quantization = base.quantization
    self.weight_scale = nnx.data(base.weight_scale)  # frozen quantized weights: QLoRA
    self.kernel_policy = base.kernel_policy
    self.rank = rank
    self.alpha = alpha
    *lead, out_features, in_features = base.dense_shape
    metadata = base.weight.get_metadata()
    *lead_axes, out_axis, in_axis = metadata.get("logical_axes") or (None,) * (len(lead) + 2)
    dtype = jnp.dtype(param_dtype or _float_dtype(base))
    a_shape, b_shape = (*lead, rank, in_features), (*lead, out_features, rank)
    if rngs is None:
      a_value = jax.ShapeDtypeStruct(a_shape, dtype)
      b_value = jax.ShapeDtypeStruct(b_shape, dtype)
    else:
      key = rngs.params()
      a_value = _initialiser(a_shape, dtype, 1 / math.sqrt(in_features), shardings[0])(key)
      b_value = _initialiser(b_shape, dtype, 0.0, shardings[1])(key)
    # A stacked weight's layer numbers (tunix_zoo.build.STACKED_LAYERS) go with its adapters.
    layers = {k: v for k, v in metadata.items() if k in (STACKED_LAYERS, LAYER_NUMBER)}
    self.lora_a = nnx.LoRAParam(a_value, logical_axes=(*lead_axes, None, in_axis), **layers)
    self.lora_b = nnx.LoRAParam(b_value, logical_axes=(*lead_axes, out_axis, None), **layers)
    out_mesh_axes = metadata.get("out_sharding")
    if out_mesh_axes:
      # The mesh axes of the base weight's sides, as the model annotates its parameters.
      *lead_mesh, out_mesh, in_mesh = out_mesh_axes
      self.lora_a.set_metadata(out_sharding=(*lead_mesh, None, in_mesh), eager_sharding=False)
      self.lora_b.set_metadata(out_sharding=(*lead_mesh, out_mesh, None), eager_sharding=False)
    self.dropout = nnx.Dropout(dropout, rngs=rngs) if dropout else None

  @property
  def scale(self) -> float:
    return self.alpha / self.rank

  def __call__(self, x: jax.Array) -> jax.Array:
    y = super().__call__(x)
    h = x.astype(self.dtype)
    if self.dropout is not None:
      h = self.dropout(h)
    down = jnp.einsum("...i,ri->...r", h, self.lora_a[...].astype(self.dtype))
    up = jnp.einsum("...r,or->...o", down, self.lora_b[...].astype(self.dtype))
    return y + up * self.scale

  def merged(self) -> Linear:
    """A plain Linear computing what this layer computes (without dropout): its weight is
    ``W + B @ A * alpha / rank``, in W's dtype and sharding; the bias is shared. A
    quantized W is dequantized first: the result is in the scales' dtype, unquantized."""
    out_features, in_features = self.dense_shape[-2:]
    plain = Linear(
        in_features, out_features, self.weight.get_metadata().get("logical_axes") or (None, None),
        use_bias=self.bias is not None, rngs=None, dtype=self.dtype,
        param_dtype=_float_dtype(self),
    )
    weight, variable = self.weight.get_value(), self.weight
    if self.quantization is not None:
      weight = _dequantizer(self.quantization, jnp.dtype(plain.weight.dtype), weight.sharding)(
          weight, self.weight_scale.get_value())
      variable = nnx.Param(weight, **{k: v for k, v in self.weight.get_metadata().items()
                                      if k not in ("quantization", "dense_shape")})
    value = _merger(weight.sharding)(
        weight, self.lora_a.get_value(), self.lora_b.get_value(), scale=self.scale
    )
    plain.weight = variable.replace(value)
    plain.bias = self.bias
    return plain
