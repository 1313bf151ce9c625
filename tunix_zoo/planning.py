"""Sizes computed from shapes alone: parameter counts and bytes per device on a mesh.

Nothing is allocated: the model is built with ``nnx.eval_shape`` and the mesh may be an
``AbstractMesh``, so a 405B plan on a 1x8 mesh runs on a laptop.

Example::

    plan = plan_model(registry.get_config("qwen3_8b"), mesh_shape=(1, 8), dtype="bfloat16")
    plan.parameters, plan.bytes_per_device
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import AbstractMesh, AxisType, PartitionSpec

from tunix_zoo import registry, sharding
from tunix_zoo.checkpoint.loader import axis_counts, module_path
from tunix_zoo.config import DecoderConfig
from tunix_zoo.errors import ShardingError

MESH_AXES = ("fsdp", "tp")


@dataclasses.dataclass(frozen=True)
class ModelPlan:
  """What a model weighs, in total and on each device of a mesh."""

  config: DecoderConfig
  parameters: int
  active_parameters: int  # per token; below ``parameters`` for mixtures of experts
  dtype: str
  bytes_total: int
  mesh_shape: tuple[int, ...]
  bytes_per_device: int
  replicated: tuple[str, ...]  # parameters that no mesh axis shards


def abstract_model(config: DecoderConfig, param_dtype: Any = jnp.float32, **kwargs: Any):
  """The family's model for ``config`` with shape-only parameters (nothing allocated)."""
  spec = registry.family_for_config_class(type(config))
  return spec.model_class(config, rngs=None, param_dtype=param_dtype, **kwargs)


def count_parameters(config: DecoderConfig) -> int:
  """The number of parameters of ``config``'s model, from shapes alone."""
  abstract = abstract_model(config)
  return sum(math.prod(v.shape) for _, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param)))


def count_active_parameters(config: DecoderConfig) -> int:
  """Parameters one token uses: expert stacks (leading ``experts`` axis) count only the
  ``num_experts_per_tok`` of ``num_experts`` experts a token is routed to."""
  total = 0
  for _, var in nnx.to_flat_state(nnx.state(abstract_model(config), nnx.Param)):
    size = math.prod(var.shape)
    if (var.get_metadata().get("logical_axes") or (None,))[0] == "experts":
      size = size * config.num_experts_per_tok // config.num_experts
    total += size
  return total


def parse_mesh(text: str) -> tuple[int, int]:
  """``"2x4"`` -> ``(2, 4)`` (fsdp x tp)."""
  try:
    fsdp, tp = (int(p) for p in text.lower().split("x"))
    if fsdp < 1 or tp < 1:
      raise ValueError
  except ValueError:
    raise ShardingError(f"Mesh {text!r} is not FSDPxTP with positive sizes, e.g. 1x8.") from None
  return fsdp, tp


def shard_shape(shape: tuple[int, ...], spec: PartitionSpec, mesh: AbstractMesh) -> tuple[int, ...]:
  out = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = () if axes is None else ((axes,) if isinstance(axes, str) else axes)
    out.append(dim // math.prod(mesh.shape[a] for a in names))
  return tuple(out)


def plan_model(
    config: DecoderConfig,
    mesh_shape: tuple[int, int] = (1, 1),
    dtype: Any = "bfloat16",
    rules: sharding.Rules | None = None,
) -> ModelPlan:
  """Parameter count and per-device bytes of ``config`` on an ``fsdp x tp`` mesh."""
  np_dtype = np.dtype(jnp.dtype(dtype))
  mesh = AbstractMesh(mesh_shape, MESH_AXES, axis_types=(AxisType.Auto,) * 2)
  abstract = abstract_model(config, param_dtype=np_dtype)
  counts = axis_counts(config)
  parameters = per_device = 0
  replicated = []
  for path, var in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
    axes = var.get_metadata().get("logical_axes") or (None,) * len(var.shape)
    spec = sharding.partition_spec(axes, var.shape, mesh, rules, counts, what=module_path(path))
    parameters += math.prod(var.shape)
    per_device += math.prod(shard_shape(tuple(var.shape), spec, mesh)) * np_dtype.itemsize
    if all(a is None for a in spec) and math.prod(mesh_shape) > 1:
      replicated.append(module_path(path))
  return ModelPlan(
      config=config, parameters=parameters, active_parameters=count_active_parameters(config),
      dtype=np_dtype.name,
      bytes_total=parameters * np_dtype.itemsize, mesh_shape=tuple(mesh_shape),
      bytes_per_device=per_device, replicated=tuple(replicated),
  )
