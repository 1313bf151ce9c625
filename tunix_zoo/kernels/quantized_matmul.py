"""Weight-only quantized ``x @ W.T`` for a few rows (a decode step), as one GPU kernel.

At batch 1 a decode step is a chain of matrix-vector products whose time is the bytes
of their weights. XLA reads int8 weights at about half the HBM bandwidth in these skinny
products and, for packed 4-bit weights, writes a dequantized bf16 copy first (it does
not fuse the nibble unpacking into the dot), so int4 decodes slower than bf16. This
Pallas (Triton) kernel reads the stored bytes once: one program per block of output
rows loops over the inputs a few whole groups at a time, unpacks the nibbles with ``&``
and ``>>`` in registers, multiplies them by the matching halves of ``x``, scales the
per-group partial sums and accumulates in float32.

The layouts are those of :mod:`tunix_zoo.layers.quantized`: ``values`` ``[out, in]``
(int8, float8_e4m3fn) or ``[out, in / 2]`` uint8 (int4 / nf4: within each group of
``G`` inputs the first half in the low nibbles, the second half in the high ones), and
``scales`` ``[out, in / G]``, where ``G == in`` means one scale per output channel.

:func:`takes` is how ``Quantization.matmul`` decides (the kernel as the policy's
``quantized_matmul`` setting says, XLA's path elsewhere) and :func:`per_device` how it
runs the kernel: per device under ``shard_map`` on a mesh, where every device's block of
the weight is a whole quantized weight of its own.

Example::

    if quantized_matmul.supports(x, values, scales, "int4", interpret=True):
      y = quantized_matmul.quantized_matmul(x, values, scales, "int4", interpret=True)
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from jax.sharding import AbstractMesh, Mesh, PartitionSpec

from tunix_zoo import sharding
from tunix_zoo.kernels.policy import runs_kernel

# The mesh axes of a quantized weight's values and scales: ((out, in), (out, groups)),
# each entry a PartitionSpec entry (the model's ``out_sharding`` metadata).
WeightAxes = tuple[tuple[Any, Any], tuple[Any, Any]]


KINDS = ("int8", "fp8", "int4", "nf4")
# Rows of ``x`` the kernel takes (every row re-reads the unpacked weight from registers;
# beyond this a matmul is XLA's, also when the kernel is forced: a prefill).
MAX_ROWS = 16
# The kinds "auto" gives the kernel. On the H200 (2026-12-02) XLA's own int8 product,
# which fuses the int8 -> bf16 conversion into its matmul, read its bytes faster than this
# kernel (12 Qwen3-8B layers at batch 1: 2.07 against 1.62 TB/s; Qwen3-8B decode 250
# against 203 tok/s); for 4-bit codes XLA writes a dequantized copy first and the kernel
# is 2.7x faster (1.03 against 0.39 TB/s; decode 246 against 105 tok/s). fp8 follows
# int8 (its XLA path was not measured against the kernel's 1.78 TB/s).
AUTO_KINDS = ("int4", "nf4")
# Inputs per step of the loop when one scale serves a whole output channel.
_CHANNEL_CHUNK = 256
_MMA_ROWS = 16  # Triton's dot: at least 16 rows


@dataclasses.dataclass(frozen=True)
class Blocks:
  """The kernel's tiling: ``block_out`` output rows per program, ``groups_per_step``
  groups of inputs per step of its loop, Triton's ``num_warps`` and ``num_stages``, and
  ``mma``: Triton dots (tensor cores) of the dequantized groups instead of vector
  multiply-adds."""

  block_out: int = 8
  groups_per_step: int = 8
  num_warps: int = 4
  num_stages: int = 3
  # Tensor-core products of the dequantized group (rows padded to 16) instead of
  # multiply-adds; worth it from about 8 rows, where the adds outrun the bytes.
  mma: bool = False


def default_blocks(kind: str, rows: int, out_features: int, group_bytes: int,
                   dtype: jnp.dtype = jnp.bfloat16) -> Blocks:
  """The tiling :func:`quantized_matmul` uses unless given one: 4 output rows and about
  8 KiB of stored bytes per program and step (many programs per SM); from 8 rows
  of 16-bit floats on, tensor-core dots (8 multiply-adds per weight would outrun the
  bytes)."""
  if rows >= 8 and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and out_features % 16 == 0:
    block_out = 16
    return Blocks(block_out=block_out, groups_per_step=max(1, 4096 // (block_out * group_bytes)),
                  num_warps=4, num_stages=3, mma=True)
  # 4 rows and ~8 KiB a step: the best or within 5% of the best tiling for every Qwen3-8B
  # product at batch 1 in the H200 sweep (quantized_matmul.py --sweep, 2026-12-02).
  groups = max(1, 8192 // (4 * group_bytes))
  return Blocks(block_out=4, groups_per_step=groups, num_warps=4, num_stages=3)


def _layout(values: jax.Array, scales: jax.Array, kind: str) -> tuple[int, int, bool]:
  """``(groups, bytes per group, per channel)``: the loop's view of ``values``."""
  out_features, stored = values.shape
  groups = scales.shape[1]
  if groups == 1 and kind not in ("int4", "nf4"):
    chunk = math.gcd(stored, _CHANNEL_CHUNK)
    return stored // chunk, chunk, True
  return groups, stored // groups, False


