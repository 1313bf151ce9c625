"""``AutoModel``: a model id (or folder, Kaggle handle, gs:// path) in, a sharded NNX model out.

Example::

    import jax
    from tunix_zoo import AutoModel, ModelSource

    mesh = jax.make_mesh((1, len(jax.devices())), ("fsdp", "tp"))
    model, path = AutoModel.from_pretrained("Qwen/Qwen3-0.6B", mesh)
    model, path = AutoModel.from_pretrained("/ckpts/my-sft-run", mesh)
    model, path = AutoModel.from_pretrained(
        "gemma3_1b", mesh, model_source=ModelSource.GCS, model_path="gs://bucket/gemma3-1b")
    logits, _ = model(tokens)
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from tunix_zoo import registry, sharding
from tunix_zoo.build import abstract_model, initialise, parameter_shardings
from tunix_zoo.checkpoint.loader import load_checkpoint
from tunix_zoo.checkpoint.safetensors_io import CheckpointFiles
from tunix_zoo.config import DecoderConfig
from tunix_zoo.errors import CheckpointError, ConfigMismatchError, ZooError
from tunix_zoo.naming import ModelNaming
from tunix_zoo.progress import progress_class
from tunix_zoo.sources import ModelSource, fetch

log = logging.getLogger(__name__)

__all__ = ["AutoModel", "ModelSource"]

# Fields that decide the shapes of the weights: a preset and a checkpoint that differ in
# any of them cannot be the same model.
ARCHITECTURE_FIELDS = (
    "vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
    "intermediate_size", "tie_word_embeddings", "attention_bias", "qk_norm", "num_experts",
    "moe_intermediate_size", "sandwich_norms",
)


def default_mesh() -> Mesh:
  """A one-device ``(fsdp, tp)`` mesh on the first local device."""
  return jax.make_mesh((1, 1), ("fsdp", "tp"), devices=jax.local_devices()[:1])


class AutoModel:
  """Loads any registered family from a checkpoint or builds it from a config."""

  @staticmethod
  def from_pretrained(
      model_id: str | None,
      mesh: Mesh | None = None,
      *,
      model_source: ModelSource | str = ModelSource.HUGGINGFACE,
      model_path: str | None = None,
      model_download_path: str | None = None,
      dtype: Any = None,
      param_dtype: Any = None,
      sharding_rules: sharding.Rules | None = None,
      revision: str | None = None,
      token: str | None = None,
      local_files_only: bool = False,
      remat: str = "none",
  ) -> tuple[nnx.Module, str]:
    """Fetches a checkpoint and loads it onto ``mesh``; returns ``(model, local_path)``.

    The checkpoint's config.json decides the architecture (so fine-tunes with any id
    load); when ``model_id`` also names a registered preset, the two must agree.
    ``param_dtype`` defaults to the checkpoint's dtype and ``dtype`` (compute) to
    ``param_dtype``. ``remat`` (``"none"``, ``"layer"``, ``"attention"``) chooses what
    the backward pass recomputes instead of saving.
    """
    source = ModelSource(model_source)
    if (
        source is ModelSource.HUGGINGFACE and model_path is None and model_id
        and os.path.isdir(model_id)
    ):
      source, model_path = ModelSource.LOCAL, model_id
    folder = fetch(
        model_id, source=source, model_path=model_path, model_download_path=model_download_path,
        revision=revision, token=token, local_files_only=local_files_only,
    )
    model = load_folder(
        folder, mesh, preset_id=model_id, dtype=dtype, param_dtype=param_dtype,
        sharding_rules=sharding_rules, remat=remat,
    )
    return model, str(folder)

  @staticmethod
  def from_config(
      config_or_id: DecoderConfig | str,
      mesh: Mesh | None = None,
      *,
      rngs: nnx.Rngs | int = 0,
      dtype: Any = np.float32,
      param_dtype: Any = np.float32,
      sharding_rules: sharding.Rules | None = None,
      remat: str = "none",
  ) -> nnx.Module:
    """A randomly initialised model, created directly in its sharding on ``mesh``.

    ``config_or_id`` is a config dataclass or a preset id (``"qwen3_0p6b"``, or an HF
    id such as ``"Qwen/Qwen3-0.6B"`` that names one). ``remat`` as in ``from_pretrained``.
    """
    if isinstance(config_or_id, str):
      config = registry.get_config(ModelNaming(model_id=config_or_id).model_config_id)
    else:
      config = config_or_id
    mesh = mesh or default_mesh()
    key = rngs.params() if isinstance(rngs, nnx.Rngs) else jax.random.key(rngs)
    abstract = abstract_model(
        config, param_dtype=param_dtype, dtype=dtype, mesh=mesh, sharding_rules=sharding_rules,
        remat=remat,
    )
    return initialise(abstract, key, parameter_shardings(abstract, mesh, sharding_rules))


def read_hf_config(folder: str | os.PathLike) -> dict[str, Any]:
  """The parsed config.json of a checkpoint folder."""
  path = pathlib.Path(folder) / "config.json"
  if not path.is_file():
    raise CheckpointError(
        f"{folder} has no config.json; tunix_zoo reads the architecture from it. Copy the "
        "config.json that belongs to these weights into the folder."
    )
  try:
    return json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
    raise CheckpointError(f"{path} is not valid JSON ({e}); re-download or fix it.") from e


def preset_for(model_id: str | None) -> tuple[str, DecoderConfig] | None:
  """The registered preset an id names, or None (fine-tunes and folders name none)."""
  if not model_id or os.path.isdir(model_id):
    return None
  try:
    config_id = ModelNaming(model_id=model_id).model_config_id
    return config_id, registry.get_config(config_id)
  except ZooError:
    return None


def check_against_preset(config: DecoderConfig, preset_id: str, preset: DecoderConfig) -> None:
  """Raises ConfigMismatchError when a checkpoint is not of the preset's architecture."""
  diffs = [
      f"{f}: checkpoint {getattr(config, f)!r} vs preset {getattr(preset, f)!r}"
      for f in ARCHITECTURE_FIELDS if getattr(config, f) != getattr(preset, f)
  ]
  if type(config) is not type(preset):
    diffs.insert(0, f"family: checkpoint {type(config).__name__} vs preset {type(preset).__name__}")
  if diffs:
    raise ConfigMismatchError(
        f"The checkpoint's config.json does not match preset {preset_id!r}: "
        + "; ".join(diffs)
        + ". Pass the right id, or a folder path / an id naming no preset to load by config.json."
    )


