"""Sizes computed from shapes alone: parameter counts and bytes per device on a mesh.

Nothing is allocated: the model is built with ``nnx.eval_shape`` and the mesh may be an
``AbstractMesh``, so a 405B plan on a 1x8 mesh runs on a laptop. :func:`plan_training`
adds what a training step holds: LoRA adapters, AdamW moments, gradients and activations.

Example::

    plan = plan_model(registry.get_config("qwen3_8b"), mesh_shape=(1, 8), dtype="bfloat16")
    plan.parameters, plan.bytes_per_device
    step = plan_training(registry.get_config("qwen3_8b"), (1, 4), batch_size=8, seq_len=2048,
                         remat="layer", lora_rank=32)
    step.total_bytes, step.activation_bytes
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.extend import core as jax_core
from jax.sharding import AbstractMesh, AxisType, PartitionSpec

from tunix_zoo import sharding
from tunix_zoo.build import abstract_model, axis_counts, module_path
from tunix_zoo.config import DecoderConfig, count_parameters
from tunix_zoo.errors import ConfigError, LoraError, ShardingError
from tunix_zoo.layers import quantized

MESH_AXES = ("fsdp", "tp")


@dataclasses.dataclass(frozen=True)
class ModelPlan:
  """What a model weighs, in total and on each device of a mesh."""

  config: DecoderConfig
  parameters: int
  active_parameters: int  # per token; below ``parameters`` for mixtures of experts
  dtype: str  # of the unquantized parameters (and of the quantization scales)
  bytes_total: int
  mesh_shape: tuple[int, ...]
  bytes_per_device: int
  replicated: tuple[str, ...]  # parameters that no mesh axis shards
  quantization: str | None = None  # the Linear weights' kind (values + scales counted)


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
    quantization: quantized.Quantization | str | None = None,
) -> ModelPlan:
  """Parameter count and per-device bytes of ``config`` on an ``fsdp x tp`` mesh; with
  ``quantization`` the Linear weights count their quantized values plus their scales.

  Example::

      plan_model(registry.get_config("llama3p1_70b"), (1, 1), quantization="int4")
  """
  np_dtype = np.dtype(jnp.dtype(dtype))
  quantization = quantized.Quantization.of(quantization)
  mesh = AbstractMesh(mesh_shape, MESH_AXES, axis_types=(AxisType.Auto,) * 2)
  abstract = abstract_model(config, param_dtype=np_dtype, quantization=quantization)
  counts = axis_counts(config)
  parameters = per_device = total = 0
  replicated = []
  for path, var in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
    axes = var.get_metadata().get("logical_axes") or (None,) * len(var.shape)
    spec = sharding.partition_spec(axes, var.shape, mesh, rules, counts, what=module_path(path))
    itemsize = np.dtype(var.dtype).itemsize
    if not quantized.is_quantization_scale(var):
      parameters += math.prod(quantized.dense_shape(var))
    total += math.prod(var.shape) * itemsize
    per_device += math.prod(shard_shape(tuple(var.shape), spec, mesh)) * itemsize
    if all(a is None for a in spec) and math.prod(mesh_shape) > 1:
      replicated.append(module_path(path))
  return ModelPlan(
      config=config, parameters=parameters, active_parameters=count_parameters(config, active=True),
      dtype=np_dtype.name,
      bytes_total=total, mesh_shape=tuple(mesh_shape),
      bytes_per_device=per_device, replicated=tuple(replicated),
      quantization=quantization.kind if quantization is not None else None,
  )


# Autodiff saves more residuals than XLA keeps after fusion (it recomputes cheap elementwise
# results in the backward pass instead). Fitted to compiled train steps of small models
# (XLA:CPU with its memory-minimising scheduler, float32, tests/train_memory_worker.py;
# within about 10% across layers, widths, vocabularies, batch and sequence lengths): the
# share of the traced residuals a step keeps alive...
SAVED_RESIDUAL_FRACTION = 0.59
# ...and, with remat, the share of one layer's residuals alive while it is recomputed.
RECOMPUTED_LAYER_FRACTION = 0.82


@dataclasses.dataclass(frozen=True)
class TrainingPlan:
  """Estimated bytes per device of one training step (AdamW), from shapes alone.

  ``weight_bytes`` is what :class:`ModelPlan` counts; ``adapter_bytes`` the LoRA
  parameters; ``optimizer_bytes`` AdamW's two moments of the trained parameters (adapters
  with LoRA, all weights without); ``activation_bytes`` what the backward pass keeps (or,
  with remat, recomputes) on one device. Gradients add little: in a jitted step each one
  is consumed by its parameter's update as soon as it is computed.
  """

  model: ModelPlan
  batch_size: int
  seq_len: int
  remat: str
  lora_rank: int | None
  trained_parameters: int
  weight_bytes: int
  adapter_bytes: int
  optimizer_bytes: int
  activation_bytes: int

  @property
  def total_bytes(self) -> int:
    return self.weight_bytes + self.adapter_bytes + self.optimizer_bytes + self.activation_bytes


def plan_training(
    config: DecoderConfig,
    mesh_shape: tuple[int, int] = (1, 1),
    dtype: Any = "bfloat16",
    *,
    batch_size: int,
    seq_len: int,
    remat: str = "none",
    lora_rank: int | None = None,
    lora_module_path: str | None = None,
    compute_dtype: Any = None,
    rules: sharding.Rules | None = None,
    quantization: quantized.Quantization | str | None = None,
) -> TrainingPlan:
  """Per-device memory of a training step of ``config`` on an ``fsdp x tp`` mesh.

  Activations come from tracing (not running) the loss's backward pass on the part of the
  model one device computes: the batch split over the mesh axes ``batch`` maps to, heads,
  MLP and vocabulary over those their logical axes map to. The residuals autodiff saves
  there are scaled by :data:`SAVED_RESIDUAL_FRACTION` for what XLA keeps after fusion;
  with ``remat``, one layer's recomputed residuals are added. It is an estimate: XLA's
  fusion and scheduling differ between backends and versions. Attention is traced as it
  runs where the plan is made (on CPU the XLA path, which keeps ``[B, heads, T, T]``
  scores; GPU flash attention keeps none). Seen on XLA:CPU: with tp > 1 and remat,
  compiled steps keep up to twice the estimate, since that compiler starts the
  recomputation early.

  Args:
    config: the model's config.
    mesh_shape: ``(fsdp, tp)``.
    dtype: the parameters' dtype (``compute_dtype`` defaults to it).
    batch_size: global batch (rows of ``seq_len`` tokens).
    seq_len: tokens per row.
    remat: ``"none"``, ``"layer"`` or ``"attention"`` (see :class:`DecoderLM`).
    lora_rank: train LoRA adapters of this rank on ``lora_module_path`` (default: every
      attention and MLP projection) instead of every weight.
    rules: sharding rules (default :data:`tunix_zoo.sharding.DEFAULT_RULES`).
    quantization: frozen quantized Linear weights (QLoRA; needs ``lora_rank``), counted
      as :func:`plan_model` counts them.

  Example::

      plan = plan_training(registry.get_config("qwen3_8b"), (1, 4), batch_size=8,
                           seq_len=2048, remat="layer", lora_rank=32)
      print(plan.total_bytes / 2**30, "GiB per device")
  """
  from tunix_zoo.layers.decoder import check_remat
  from tunix_zoo.lora import DEFAULT_MODULE_PATH, apply_lora

  check_remat(remat)
  np_dtype = np.dtype(jnp.dtype(dtype))
  compute = np.dtype(jnp.dtype(compute_dtype or dtype))
  module_path = lora_module_path or DEFAULT_MODULE_PATH
  quantization = quantized.Quantization.of(quantization)
  if quantization is not None and not lora_rank:
    raise ConfigError(
        f"{quantization.kind}-quantized weights are frozen: only LoRA adapters train over "
        "them (QLoRA). Pass lora_rank (CLI: --lora-rank), or drop the quantization.")
  mesh = AbstractMesh(mesh_shape, MESH_AXES, axis_types=(AxisType.Auto,) * 2)
  model_plan = plan_model(config, mesh_shape, np_dtype, rules, quantization)

  def lora(model: nnx.Module, whole_model: bool = True) -> nnx.Module:
    if lora_rank:
      try:
        apply_lora(model, rank=lora_rank, alpha=float(lora_rank), module_path=module_path)
      except LoraError:
        # The whole model was checked first: a slice of it may hold no adapted layer.
        if whole_model:
          raise
    return model

  abstract = lora(abstract_model(config, param_dtype=np_dtype, quantization=quantization))
  trained_filter = nnx.LoRAParam if lora_rank else nnx.Param
  counts = axis_counts(config)
  adapter_bytes = _bytes_per_device(nnx.state(abstract, nnx.LoRAParam), mesh, rules, counts)
  trained_bytes = _bytes_per_device(nnx.state(abstract, trained_filter), mesh, rules, counts)
  trained = sum(math.prod(v.shape) for v in jax.tree.leaves(nnx.state(abstract, trained_filter)))

  local, local_batch = _device_share(config, batch_size, mesh, rules)

  def residuals(num_layers: int, mode: str) -> int:
    layers = local.replace(
        num_layers=num_layers, layer_types=local.layer_types[:num_layers],
        mlp_only_layers=tuple(i for i in local.mlp_only_layers if i < num_layers),
    )
    model = abstract_model(layers, param_dtype=np_dtype, dtype=compute, remat=mode,
                           quantization=quantization)
    lora(model, whole_model=False)
    return _saved_residual_bytes(model, local_batch, seq_len)

  outside_layers = residuals(0, "none")
  per_layer = residuals(1, remat) - outside_layers
  saved = outside_layers + config.num_layers * per_layer
  recomputed = 0 if remat == "none" else residuals(1, "none") - outside_layers
  activations = SAVED_RESIDUAL_FRACTION * saved + RECOMPUTED_LAYER_FRACTION * recomputed
  return TrainingPlan(
      model=model_plan, batch_size=batch_size, seq_len=seq_len, remat=remat,
      lora_rank=lora_rank, trained_parameters=trained, weight_bytes=model_plan.bytes_per_device,
      adapter_bytes=adapter_bytes, optimizer_bytes=2 * trained_bytes,
      activation_bytes=int(activations),
  )


def _bytes_per_device(
    state: nnx.State, mesh: AbstractMesh, rules: sharding.Rules | None, counts: dict[str, int]
) -> int:
  total = 0
  for path, var in nnx.to_flat_state(state):
    axes = var.get_metadata().get("logical_axes") or (None,) * len(var.shape)
    spec = sharding.partition_spec(axes, var.shape, mesh, rules, counts, what=module_path(path))
    total += math.prod(shard_shape(tuple(var.shape), spec, mesh)) * np.dtype(var.dtype).itemsize
  return total


def _device_share(
    config: DecoderConfig, batch_size: int, mesh: AbstractMesh, rules: sharding.Rules | None
) -> tuple[DecoderConfig, int]:
  """The config and batch of the part of the model one device computes."""

  def share(logical: str, size: int) -> int:
    spec = sharding.partition_spec((logical,), (size,), mesh, rules, {logical: size})
    return size // math.prod(shard_shape((size,), spec, mesh)) if size else 1

  heads = config.num_heads // share("heads", config.num_heads)
  kv_heads = config.num_kv_heads // share("kv_heads", config.num_kv_heads)
  local = config.replace(
      num_heads=heads,
      # A device holds whole groups of query heads per key/value head.
      num_kv_heads=math.gcd(heads, kv_heads),
      intermediate_size=config.intermediate_size // share("mlp", config.intermediate_size),
      vocab_size=config.vocab_size // share("vocab", config.vocab_size),
      moe_intermediate_size=(
          config.moe_intermediate_size // share("expert_mlp", config.moe_intermediate_size)
      ),
  )
  return local, batch_size // share("batch", batch_size)


def _saved_residual_bytes(model: nnx.Module, batch_size: int, seq_len: int) -> int:
  """Bytes of the residuals the backward pass of the next-token loss keeps for a
  shape-only ``model``: traced, nothing computed."""
  from tunix_zoo.training import next_token_loss

  graphdef, state = nnx.split(model)
  tokens = jax.ShapeDtypeStruct((batch_size, seq_len + 1), jnp.int32)

  def loss_and_backward(state, tokens):
    # With respect to every variable: nnx.remat cannot write back to variables merged from
    # values of an outer trace. The residuals of frozen weights' gradients are the inputs
    # their adapters' gradients keep too.
    return jax.vjp(lambda s: next_token_loss(nnx.merge(graphdef, s), tokens), state)

  closed, (_, backward) = jax.make_jaxpr(loss_and_backward, return_shape=True)(state, tokens)
  jaxpr = closed.jaxpr
  outputs = jaxpr.outvars[len(jaxpr.outvars) - len(jax.tree.leaves(backward)):]
  # Inputs (the weights) and constants are not held for the backward pass's sake.
  held_anyway = set(jaxpr.invars) | set(jaxpr.constvars)
  seen, total = set(), 0
  for var in outputs:
    if isinstance(var, jax_core.Literal) or var in held_anyway or var in seen:
      continue
    seen.add(var)
    total += math.prod(var.aval.shape) * var.aval.dtype.itemsize
  return total
