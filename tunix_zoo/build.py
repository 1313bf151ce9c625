"""From a config to a model's parameters: shapes, shardings and random values.

The abstract model holds shape-only parameters (nothing allocated); every parameter's
``NamedSharding`` on a mesh comes from its logical axes and the sharding rules; random
initialisation creates each parameter directly in that sharding. The checkpoint loader,
the planner and ``AutoModel.from_config`` all start here.

Example::

    abstract = abstract_model(registry.get_config("qwen3_0p6b"), mesh=mesh)
    shardings = parameter_shardings(abstract, mesh)
    model = initialise(abstract, jax.random.key(0), shardings)
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from tunix_zoo import registry, sharding
from tunix_zoo.config import DecoderConfig
from tunix_zoo.errors import ConfigError
from tunix_zoo.layers import quantized
from tunix_zoo.layers.basic import INIT_STDDEV


def abstract_model(config: DecoderConfig, param_dtype: Any = jnp.float32, *,
                   quantization: quantized.Quantization | str | None = None, **kwargs: Any):
  """The family's model for ``config`` with shape-only parameters (nothing allocated);
  with ``quantization`` its Linear layers hold quantized weights and their scales (in
  ``param_dtype``), see :mod:`tunix_zoo.layers.quantized`.

  Example::

      abstract = abstract_model(registry.get_config("qwen3_8b"), param_dtype=jnp.bfloat16)
      int4 = abstract_model(registry.get_config("qwen3_8b"), jnp.bfloat16, quantization="int4")
  """
  quantization = quantized.Quantization.of(quantization)
  if quantization is not None and kwargs.get("scan_layers"):
    raise ConfigError("Quantized loading of scanned layers (quantization with "
                      "scan_layers=True) is not supported yet; drop one of the two.")
  spec = registry.family_for_config_class(type(config))
  model = spec.model_class(config, rngs=None, param_dtype=param_dtype, **kwargs)
  if quantization is not None:
    quantized.quantize_linears(model, quantization, scale_dtype=param_dtype)
    if kwargs.get("mesh") is not None:
      # The new variables' mesh axes, as the model recorded its others' at construction.
      model._annotate_mesh_axes(kwargs["mesh"])
  return model


def module_path(path: tuple[Any, ...]) -> str:
  """``('layers', 3, 'attn', 'q_proj', 'weight')`` -> ``'layers.3.attn.q_proj.weight'``."""
  return ".".join(str(p) for p in path)


def axis_counts(config: Any) -> dict[str, int]:
  """Per logical axis, the count a mesh axis must divide (heads, not heads * head_dim)."""
  return {"heads": config.num_heads, "kv_heads": config.num_kv_heads}


def parameter_shardings(
    abstract: nnx.Module, mesh: Mesh, rules: sharding.Rules | None = None
) -> dict[str, jax.sharding.NamedSharding]:
  """Module path -> NamedSharding of every parameter of an (abstract) model.

  Raises ShardingError when ``rules`` name a mesh axis ``mesh`` lacks.

  Example::

      shardings = parameter_shardings(abstract, mesh)
      shardings["embed_tokens.weight"].spec
  """
  if rules is not None:
    sharding.validate_rules(rules, mesh)
  counts = axis_counts(abstract.config)
  # On an Explicit mesh the types keep size-1 axes: they are then what the model's
  # ``out_sharding`` metadata says (Tunix asserts a state against its partition specs).
  keep_unit_axes = sharding.has_explicit_axes(mesh)
  out = {}
  for path, var in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
    name = module_path(path)
    axes = var.get_metadata().get("logical_axes") or (None,) * len(var.shape)
    out[name] = sharding.named_sharding(
        axes, var.shape, mesh, rules, counts, what=name, keep_unit_axes=keep_unit_axes
    )
  return out


def _initialiser_compiler_options(shape: tuple[int, ...]) -> dict[str, Any] | None:
  """Compiler options of an initialiser: one of a real model's weight keeps XLA's default
  backend optimisation (level 3) even in a process whose XLA_FLAGS lower it for fast
  compiles (as the test suite's do). Unoptimised, drawing gemma-3-270m's 268M values takes
  4x the CPU time on XLA:CPU. Each layer reuses its shapes' initialisers; only for tiny
  arrays does the slower compile (0.2 s of CPU) cost more than it saves."""
  return {"xla_backend_optimization_level": 3} if math.prod(shape) >= 1 << 18 else None


@functools.lru_cache(maxsize=256)
def _initialiser(shape: tuple[int, ...], dtype: Any, fill: float | None, out_sharding: Any):
  def init(key: jax.Array) -> jax.Array:
    if fill is not None:
      return jnp.full(shape, fill, dtype)
    return (INIT_STDDEV * jax.random.normal(key, shape, jnp.float32)).astype(dtype)

  return jax.jit(init, out_shardings=out_sharding,
                 compiler_options=_initialiser_compiler_options(shape))


def initialise(
    abstract: nnx.Module, key: jax.Array, shardings: dict[str, jax.sharding.Sharding]
) -> nnx.Module:
  """Random parameters for an abstract model, each created directly in its sharding.

  One small jitted initialiser per distinct (shape, dtype, sharding), so a model compiles
  a handful of them however many layers it has.

  Example::

      model = initialise(abstract, jax.random.key(0), parameter_shardings(abstract, mesh))
  """
  graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
  flat = nnx.to_flat_state(params)
  variables = dict(flat)
  for n, (path, var) in enumerate(flat):
    if quantized.is_quantization_scale(var):
      continue  # made with its weight
    if quantized.is_quantized_weight(var):
      scale_path = path[:-1] + ("weight_scale",)
      init = _quantized_initialiser(
          quantized.dense_shape(var), var.get_metadata()["quantization"],
          jnp.dtype(variables[scale_path].dtype),
          (shardings[module_path(path)], shardings[module_path(scale_path)]),
      )
      values, scales = init(jax.random.fold_in(key, n))
      var.set_value(values)
      variables[scale_path].set_value(scales)
      continue
    init = _initialiser(
        tuple(var.shape), jnp.dtype(var.dtype), var.get_metadata().get("init_fill"),
        shardings[module_path(path)],
    )
    var.set_value(init(jax.random.fold_in(key, n)))
  return nnx.merge(graphdef, nnx.from_flat_state(flat), rest)


@functools.lru_cache(maxsize=256)
def _quantized_initialiser(shape: tuple[int, ...], quantization: quantized.Quantization,
                           scale_dtype: Any, out_shardings: tuple[Any, Any]):
  """``key -> (values, scales)`` of a random ``shape`` weight: one weight's float values
  exist on the devices only inside this program, never the whole model's."""

  def init(key: jax.Array) -> tuple[jax.Array, jax.Array]:
    weight = INIT_STDDEV * jax.random.normal(key, shape, jnp.float32)
    return quantization.quantize(weight, jnp, scale_dtype)

  return jax.jit(init, out_shardings=out_shardings,
                 compiler_options=_initialiser_compiler_options(shape))