def why_unsupported(
    x: jax.Array,
    values: jax.Array,
    scales: jax.Array,
    kind: str,
    blocks: Blocks | None = None,
    *,
    mesh: Mesh | AbstractMesh | None = None,
    axes: WeightAxes | None = None,
    interpret: bool = False,
) -> str | None:
  """Why :func:`quantized_matmul` cannot serve ``x`` ``[..., in]`` against ``values``
  and ``scales`` of a ``kind`` weight (with ``blocks``, or the default tiling) on
  ``mesh`` (the weight's), where ``axes`` are the mesh axes of the values' and the
  scales' two dimensions; None when it can. ``interpret``: in Pallas's interpreter,
  which runs anywhere; the compiled kernel needs a GPU."""
  if kind not in KINDS:
    return f"quantization {kind!r} (the kernel serves {', '.join(KINDS)})"
  rows = math.prod(x.shape[:-1])
  if rows > MAX_ROWS:
    return f"{rows} rows (the kernel serves up to {MAX_ROWS}, a decode step)"
  if mesh is not None and mesh.size > 1:
    if axes is None:
      return (f"a weight on a mesh of {mesh.size} devices without its mesh axes (the "
              "kernel runs per device on the model's recorded out_sharding)")
    why_not = _why_not_split(values, scales, kind, mesh, axes)
    if why_not is not None:
      return why_not
    values, scales = (jax.ShapeDtypeStruct(_local(a.shape, spec, mesh), a.dtype)
                      for a, spec in zip((values, scales), axes))
  out_features = values.shape[0]
  groups, group_bytes, _ = _layout(values, scales, kind)
  if group_bytes < 16 or group_bytes & (group_bytes - 1):
    return (f"{group_bytes} stored bytes per group of inputs (Triton needs a power of two "
            "of at least 16)")
  blocks = blocks or default_blocks(kind, rows, out_features, group_bytes, x.dtype)
  if any(n < 1 or n & (n - 1) for n in (blocks.block_out, blocks.groups_per_step)):
    return f"{blocks} (Triton needs powers of two)"
  if blocks.mma and (blocks.block_out < 16 or x.dtype not in (jnp.bfloat16, jnp.float16)):
    return f"mma with block_out={blocks.block_out} and {x.dtype} inputs (Triton's dot "\
        "needs at least 16 outputs and 16-bit floats)"
  if out_features % blocks.block_out:
    return f"{out_features} outputs, not a multiple of block_out={blocks.block_out}"
  if groups % _groups_per_step(groups, blocks):
    return f"{groups} groups, not a multiple of groups_per_step={blocks.groups_per_step}"
  if kind == "fp8" and not interpret and not _has_fp8():
    return "float8 weights on a GPU without float8 (compute capability < 8.9)"
  if not interpret and jax.default_backend() != "gpu":
    return f"the {jax.default_backend()} backend (the compiled kernel needs a GPU)"
  return None


