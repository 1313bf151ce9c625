"""Weight-only quantization of :class:`~tunix_zoo.layers.basic.Linear` layers.

A quantized Linear keeps two parameters in place of its ``[out, in]`` weight, both
``nnx.Param`` with the weight's logical axes, so they shard together on a mesh:

* ``weight``: the quantized values, ``[out, in]`` int8 / float8_e4m3fn, or ``[out, in/2]``
  uint8 for int4 and nf4 (two 4-bit codes per byte: within each group of ``group_size``
  inputs, the first half in the low nibbles, the second half in the high ones);
* ``weight_scale``: ``[out, in / group_size]`` in the model's ``param_dtype``; one scale
  per output channel (int8 and fp8 by default) or per group of inputs (int4 and nf4).

Symmetric absmax quantization: ``w ≈ value * scale``; int4 stores ``value + 8``, nf4 the
index of the nearest of the 16 NormalFloat levels of QLoRA (Dettmers et al. 2023,
appendix E; the table qwix uses) with ``scale = absmax``. The matmul reads the quantized
values and dequantizes inside the jitted computation (XLA fuses it into the dot): with one
scale per output channel the scale multiplies the product instead of the weight.

The quantized values are frozen: only LoRA adapters (``nnx.LoRAParam``) train over them.

Example::

    scheme = Quantization.of("int4")                  # group_size 128
    values, scales = scheme.quantize(w, np)            # w: [out, in] float -> host arrays
    w_again = scheme.dequantize(values, scales, jnp.float32)
    quantize_linears(abstract_model, scheme)           # a shape-only model's Linears
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import AbstractMesh, Mesh

from tunix_zoo.errors import ConfigError
from tunix_zoo.kernels import quantized_matmul
from tunix_zoo.layers.basic import Linear

KINDS = ("int8", "int4", "nf4", "fp8")
DEFAULT_GROUP_SIZE = 128  # int4 / nf4
# Module paths (``re.fullmatch``) left in the compute dtype by default: the LM head, as
# bitsandbytes and torchao leave it, and MoE routers (tiny, and they pick the experts);
# embeddings, norms and stacked experts are not Linear layers.
DEFAULT_SKIP = r"lm_head|.*\.mlp\.gate"

# QLoRA's NormalFloat4 levels (arXiv 2305.14314, appendix E), ascending.
NF4_LEVELS = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], np.float32)
_NF4_MIDPOINTS = (NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2
FP8_MAX = 448.0  # float8_e4m3fn


@dataclasses.dataclass(frozen=True)
class Quantization:
  """How Linear weights are quantized: ``kind`` (int8, int4, nf4, fp8), ``group_size``
  inputs per scale (None: one scale per output channel; int4 / nf4 default to 128) and
  ``skip``, a regex of module paths kept in the compute dtype (default: the LM head and
  MoE routers; ``""`` quantizes every Linear).

  Example::

      AutoModel.from_pretrained(path, mesh, quantization=Quantization("int4", group_size=64))
  """

  kind: str
  group_size: int | None = None
  skip: str = DEFAULT_SKIP

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ConfigError(
          f"quantization {self.kind!r} is not supported; use one of {', '.join(KINDS)} "
          "(or None for the checkpoint's dtype).")
    if self.group_size is None and self.packed:
      object.__setattr__(self, "group_size", DEFAULT_GROUP_SIZE)
    size = self.group_size
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 2
                             or size % 2):
      raise ConfigError(f"quantization group_size must be an even integer >= 2 (e.g. 64 or "
                        f"128), or None for one scale per output channel; got {size!r}.")
    try:
      re.compile(self.skip)
    except (re.error, TypeError) as e:
      raise ConfigError(f"quantization skip={self.skip!r} is not a regular expression: {e}.")

  @classmethod
  def of(cls, value: "str | Quantization | None") -> "Quantization | None":
    """``"int8"`` / a Quantization / None (no quantization) -> a Quantization or None."""
    if value is None or isinstance(value, Quantization):
      return value
    if isinstance(value, str):
      return cls(value.lower())
    raise ConfigError(f"quantization must be one of {', '.join(KINDS)}, a Quantization or "
                      f"None; got {value!r}.")

  @property
  def packed(self) -> bool:
    """Two 4-bit codes per stored byte."""
    return self.kind in ("int4", "nf4")

  @property
  def storage_dtype(self) -> np.dtype:
    return np.dtype({"int8": np.int8, "fp8": jnp.float8_e4m3fn}.get(self.kind, np.uint8))

  def group(self, in_features: int) -> int:
    """The inputs sharing one scale in a layer with ``in_features`` inputs."""
    return self.group_size or in_features

  def skips(self, path: str) -> bool:
    return bool(self.skip) and re.fullmatch(self.skip, path) is not None

  def check_layer(self, path: str, in_features: int) -> None:
    """Raises ConfigError when ``group_size`` does not divide the layer's inputs."""
    if in_features % self.group(in_features):
      raise ConfigError(
          f"{path} has {in_features} inputs, not a multiple of quantization group_size "
          f"{self.group_size}: pass Quantization({self.kind!r}, group_size=G) with a G "
          f"dividing every Linear's inputs, or "
          f"skip={(self.skip + '|' if self.skip else '') + re.escape(path)!r}.")

  def shapes(self, out_features: int, in_features: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """``(values shape, scales shape)`` of an ``[out, in]`` weight."""
    stored = in_features // 2 if self.packed else in_features
    return (out_features, stored), (out_features, in_features // self.group(in_features))

  def check_platform(self, devices: list[Any]) -> None:
    """fp8 needs float8 matmuls, which Hopper (compute capability 8.9+) GPUs have."""
    if self.kind != "fp8":
      return
    for device in devices:
      capability = getattr(device, "compute_capability", None)
      if device.platform != "gpu" or capability is None or float(capability) < 8.9:
        raise ConfigError(
            f"quantization 'fp8' needs a GPU with float8 support (Hopper / Ada, compute "
            f"capability 8.9+); {device.device_kind} ({device.platform}) has none. Use "
            "'int8' instead.")

  # -- numerics: ``xp`` is numpy (the loader, on host slices) or jax.numpy (random init) ---
  def quantize(self, weight: Any, xp: Any = np, scale_dtype: Any = jnp.bfloat16) -> tuple[Any, Any]:
    """``[out, in]`` float weight -> ``(values, scales)`` as :meth:`shapes` lays them out.

    Scales are rounded to ``scale_dtype`` before the values are computed from them, so
    ``dequantize`` reproduces exactly what was rounded.
    """
    out_features, in_features = weight.shape
    size = self.group(in_features)
    w = weight.astype(np.float32).reshape(out_features, in_features // size, size)
    absmax = xp.max(xp.abs(w), axis=-1)
    bound = {"int8": 127.0, "int4": 7.0, "nf4": 1.0, "fp8": FP8_MAX}[self.kind]
    scale = xp.where(absmax > 0, absmax / bound, 1.0).astype(scale_dtype)
    x = w / scale.astype(np.float32)[..., None]
    if self.kind == "int8":
      values = xp.clip(xp.round(x), -127, 127).astype(np.int8)
    elif self.kind == "fp8":
      values = xp.clip(x, -FP8_MAX, FP8_MAX).astype(jnp.float8_e4m3fn)
    else:
      if self.kind == "int4":
        codes = (xp.clip(xp.round(x), -8, 7) + 8).astype(np.uint8)
      else:
        codes = xp.searchsorted(xp.asarray(_NF4_MIDPOINTS), x).astype(np.uint8)
      low, high = codes[..., : size // 2], codes[..., size // 2:]
      values = low | (high << 4)
    return values.reshape(self.shapes(out_features, in_features)[0]), scale

  def dequantize(self, values: jax.Array, scales: jax.Array, dtype: Any) -> jax.Array:
    """The ``[out, in]`` weight in ``dtype`` (traced: XLA fuses it into its consumer)."""
    out_features, groups = scales.shape
    v = values.reshape(out_features, groups, -1)
    if self.packed:
      codes = jnp.concatenate([v & 15, v >> 4], axis=-1)
      if self.kind == "int4":
        v = codes.astype(dtype) - 8
      else:
        v = jnp.take(jnp.asarray(NF4_LEVELS, dtype), codes.astype(jnp.int32))
    return (v.astype(dtype) * scales.astype(dtype)[..., None]).reshape(out_features, -1)

  def matmul(self, x: jax.Array, values: jax.Array, scales: jax.Array, dtype: Any,
             kernel: str = "xla", mesh: Mesh | AbstractMesh | None = None,
             axes: quantized_matmul.WeightAxes | None = None) -> jax.Array:
    """``x @ W.T`` for the quantized ``W``; with one scale per output channel (and
    unpacked values) the scale multiplies the product, so the dot reads the stored bytes.

    ``kernel``: the ``KernelPolicy.quantized_matmul`` setting for the weight on ``mesh``
    (``axes``: the mesh axes of the values' and the scales' dimensions); where it runs the
    GEMV kernel (:mod:`tunix_zoo.kernels.quantized_matmul`: a decode step's few rows) the
    gradient with respect to ``x`` is XLA's.
    """
    x = x.astype(dtype)
    levels = tuple(NF4_LEVELS.tolist()) if self.kind == "nf4" else None
    if quantized_matmul.takes(x, values, scales, self.kind, setting=kernel, mesh=mesh,
                              axes=axes):
      placement = (mesh, axes) if mesh is not None and mesh.size > 1 else (None, None)
      return _kernel_product(self, levels, kernel == "interpret", placement, x, values, scales)
    return self._xla_matmul(x, values, scales, dtype)

  def _xla_matmul(self, x: jax.Array, values: jax.Array, scales: jax.Array,
                  dtype: Any) -> jax.Array:
    def product(x, values, scales):
      if scales.shape[1] == 1 and not self.packed:
        y = jnp.einsum("...i,oi->...o", x, values.astype(dtype))
        return y * scales[:, 0].astype(dtype)
      return jnp.einsum("...i,oi->...o", x, self.dequantize(values, scales, dtype))

    if not isinstance(x, jax.core.Tracer):
      return product(x, values, scales)  # eager: nothing to differentiate
    # Rematerialised: the backward pass (QLoRA) recomputes the float weight rather than
    # keeping a float copy of every layer's weight alive until it runs.
    return jax.checkpoint(product, prevent_cse=False)(x, values, scales)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _kernel_product(scheme: Quantization, levels, interpret: bool, placement, x, values,
                    scales):
  """The GEMV kernel's ``x @ W.T`` (per device on ``placement``'s ``(mesh, axes)``); its
  backward is XLA's (the values are frozen, so only ``x`` gets a gradient), which
  recomputes the float weight as the XLA path does."""
  mesh, axes = placement
  return quantized_matmul.per_device(x, values, scales, scheme.kind, levels,
                                     interpret=interpret, mesh=mesh, axes=axes)


def _kernel_product_forward(scheme, levels, interpret, placement, x, values, scales):
  y = _kernel_product(scheme, levels, interpret, placement, x, values, scales)
  return y, (values, scales)


def _kernel_product_backward(scheme, levels, interpret, placement, residuals, grad):
  values, scales = residuals
  weight = scheme.dequantize(values, scales, grad.dtype)
  grad_x = jnp.einsum("...o,oi->...i", grad, weight)
  return (grad_x, np.zeros(values.shape, jax.dtypes.float0) if not jnp.issubdtype(
      values.dtype, jnp.floating) else jnp.zeros_like(values), jnp.zeros_like(scales))


_kernel_product.defvjp(_kernel_product_forward, _kernel_product_backward)


def is_quantized_weight(var: nnx.Variable) -> bool:
  """Whether ``var`` holds a quantized Linear's values (its scales travel with it).

  Example::

      is_quantized_weight(model.layers[0].mlp.up_proj.weight)   # True once quantized
  """
  return var.get_metadata().get("quantization") is not None


def is_quantization_scale(var: nnx.Variable) -> bool:
  """Whether ``var`` is a quantized Linear's ``weight_scale``.

  Example::

      is_quantization_scale(model.layers[0].mlp.up_proj.weight_scale)   # True
  """
  return bool(var.get_metadata().get("quantization_scale"))


def dense_shape(var: nnx.Variable) -> tuple[int, ...]:
  """The shape of the float weight a (quantized) weight variable stands for.

  Example::

      dense_shape(int4_linear.weight)   # (out, in), while its values are (out, in / 2)
  """
  return tuple(var.get_metadata().get("dense_shape") or var.shape)


def quantize_linears(model: nnx.Module, quantization: Quantization,
                     scale_dtype: Any = jnp.bfloat16) -> nnx.Module:
  """Turns a shape-only model's Linear layers (but those ``quantization.skip`` names)
  into quantized ones, in place: ``weight`` becomes the values and ``weight_scale`` is
  added, both with the weight's logical axes. Returns the model.

  Raises ConfigError when a group size does not divide a layer's inputs.

  Example::

      model = quantize_linears(abstract_model(config, param_dtype=jnp.bfloat16),
                               Quantization.of("int8"))
  """
  linears = [(".".join(str(p) for p in path), module)
             for path, module in nnx.iter_modules(model) if isinstance(module, Linear)]
  for path, linear in linears:
    if quantization.skips(path):
      continue
    out_features, in_features = linear.weight.shape
    quantization.check_layer(path, in_features)
    axes = linear.weight.get_metadata().get("logical_axes") or (None, None)
    values_shape, scales_shape = quantization.shapes(out_features, in_features)
    linear.weight = nnx.Param(
        jax.ShapeDtypeStruct(values_shape, quantization.storage_dtype), logical_axes=axes,
        quantization=quantization, dense_shape=(out_features, in_features),
    )
    # One scale per output channel: its unit inputs axis is not sharded.
    scale_axes = axes if scales_shape[1] > 1 else (axes[0], None)
    linear.weight_scale = nnx.Param(
        jax.ShapeDtypeStruct(scales_shape, jnp.dtype(scale_dtype)), logical_axes=scale_axes,
        quantization_scale=True,
    )
    linear.quantization = quantization
  return model