def checkpoint_dtype(folder: str | os.PathLike) -> np.dtype:
  """The dtype holding most of a checkpoint's bytes."""
  with CheckpointFiles(folder) as ckpt:
    by_dtype: dict[np.dtype, int] = {}
    for key in ckpt.keys():
      by_dtype[ckpt.dtype(key)] = by_dtype.get(ckpt.dtype(key), 0) + ckpt.nbytes(key)
  return max(by_dtype, key=by_dtype.get)


def load_folder(
    folder: str | os.PathLike,
    mesh: Mesh | None = None,
    *,
    preset_id: str | None = None,
    dtype: Any = None,
    param_dtype: Any = None,
    sharding_rules: sharding.Rules | None = None,
    remat: str = "none",
) -> nnx.Module:
  """Loads a local HF checkpoint folder (config.json + safetensors) onto ``mesh``."""
  hf_config = read_hf_config(folder)
  spec = registry.family_for_hf_config(hf_config)
  config = spec.config_class.from_hf_config(hf_config)
  preset = preset_for(preset_id)
  if preset is not None:
    check_against_preset(config, *preset)
  if "ConditionalGeneration" in " ".join(hf_config.get("architectures") or ()):
    log.warning(
        "%s is a multimodal checkpoint: loading its language model only; the vision "
        "weights are skipped.", folder,
    )
  mesh = mesh or default_mesh()
  param_dtype = param_dtype or checkpoint_dtype(folder)
  dtype = dtype or param_dtype
  abstract = abstract_model(
      config, param_dtype=param_dtype, dtype=dtype, mesh=mesh, sharding_rules=sharding_rules,
      remat=remat,
  )
  total = sum(v.size * np.dtype(v.dtype).itemsize
              for _, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param)))
  # disable=None: drawn on a terminal only, so logs and CI output stay clean.
  with progress_class()(total=total, unit="B", unit_scale=True, desc="load",
                        disable=None) as bar:
    return load_checkpoint(abstract, folder, spec.param_table, mesh,
                           sharding_rules=sharding_rules, progress=bar.update)