def _size(mesh: Mesh | AbstractMesh, entry: Any) -> int:
  return math.prod(mesh.shape[a] for a in sharding.mesh_axes(entry))


def _local(shape: tuple[int, ...], spec: Sequence[Any], mesh: Mesh | AbstractMesh):
  return tuple(n // _size(mesh, entry) for n, entry in zip(shape, spec))


def _why_not_split(values, scales, kind, mesh, axes) -> str | None:
  """Why the per-device blocks of ``values`` and ``scales`` (split by ``axes``) are not
  whole weights of their own; None when they are."""
  (out_axes, in_axes), (scale_out_axes, scale_in_axes) = axes
  named = {a for spec in axes for entry in spec for a in sharding.mesh_axes(entry)}
  if not named <= set(mesh.axis_names):
    # e.g. a model resharded onto another mesh than the one its metadata names.
    return f"mesh axes {axes} of which the mesh {tuple(mesh.axis_names)} lacks some"
  for array, spec in zip((values, scales), axes):
    if any(n % _size(mesh, entry) for n, entry in zip(array.shape, spec)):
      return f"a {array.shape} array not divisible by its mesh axes {spec}"
  per_channel = scales.shape[1] == 1 and kind not in ("int4", "nf4")
  if scale_out_axes != out_axes or (
      (scale_in_axes != in_axes) if not per_channel else _size(mesh, scale_in_axes) > 1):
    return (f"scales split over {axes[1]} but their values over {axes[0]} (each device needs "
            "the scales of its own block)")
  return None


def supports(
    x: jax.Array,
    values: jax.Array,
    scales: jax.Array,
    kind: str,
    blocks: Blocks | None = None,
    *,
    mesh: Mesh | AbstractMesh | None = None,
    axes: WeightAxes | None = None,
    interpret: bool = False,
) -> bool:
  """Whether :func:`quantized_matmul` serves these shapes (see :func:`why_unsupported`)."""
  return why_unsupported(x, values, scales, kind, blocks, mesh=mesh, axes=axes,
                         interpret=interpret) is None


def _has_fp8() -> bool:
  capability = getattr(jax.devices()[0], "compute_capability", None)
  return capability is not None and float(capability) >= 8.9


def _groups_per_step(groups: int, blocks: Blocks) -> int:
  """``blocks.groups_per_step``, no more than there are groups."""
  return min(blocks.groups_per_step, 1 << (groups.bit_length() - 1))


def takes(
    x: jax.Array,
    values: jax.Array,
    scales: jax.Array,
    kind: str,
    *,
    setting: str,
    mesh: Mesh | AbstractMesh | None = None,
    axes: WeightAxes | None = None,
) -> bool:
  """Whether the policy's ``setting`` runs :func:`quantized_matmul` for this call (with
  ``interpret=setting == "interpret"``); False where XLA's path should serve.

  Calls of more than :data:`MAX_ROWS` rows (a prefill, a training batch) are XLA's
  under every setting; for the others ``"auto"`` takes the kernel where it can run (on
  a GPU where it cannot it logs why, once) and a forced ``"pallas"`` / ``"interpret"``
  that cannot raises KernelError.
  """
  if setting == "xla" or math.prod(x.shape[:-1]) > MAX_ROWS:
    return False
  if setting == "auto" and kind not in AUTO_KINDS:
    return False
  why_not = why_unsupported(x, values, scales, kind, mesh=mesh, axes=axes,
                            interpret=setting == "interpret")
  return runs_kernel(
      "quantized_matmul", setting, why_not,
      fallback="Quantized Linear: the GEMV kernel cannot run for %s; XLA's product serves "
               "(slower in a decode step). KernelPolicy(quantized_matmul='xla') chooses it "
               "without this message.")


def per_device(
    x: jax.Array,
    values: jax.Array,
    scales: jax.Array,
    kind: str,
    levels: Sequence[float] | None = None,
    *,
    interpret: bool = False,
    mesh: Mesh | AbstractMesh | None = None,
    axes: WeightAxes | None = None,
) -> jax.Array:
  """:func:`quantized_matmul` on one device, or per device under ``shard_map`` on a mesh
  of several: each device multiplies its block of the weight (split by ``axes``) by the
  matching inputs; partial sums over split inputs are summed across devices."""
  kernel = functools.partial(quantized_matmul, kind=kind, levels=levels, interpret=interpret)
  if mesh is None or mesh.size == 1:
    return kernel(x, values, scales)
  (out_axes, in_axes), scale_axes = axes
  lead = (None,) * (x.ndim - 1)
  summed = sharding.mesh_axes(in_axes)

  def local(x, values, scales):
    y = kernel(x, values, scales)
    return jax.lax.psum(y, summed) if summed else y

  context = jax.sharding.get_abstract_mesh()
  return jax.shard_map(
      local,
      mesh=mesh if context.empty else context,
      in_specs=(PartitionSpec(*lead, in_axes), PartitionSpec(*axes[0]),
                PartitionSpec(*scale_axes)),
      out_specs=PartitionSpec(*lead, out_axes),
      check_vma=False,
  )(x, values, scales)


def _decode(codes: jax.Array, kind: str, levels: Sequence[float] | None) -> jax.Array:
  """4-bit codes (int32) -> float32 values: ``code - 8`` (int4) or the code's level (nf4,
  a tree of selects on the code's bits: Triton has no register gather)."""
  if kind == "int4":
    return (codes - 8).astype(jnp.float32)
  table = [jnp.float32(level) for level in levels]
  for bit in range(4):
    on = ((codes >> bit) & 1) != 0
    table = [jnp.where(on, high, low) for low, high in zip(table[::2], table[1::2])]
  return table[0]


def _kernel(*refs, kind, levels, rows, groups_per_step, per_channel, packed):
  """One block of output rows: ``rows`` dot products per row, over every group."""
  if packed:
    x_low_ref, x_high_ref, values_ref, scales_ref, out_ref = refs
  else:
    x_ref, values_ref, scales_ref, out_ref = refs
  block_out, groups, _ = values_ref.shape

  def step(i, accumulators):
    part = pl.ds(pl.multiple_of(i * groups_per_step, groups_per_step), groups_per_step)
    stored = values_ref[:, part, :]  # [block_out, groups_per_step, bytes per group]
    if packed:
      codes = stored.astype(jnp.int32)
      weights = (_decode(codes & 15, kind, levels), _decode(codes >> 4, kind, levels))
      inputs = (x_low_ref, x_high_ref)
    else:
      weights, inputs = (stored.astype(jnp.float32),), (x_ref,)
    scale = None if per_channel else scales_ref[:, part].astype(jnp.float32)
    updated = []
    for row, total in enumerate(accumulators):
      partial = sum(w * ref[row, part, :].astype(jnp.float32)[None] for w, ref in
                    zip(weights, inputs)).sum(axis=-1)  # [block_out, groups_per_step]
      updated.append(total + (partial.sum(axis=-1) if per_channel
                              else (partial * scale).sum(axis=-1)))
    return tuple(updated)

  init = tuple(jnp.zeros((block_out,), jnp.float32) for _ in range(rows))
  totals = jax.lax.fori_loop(0, groups // groups_per_step, step, init)
  for row, total in enumerate(totals):
    if per_channel:
      total = total * scales_ref[:, 0].astype(jnp.float32)
    out_ref[row, :] = total.astype(out_ref.dtype)


def _mma_kernel(*refs, kind, levels, groups_per_step, per_channel, packed):
  """One block of output rows as tensor-core dots: per group, ``x``'s (padded) rows
  times the dequantized group, scaled, accumulated in float32."""
  if packed:
    x_low_ref, x_high_ref, values_ref, scales_ref, out_ref = refs
    inputs = (x_low_ref, x_high_ref)
  else:
    x_ref, values_ref, scales_ref, out_ref = refs
    inputs = (x_ref,)
  block_out, groups, _ = values_ref.shape
  dtype = inputs[0].dtype

  def step(i, total):
    for j in range(groups_per_step):
      group = i * groups_per_step + j
      stored = values_ref[:, group, :]  # [block_out, bytes per group]
      if packed:
        codes = stored.astype(jnp.int32)
        weights = (_decode(codes & 15, kind, levels), _decode(codes >> 4, kind, levels))
      else:
        weights = (stored.astype(jnp.float32),)
      partial = sum(plgpu.dot(ref[:, group, :], w.astype(dtype), trans_b=True)
                    for w, ref in zip(weights, inputs))  # [rows, block_out] float32
      if not per_channel:
        partial = partial * scales_ref[:, group].astype(jnp.float32)[None, :]
      total = total + partial
    return total

  init = jnp.zeros((inputs[0].shape[0], block_out), jnp.float32)
  total = jax.lax.fori_loop(0, groups // groups_per_step, step, init)
  if per_channel:
    total = total * scales_ref[:, 0].astype(jnp.float32)[None, :]
  out_ref[...] = total.astype(out_ref.dtype)


def quantized_matmul(
    x: jax.Array,
    values: jax.Array,
    scales: jax.Array,
    kind: str,
    levels: Sequence[float] | None = None,
    *,
    blocks: Blocks | None = None,
    interpret: bool = False,
) -> jax.Array:
  """``x @ W.T`` for ``x`` ``[..., in]`` (at most :data:`MAX_ROWS` rows) and the
  ``kind`` weight ``W`` stored as ``values`` and ``scales`` (the layouts of
  :mod:`tunix_zoo.layers.quantized`); ``levels``: nf4's 16 levels, ascending. Returns
  ``[..., out]`` in ``x``'s dtype, accumulated in float32.

  ``blocks`` tunes the kernel (see :func:`default_blocks`); ``interpret`` runs it in
  Pallas's interpreter (any device, slowly).
  """
  *lead, in_features = x.shape
  rows = math.prod(lead)
  out_features = values.shape[0]
  packed = kind in ("int4", "nf4")
  groups, group_bytes, per_channel = _layout(values, scales, kind)
  blocks = blocks or default_blocks(kind, rows, out_features, group_bytes, x.dtype)
  groups_per_step = _groups_per_step(groups, blocks)
  values3 = values.reshape(out_features, groups, group_bytes)
  x2 = x.reshape(rows, in_features)
  if blocks.mma:  # Triton's dot takes at least 16 rows.
    x2 = jnp.pad(x2, ((0, _MMA_ROWS - rows), (0, 0)))
  block_rows = x2.shape[0]
  if packed:  # The inputs the low and the high nibbles of each group multiply.
    halves = x2.reshape(block_rows, groups, 2, group_bytes)
    inputs = (halves[:, :, 0], halves[:, :, 1])
  else:
    inputs = (x2.reshape(block_rows, groups, group_bytes),)
  common = dict(kind=kind, levels=None if levels is None else tuple(map(float, levels)),
                groups_per_step=groups_per_step, per_channel=per_channel, packed=packed)
  kernel = (functools.partial(_mma_kernel, **common) if blocks.mma
            else functools.partial(_kernel, rows=rows, **common))
  block_out = blocks.block_out
  out = pl.pallas_call(
      kernel,
      grid=(out_features // block_out,),
      in_specs=[pl.BlockSpec((block_rows, groups, group_bytes), lambda n: (0, 0, 0))]
      * len(inputs)
      + [pl.BlockSpec((block_out, groups, group_bytes), lambda n: (n, 0, 0)),
         pl.BlockSpec((block_out, scales.shape[1]), lambda n: (n, 0))],
      out_specs=pl.BlockSpec((block_rows, block_out), lambda n: (0, n)),
      out_shape=jax.ShapeDtypeStruct((block_rows, out_features), x.dtype),
      compiler_params=plgpu.CompilerParams(num_warps=blocks.num_warps,
                                           num_stages=blocks.num_stages),
      interpret=interpret,
      name=f"quantized_matmul_{kind}",
  )(*inputs, values3, scales)
  return out[:rows].reshape(*lead, out_features)
