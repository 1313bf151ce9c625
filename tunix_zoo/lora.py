"""LoRA fine-tuning: put low-rank adapters on a model's projections, train only them,
then merge them into the weights or save them in PEFT's format.

Adapters are ``nnx.LoRAParam`` variables of :class:`tunix_zoo.layers.lora.LoRALinear`
layers that replace the matching :class:`~tunix_zoo.layers.basic.Linear` layers in
place; they are created directly in the sharding of the weight they adapt, on its mesh.
The base weights stay ``nnx.Param``: an optimizer built with ``wrt=nnx.LoRAParam``
trains the adapters and leaves everything else untouched.

Example::

    model, path = AutoModel.from_pretrained("Qwen/Qwen3-0.6B", mesh, remat="layer")
    apply_lora(model, rank=32, alpha=32.0,
               module_path=".*q_proj|.*k_proj|.*v_proj|.*o_proj|.*gate_proj|.*up_proj|.*down_proj")
    train(model, batches, optax.adamw(1e-4), steps=100, wrt=nnx.LoRAParam)
    save_lora_adapter(model, "/ckpt/my-adapter", base_model_name_or_path="Qwen/Qwen3-0.6B")
    merge_lora(model)                   # plain Linear layers again, W + B @ A * alpha / rank
    save_pretrained(model, "/ckpt/my-merged-model")
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import re
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding

from tunix_zoo import arguments, registry, sharding
from tunix_zoo.build import axis_counts, module_path as dotted
from tunix_zoo.checkpoint.export import (discard_staging, host_copy, layer_slice,
                                         move_into_place, new_staging_folder, unrolled_order)
from tunix_zoo.checkpoint.push import check_push_arguments, push_folder
from tunix_zoo.checkpoint.writer import write_safetensors
from tunix_zoo.config import DEFAULT_LORA_MODULE_PATH as DEFAULT_MODULE_PATH
from tunix_zoo.errors import LoraError
from tunix_zoo.layers.basic import Linear
from tunix_zoo.layers.lora import LoRALinear
from tunix_zoo.layers.stacked import unrolled_path, unrolled_paths

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_MODULE_PATH", "TUNIX_ALIASES", "apply_lora", "merge_lora", "lora_layers",
           "save_lora_adapter"]

# Every attention and MLP projection: what fine-tuning configs usually name.

# Tunix's module names (its Gemma recipes' default regex names them) of our projections:
# a path matches when it, or it with the last name replaced by an alias, matches.
TUNIX_ALIASES: dict[str, tuple[str, ...]] = {
    "q_proj": ("q_einsum",),
    "k_proj": ("kv_einsum",),
    "v_proj": ("kv_einsum",),
    "o_proj": ("attn_vec_einsum",),
    "gate_proj": ("gating_einsum",),
    "up_proj": ("gating_einsum",),
    "down_proj": ("linear",),
}

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def apply_lora(
    model: nnx.Module,
    *,
    rank: int,
    alpha: float,
    module_path: str = DEFAULT_MODULE_PATH,
    dropout: float = 0.0,
    rngs: nnx.Rngs | int = 0,
    param_dtype: Any = None,
) -> nnx.Module:
  """Adds LoRA adapters to every Linear layer whose path ``module_path`` fully matches.

  Paths are the dotted module paths of the model (``layers.3.attn.q_proj``,
  ``layers.3.mlp.down_proj``, ``lm_head``), matched with ``re.fullmatch`` as Tunix and
  qwix match theirs. Tunix's names of the same projections are accepted as aliases
  (:data:`TUNIX_ALIASES`): ``q_einsum`` is ``q_proj``, ``kv_einsum`` ``k_proj`` and
  ``v_proj``, ``attn_vec_einsum`` ``o_proj``, ``gating_einsum`` ``gate_proj`` and
  ``up_proj``, ``linear`` ``down_proj``; so Tunix's default
  ``.*q_einsum|.*kv_einsum|.*gate_proj|.*down_proj|.*up_proj|.*attn_vec_einsum`` adapts
  every attention and MLP projection. The model is changed in place and returned.

  Args:
    model: a tunix_zoo model (or any NNX module holding Linear layers).
    rank: the adapters' rank (PEFT's ``r``).
    alpha: the update is scaled by ``alpha / rank`` (PEFT's ``lora_alpha``).
    module_path: a regex over module paths; by default every attention and MLP projection.
    dropout: dropout on the adapters' input while training; ``model.eval()`` turns it off.
    rngs: seed or Rngs drawing the ``lora_a`` initial values and the dropout keys.
    param_dtype: the adapters' dtype (e.g. ``jnp.float32`` on a bfloat16 model); by
      default each adapted weight's dtype.

  Raises:
    LoraError: a bad rank, alpha, dropout or regex; a regex matching no Linear layer
      (the message lists the model's Linear paths); or a layer already adapted.

  Example::

      apply_lora(model, rank=8, alpha=16.0, module_path=r"layers\\.\\d+\\.attn\\.(q|v)_proj")
  """
  arguments.check_lora(module_path, param_dtype)
  _check_settings(rank, alpha, dropout)
  try:
    pattern = re.compile(module_path)
  except re.error as e:
    raise LoraError(f"module_path {module_path!r} is not a regular expression: {e}.") from e
  rngs = rngs if isinstance(rngs, nnx.Rngs) else nnx.Rngs(rngs)
  linears = {
      dotted(path): module for path, module in nnx.iter_modules(model)
      if isinstance(module, Linear)
  }
  # The unrolled paths (layers.{i}...) are the ones matched and listed, whatever the layout.
  paths = {p: n for path, linear in linears.items() for p, n in _unrolled(path, linear)}
  chosen = {path: linear for path, linear in linears.items()
            if _stack_matches(pattern, path, linear)}
  if dropout and any(unrolled_paths(p, l.weight.get_metadata()) for p, l in chosen.items()):
    raise LoraError(
        "LoRA dropout is not supported on a scanned model's stacked layers yet; use "
        "dropout=0, or load the model without scan_layers."
    )
  if not chosen:
    raise LoraError(
        f"module_path {module_path!r} matches none of the model's Linear layers, whose paths "
        f"are ({{i}} = layer number): {', '.join(_path_patterns(paths))}."
    )
  adapted = sorted(path for path, linear in chosen.items() if isinstance(linear, LoRALinear))
  if adapted:
    raise LoraError(
        f"{adapted[0]} (and {len(adapted) - 1} more matched layers) already have LoRA "
        "adapters; merge_lora(model) first, or choose a module_path that leaves them out."
    )
  _warn_about_other_parameters(model, pattern, chosen)
  counts = axis_counts(model.config) if hasattr(model, "config") else None
  rules = getattr(model, "sharding_rules", None)
  for path, linear in chosen.items():
    # A shape-only model (for planning) gets shape-only adapters.
    concrete = isinstance(linear.weight.get_value(), jax.Array)
    shardings = _adapter_shardings(linear, rank, rules, counts, path) if concrete else (None, None)
    adapter = LoRALinear(
        linear, rank, alpha, dropout=dropout, rngs=rngs if concrete else None,
        param_dtype=param_dtype, shardings=shardings,
    )
    _replace(model, path, adapter)
  log.info("Added rank-%d LoRA adapters to %d Linear layers.", rank, len(chosen))
  return model


def lora_layers(model: nnx.Module) -> dict[str, LoRALinear]:
  """Module path -> LoRALinear of every adapted layer of ``model``, in model order."""
  return {
      dotted(path): module for path, module in nnx.iter_modules(model)
      if isinstance(module, LoRALinear)
  }


def merge_lora(model: nnx.Module, *, dequantize: bool = False) -> nnx.Module:
  """Folds every adapter into its base weight (``W + B @ A * alpha / rank``, computed in
  float32 and stored in W's dtype and sharding) and removes the adapters, in place.

  The result is the plain model again: ``save_pretrained`` exports it as usual. Over
  quantized weights (QLoRA) the sum is not quantized again: ``dequantize=True`` merges into
  the dequantized weights, which then take the scales' dtype (the model's bfloat16, say)
  and its memory.

  Raises:
    LoraError: the model has no adapters, or adapts quantized weights without
      ``dequantize=True``.

  Example::

      merge_lora(model)
      save_pretrained(model, "/ckpt/merged")
  """
  layers = lora_layers(model)
  if not layers:
    raise LoraError("merge_lora: the model has no LoRA adapters; apply_lora adds them.")
  quantized = [path for path, layer in layers.items() if layer.quantization is not None]
  if quantized and not dequantize:
    raise LoraError(
        f"merge_lora: {quantized[0]} (and {len(quantized) - 1} more adapted layers) adapt "
        f"{layers[quantized[0]].quantization.kind}-quantized weights, into which a merge "
        "cannot be stored. Save the adapters with save_lora_adapter, or pass "
        "merge_lora(model, dequantize=True) for unquantized merged weights.")
  for path, layer in layers.items():
    _replace(model, path, layer.merged())
  return model


def save_lora_adapter(
    model: nnx.Module,
    out_dir: str | os.PathLike[str],
    *,
    base_model_name_or_path: str | None = None,
    dtype: Any = None,
    overwrite: bool = False,
    push_to_hub: bool = False,
    repo_id: str | None = None,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str | None = None,
) -> pathlib.Path:
  """Writes the model's adapters as a PEFT LoRA folder; returns the folder's path.

  The folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` with PEFT's
  names (``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``), so
  ``peft.PeftModel.from_pretrained(transformers_model, out_dir)`` loads it onto the
  family's transformers model. Module names come from the family's checkpoint key map.
  Every process must call it (adapters sharded across hosts are gathered); process 0
  writes, into a staging folder renamed into place at the end.

  Args:
    model: a tunix_zoo model with adapters from :func:`apply_lora`.
    out_dir: the folder to create; a non-empty one is replaced only with ``overwrite``.
    base_model_name_or_path: recorded in ``adapter_config.json`` (the HF id or folder of
      the base model), where PEFT looks for the base model.
    dtype: the written adapters' dtype; by default their own.
    overwrite: replace a non-empty ``out_dir``.
    push_to_hub, repo_id, token, private, commit_message: upload the folder to the Hub
      as one commit afterwards, as :func:`tunix_zoo.checkpoint.export.save_pretrained`.

  Raises:
    LoraError: the model has no adapters.
    ExportError: ``out_dir`` is a file or a non-empty folder (without ``overwrite``), or
      the push failed (the folder is then complete on disk).

  Example::

      save_lora_adapter(model, "/ckpt/adapter", base_model_name_or_path="Qwen/Qwen3-0.6B")
      # PyTorch: PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(...), path)
  """
  check_push_arguments(push_to_hub, repo_id, token, private)
  layers = lora_layers(model)
  if not layers:
    raise LoraError("save_lora_adapter: the model has no LoRA adapters; apply_lora adds them.")
  key_map = registry.family_for_config_class(type(model.config)).param_table
  tensors: dict[str, np.ndarray] = {}
  hf_names: dict[str, LoRALinear] = {}
  # One entry per layer, in the unrolled model's order (a scanned model's files are the same).
  per_layer = sorted(
      ((name, path, n) for path, layer in layers.items()
       for n, (name, _) in enumerate(_unrolled(path, layer))),
      key=lambda entry: unrolled_order(entry[0]),
  )
  for name, path, n in per_layer:
    layer = layers[path]
    stacked = unrolled_paths(path + ".weight", layer.weight.get_metadata()) is not None
    weight_key = key_map.checkpoint_key(name + ".weight")
    hf_name = weight_key.removesuffix(".weight")
    hf_names[hf_name] = layer
    for part, variable in (("lora_A", layer.lora_a), ("lora_B", layer.lora_b)):
      value = variable.get_value()
      if stacked:
        value = layer_slice(value, np.int32(n))
      # Every process takes part (gathering can be a collective); process 0 writes.
      host = host_copy(value, np.dtype(value.dtype if dtype is None else dtype),
                       assemble=jax.process_index() == 0)
      if host is not None:
        tensors[f"base_model.model.{hf_name}.{part}.weight"] = host
  out = pathlib.Path(out_dir).absolute()
  if jax.process_index() == 0:
    _write_folder(out, overwrite, _peft_config(hf_names, base_model_name_or_path), tensors)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"save_lora_adapter {out}")
  if push_to_hub and jax.process_index() == 0:
    push_folder(out, repo_id or out.name, token=token, private=private,
                commit_message=commit_message)
  return out


# -- helpers -------------------------------------------------------------------------------
def _check_settings(rank: int, alpha: float, dropout: float) -> None:
  if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
    raise LoraError(f"LoRA rank must be a positive integer; got {rank!r}.")
  if not isinstance(alpha, (int, float)) or alpha <= 0:
    raise LoraError(f"LoRA alpha must be a positive number; got {alpha!r}.")
  if not 0.0 <= dropout < 1.0:
    raise LoraError(f"LoRA dropout must be in [0, 1); got {dropout!r}.")


def _unrolled(path: str, linear: Linear) -> list[tuple[str, str]]:
  """``(unrolled path, path)`` of each layer a Linear serves: one, or one per layer of a
  scanned model's stacked Linear."""
  metadata = linear.weight.get_metadata()
  name = path + ".weight"
  names = unrolled_paths(name, metadata) or [unrolled_path(name, metadata)]
  return [(n.removesuffix(".weight"), path) for n in names]


def _stack_matches(pattern: re.Pattern, path: str, linear: Linear) -> bool:
  """Whether ``pattern`` matches the Linear at ``path`` (for a stacked one: all of its
  layers; LoRAError when only some)."""
  unrolled = [name for name, _ in _unrolled(path, linear)]
  matched = [name for name in unrolled if _matches(pattern, name)]
  if matched and len(matched) < len(unrolled):
    raise LoraError(
        f"module_path matches {matched[0]} but not {len(unrolled) - len(matched)} of the "
        f"other layers whose {path.rpartition('.')[2]} is scanned with it ({', '.join(unrolled)}"
        "): a scanned model's adapters are stacked over those layers. Match all of them or "
        "none, or load the model without scan_layers."
    )
  return bool(matched)


def _matches(pattern: re.Pattern, path: str) -> bool:
  """Whether ``pattern`` fully matches ``path`` or its name under a Tunix alias."""
  parent, _, name = path.rpartition(".")
  prefix = parent + "." if parent else ""
  return any(
      pattern.fullmatch(candidate)
      for candidate in (path, *(prefix + alias for alias in TUNIX_ALIASES.get(name, ())))
  )


def _path_patterns(paths: dict[str, Any]) -> list[str]:
  """Distinct paths with layer numbers written ``{i}``, in model order."""
  return list(dict.fromkeys(re.sub(r"(?<=\.)\d+(?=\.)", "{i}", p) for p in paths))


def _warn_about_other_parameters(model: nnx.Module, pattern: re.Pattern, chosen: dict) -> None:
  """Logs matched matrices that are not Linear weights (stacked MoE experts, embeddings):
  the regex names them, but they get no adapters."""
  skipped = [
      dotted(path) for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))
      if len(var.shape) >= 2 and dotted(path[:-1]) not in chosen
      and (pattern.fullmatch(dotted(path)) or pattern.fullmatch(dotted(path[:-1])))
  ]
  if skipped:
    log.warning(
        "module_path also matches %d weights that are not Linear layers and get no adapters: "
        "%s.", len(skipped), ", ".join(_path_patterns(dict.fromkeys(skipped))),
    )


def _adapter_shardings(
    linear: Linear, rank: int, rules: sharding.Rules | None, counts: dict | None, path: str
) -> tuple[Any, Any]:
  """Where ``lora_a`` and ``lora_b`` go: on the weight's mesh, sharded by the logical axes
  of the weight's side they share (the same rules the weight was sharded by)."""
  weight = linear.weight.get_value()
  if not isinstance(weight.sharding, NamedSharding):
    return weight.sharding, weight.sharding
  *lead, out_features, in_features = linear.dense_shape
  logical = linear.weight.get_metadata().get("logical_axes") or (None,) * (len(lead) + 2)
  *lead_axes, out_axis, in_axis = logical
  mesh = weight.sharding.mesh
  # As build.parameter_shardings: Explicit types keep size-1 axes, as the metadata does.
  keep = sharding.has_explicit_axes(mesh)
  return (
      sharding.named_sharding(
          (*lead_axes, None, in_axis), (*lead, rank, in_features), mesh, rules, counts,
          what=path + ".lora_a", keep_unit_axes=keep,
      ),
      sharding.named_sharding(
          (*lead_axes, out_axis, None), (*lead, out_features, rank), mesh, rules, counts,
          what=path + ".lora_b", keep_unit_axes=keep,
      ),
  )


def _replace(model: nnx.Module, path: str, module: nnx.Module) -> None:
  """Sets the submodule at dotted ``path`` (attributes and list indices) to ``module``."""
  *parents, name = path.split(".")
  parent = model
  for part in parents:
    parent = parent[int(part)] if part.isdigit() else getattr(parent, part)
  if name.isdigit():
    parent[int(name)] = module
  else:
    setattr(parent, name, module)


def _peft_config(layers: dict[str, LoRALinear], base_model: str | None) -> dict[str, Any]:
  """PEFT's LoraConfig for these layers (HF module name -> layer): the first layer's rank
  and alpha, and patterns for the layers that differ."""
  first = next(iter(layers.values()))
  return {
      "peft_type": "LORA",
      "task_type": "CAUSAL_LM",
      "base_model_name_or_path": base_model,
      "r": first.rank,
      "lora_alpha": first.alpha,
      "lora_dropout": first.dropout.rate if first.dropout is not None else 0.0,
      # Exact module names: PEFT adapts a module whose name equals an entry.
      "target_modules": sorted(layers),
      "rank_pattern": {n: l.rank for n, l in layers.items() if l.rank != first.rank},
      "alpha_pattern": {n: l.alpha for n, l in layers.items() if l.alpha != first.alpha},
      "bias": "none",
      "fan_in_fan_out": False,
      "inference_mode": True,
      "init_lora_weights": True,
      "use_rslora": False,
      "use_dora": False,
      "modules_to_save": None,
      "layers_to_transform": None,
      "layers_pattern": None,
      "revision": None,
  }


def _write_folder(
    out: pathlib.Path, overwrite: bool, config: dict[str, Any], tensors: dict[str, np.ndarray]
) -> None:
  """Writes the adapter folder through a hidden staging folder renamed into place."""
  staging = new_staging_folder(out, overwrite)
  try:
    (staging / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    write_safetensors(staging / ADAPTER_WEIGHTS, tensors)
    move_into_place(staging, out)
  except BaseException:
    discard_staging(staging)
    raise
