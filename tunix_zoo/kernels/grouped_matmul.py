"""The mixture-of-experts grouped matmul as Mosaic GPU kernels (Hopper), forward and
gradients, run per device under ``shard_map`` on a mesh.

XLA lowers ``jax.lax.ragged_dot`` on CPU and (jax 0.11) on GPU as a masked dense product
over all experts, ``[rows, experts, in]`` (64 GiB for one 30B-A3B layer at 16k tokens);
the kernels of ``jax.experimental.pallas.ops.gpu`` multiply each group by its expert
only. They are custom calls the SPMD partitioner cannot split, so on a mesh
:func:`experts` runs the whole expert computation per device: tokens split as the batch
is, each expert's width (``expert_mlp``) over its mesh axes, all experts on every
device, the partial outputs summed over the width's axes.

Example::

    out = grouped_matmul.experts(experts_ragged, x, weights, chosen, gate, up, down,
                                 setting="auto", mesh=mesh)
    if out is None:  # Not a Hopper GPU, or shapes the kernels do not tile.
      out = experts_ragged(x, weights, chosen, gate, up, down)
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh, Mesh, PartitionSpec

from tunix_zoo import sharding
from tunix_zoo.kernels.policy import runs_kernel


# Mosaic GPU tile sizes (block_m, block_n, block_k, max_concurrent_steps): the fastest of
# a sweep on an H100 at 30B-A3B shapes (413 TFLOP/s forward, 449 for the weights' gradient).
_TILES = (128, 128, 64, 6)
_TRANSPOSED_TILES = (128, 128, 64, 4)
TILE = 128

ExpertsFn = Callable[..., jax.Array]


def why_unsupported(
    dtype: Any, weight_shape: tuple[int, ...], device: jax.Device | None = None
) -> str | None:
  """Why :func:`grouped_matmul` cannot multiply by expert matrices of ``weight_shape``
  ``[experts, out, in]`` (one device's share) in ``dtype`` on ``device`` (default: the
  first device); None when it can."""
  if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    return f"{jnp.dtype(dtype).name} experts (the kernels take 16-bit floats)"
  if any(d % TILE for d in weight_shape[1:]):
    return f"expert matrices of {tuple(weight_shape[1:])} per device (not tiling by {TILE})"
  device = device or jax.devices()[0]
  capability = getattr(device, "compute_capability", None)
  if device.platform != "gpu" or capability != "9.0":
    kind = f"{device.platform} device {device.device_kind!r}"
    return f"a {kind} (the kernels need a Hopper GPU, compute capability 9.0)"
  return None


def supports(dtype: Any, weight_shape: tuple[int, ...], device: jax.Device | None = None) -> bool:
  """Whether :func:`grouped_matmul` serves these experts (see :func:`why_unsupported`)."""
  return why_unsupported(dtype, weight_shape, device) is None


def _ragged_dot(lhs, rhs, group_sizes, transpose_rhs: bool):
  from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu

  block_m, block_n, block_k, steps = _TILES
  n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  # Output tiles are walked in bands of grid_block_n columns: the widest band dividing n.
  band = next(b for b in (4, 2, 1) if (n // block_n) % b == 0)
  return ragged_dot_mgpu.ragged_dot(
      lhs, rhs, group_sizes=group_sizes, block_m=block_m, block_n=block_n, block_k=block_k,
      max_concurrent_steps=steps, grid_block_n=band, transpose_rhs=transpose_rhs,
  )


@jax.custom_vjp
def grouped_matmul(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array) -> jax.Array:
  """``lhs`` ``[rows, in]`` sorted into consecutive groups, times its group's ``rhs[g]``
  ``[out, in]``; ``group_sizes`` int32 ``[groups]``. Returns ``[rows, out]``: what
  ``tunix_zoo.layers.moe.grouped_matmul`` computes, in Mosaic GPU kernels."""
  return _ragged_dot(lhs, rhs, group_sizes, transpose_rhs=True)


def _grouped_matmul_fwd(lhs, rhs, group_sizes):
  return grouped_matmul(lhs, rhs, group_sizes), (lhs, rhs, group_sizes)


def _grouped_matmul_bwd(residuals, grad):
  from jax.experimental.pallas.ops.gpu import transposed_ragged_dot_mgpu

  lhs, rhs, group_sizes = residuals
  # d lhs = grad [rows, out] times each group's rhs [out, in].
  d_lhs = _ragged_dot(grad.astype(lhs.dtype), rhs, group_sizes, transpose_rhs=False)
  # d rhs[g] = grad[rows of g].T @ lhs[rows of g]: contraction over the ragged rows.
  block_m, block_n, block_k, steps = _TRANSPOSED_TILES
  d_rhs = transposed_ragged_dot_mgpu.transposed_ragged_dot(
      grad.astype(lhs.dtype), lhs, group_sizes=group_sizes, block_m=block_m, block_n=block_n,
      block_k=block_k, max_concurrent_steps=steps, grid_block_n=1,
  )
  return d_lhs, d_rhs, None


grouped_matmul.defvjp(_grouped_matmul_fwd, _grouped_matmul_bwd)


def _width_axes(gate_proj: jax.Array, mesh, rules) -> tuple[str, ...]:
  """The mesh axes each expert's width (``expert_mlp``) is split over."""
  spec = sharding.partition_spec((None, "expert_mlp", None), gate_proj.shape, mesh, rules)
  return sharding.mesh_axes(spec[1])


def experts(
    experts_fn: ExpertsFn,
    x: jax.Array,
    weights: jax.Array,
    chosen: jax.Array,
    gate_proj: jax.Array,
    up_proj: jax.Array,
    down_proj: jax.Array,
    *,
    setting: str,
    mesh: Mesh | AbstractMesh | None,
    rules: sharding.Rules | None = None,
) -> jax.Array | None:
  """``experts_fn(x, weights, chosen, gate_proj, up_proj, down_proj, matmul=...)`` with
  :func:`grouped_matmul` (:func:`per_device` on a mesh); None where the policy's
  ``setting`` leaves the experts to XLA's ``ragged_dot``.

  ``x`` ``[tokens, embed]``, ``weights``/``chosen`` ``[tokens, k]``; the expert stacks as
  ``tunix_zoo.layers.moe.Experts`` holds them. ``"auto"`` on a GPU where the kernels
  cannot run logs why, once; a forced ``"mosaic_gpu"`` raises KernelError.
  """
  if setting == "xla":
    return None
  experts_count, width, hidden = gate_proj.shape
  if mesh is not None and mesh.size > 1:
    width //= math.prod(mesh.shape[a] for a in _width_axes(gate_proj, mesh, rules))
  why_not = why_unsupported(x.dtype, (experts_count, width, hidden))
  if not runs_kernel(
      "moe", setting, why_not,
      fallback="MoE experts: the Mosaic GPU grouped matmul cannot run for %s; XLA's "
               "ragged_dot serves, as a dense masked product over all experts (memory grows "
               "with tokens x experts). KernelPolicy(moe='xla') chooses it without this "
               "message."):
    return None
  return per_device(experts_fn, grouped_matmul, x, weights, chosen, gate_proj, up_proj,
                    down_proj, mesh=mesh, rules=rules)


def per_device(
    experts_fn: ExpertsFn,
    matmul: Callable[[jax.Array, jax.Array, jax.Array], jax.Array],
    x: jax.Array,
    weights: jax.Array,
    chosen: jax.Array,
    gate_proj: jax.Array,
    up_proj: jax.Array,
    down_proj: jax.Array,
    *,
    mesh: Mesh | AbstractMesh | None,
    rules: sharding.Rules | None = None,
) -> jax.Array:
  """``experts_fn(..., matmul=matmul)`` on each device's share under ``shard_map``: the
  tokens split as the batch is, each expert's width over the ``expert_mlp`` axes (all
  experts on every device), the outputs summed over those axes. Off a mesh, or on one
  device, a plain call.
  """
  args = (x, weights, chosen, gate_proj, up_proj, down_proj)
  if mesh is None or mesh.size == 1:
    return experts_fn(*args, matmul=matmul)
  width_axes = _width_axes(gate_proj, mesh, rules)
  # Tokens split as the batch is, but not over an axis the width already takes.
  batch = sharding.partition_spec(("batch", None), x.shape, mesh, rules)[0]
  token_axes = tuple(a for a in sharding.mesh_axes(batch) if a not in width_axes)
  tokens_spec = PartitionSpec(token_axes or None, None)

  def shard(x, weights, chosen, gate_proj, up_proj, down_proj):
    out = experts_fn(x, weights, chosen, gate_proj, up_proj, down_proj, matmul=matmul)
    # Each device holds a slice of every expert's width: its outputs are partial sums.
    return jax.lax.psum(out, width_axes) if width_axes else out

  width = width_axes or None
  context = jax.sharding.get_abstract_mesh()
  return jax.shard_map(
      shard,
      mesh=mesh if context.empty else context,
      in_specs=(tokens_spec, tokens_spec, tokens_spec, PartitionSpec(None, width, None),
                PartitionSpec(None, width, None), PartitionSpec(None, None, width)),
      out_specs=tokens_spec,
      check_vma=False,
  )(*args)
