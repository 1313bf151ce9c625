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

import contextlib
import json
import logging
import os
import pathlib
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from tunix_zoo import arguments, registry, sharding
from tunix_zoo.build import abstract_model, initialise, module_path, parameter_shardings
from tunix_zoo.checkpoint import orbax_io
from tunix_zoo.checkpoint.loader import check_layer_count, load_checkpoint
from tunix_zoo.checkpoint.quantize import check_not_prequantized
from tunix_zoo.checkpoint.reader import CheckpointFiles
from tunix_zoo.config import DecoderConfig
from tunix_zoo.errors import (CheckpointError, ConfigError, ConfigMismatchError, SourceError,
                              ZooError)
from tunix_zoo.layers import quantized
from tunix_zoo.layers.quantized import Quantization
from tunix_zoo.naming import ModelNaming
from tunix_zoo.progress import progress_class
from tunix_zoo.sources import ModelSource, fetch, open_stream

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
      scan_layers: bool = False,
      subfolder: str | None = None,
      variant: str | None = None,
      force_download: bool = False,
      cache_dir: str | os.PathLike[str] | None = None,
      stream: bool = False,
      stream_concurrency: int | None = None,
      quantization: Quantization | str | None = None,
  ) -> tuple[nnx.Module, str]:
    """Fetches a checkpoint and loads it onto ``mesh``; returns ``(model, local_path)``.

    With ``stream=True`` (GCS or HUGGINGFACE) nothing is downloaded: the tensors are read
    straight from the bucket or the Hub with range requests (``stream_concurrency`` at a
    time), each process fetching only its share, and the returned path is the remote one.

    The checkpoint's config.json decides the architecture (so fine-tunes with any id
    load); when ``model_id`` also names a registered preset, the two must agree.
    ``param_dtype`` defaults to the checkpoint's dtype and ``dtype`` (compute) to
    ``param_dtype``. ``remat`` (``"none"``, ``"layer"``, ``"attention"``) chooses what
    the backward pass recomputes instead of saving; ``scan_layers=True`` holds the layers
    stacked and scanned (:class:`tunix_zoo.layers.decoder.LayerStack`: the same numbers,
    a compile time flat in depth). As in transformers: ``subfolder``
    is the repo (or folder) directory holding the checkpoint, ``variant`` loads
    ``model.<variant>.safetensors`` (or ``model.safetensors.index.<variant>.json``),
    ``force_download`` re-downloads cached files, and ``cache_dir`` is the Hugging Face
    cache root to use (``model_download_path`` is a plain folder instead).

    ``quantization`` (``"int8"``, ``"int4"``, ``"nf4"``, ``"fp8"`` or a
    :class:`~tunix_zoo.layers.quantized.Quantization`) stores the Linear weights quantized,
    each device's slice quantized as it is read; embeddings, norms and the LM head stay
    in ``param_dtype``, as do the scales. ``apply_lora`` then trains adapters over them
    (QLoRA). Checkpoints quantized by other tools are refused (CheckpointError).

    Example::

        model, path = AutoModel.from_pretrained("Qwen/Qwen3-8B", mesh, quantization="int4")
    """
    _check_arguments(mesh, dtype=dtype, param_dtype=param_dtype, sharding_rules=sharding_rules,
                     model_source=model_source)
    quantization = _check_quantization(quantization, mesh)
    source = ModelSource(model_source)
    if (
        source is ModelSource.HUGGINGFACE and model_path is None and model_id
        and os.path.isdir(model_id)
    ):
      source, model_path = ModelSource.LOCAL, model_id
    if stream:
      download_only = {"model_download_path": model_download_path,
                       "local_files_only": local_files_only, "subfolder": subfolder,
                       "variant": variant, "force_download": force_download,
                       "cache_dir": cache_dir}
      given = [name for name, value in download_only.items() if value]
      if given:
        raise SourceError(
            f"stream=True reads the checkpoint in place: {', '.join(given)} do(es) not "
            "apply. Drop them, or drop stream=True to download.")
      reader = open_stream(model_id, source=source, model_path=model_path, revision=revision,
                           token=token, concurrency=stream_concurrency)
      model = load_stream(reader, mesh, preset_id=model_id, dtype=dtype,
                          param_dtype=param_dtype, sharding_rules=sharding_rules, remat=remat,
                          quantization=quantization,
                          scan_layers=scan_layers)
      return model, reader.location
    folder = fetch(
        model_id, source=source, model_path=model_path, model_download_path=model_download_path,
        revision=revision, token=token, local_files_only=local_files_only,
        subfolder=subfolder, variant=variant, cache_dir=cache_dir,
        force_download=force_download,
    )
    model = load_folder(
        folder, mesh, preset_id=model_id, dtype=dtype, param_dtype=param_dtype,
        sharding_rules=sharding_rules, remat=remat, variant=variant, quantization=quantization,
        scan_layers=scan_layers,
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
      scan_layers: bool = False,
      quantization: Quantization | str | None = None,
  ) -> nnx.Module:
    """A randomly initialised model, created directly in its sharding on ``mesh``.

    ``config_or_id`` is a config dataclass or a preset id (``"qwen3_0p6b"``, or an HF
    id such as ``"Qwen/Qwen3-0.6B"`` that names one). ``remat``, ``quantization`` and
    ``scan_layers`` as in ``from_pretrained``: each quantized weight is drawn and quantized
    on its devices one at a time, so a model that fits only quantized is built without a float copy.

    Example::

        model = AutoModel.from_config("llama3p1_70b", mesh, param_dtype=jnp.bfloat16,
                                      dtype=jnp.bfloat16, quantization="int4")
    """
    _check_arguments(mesh, dtype=dtype, param_dtype=param_dtype, sharding_rules=sharding_rules)
    quantization = _check_quantization(quantization, mesh)
    if isinstance(config_or_id, str):
      config = registry.get_config(ModelNaming(model_id=config_or_id).model_config_id)
    else:
      config = config_or_id
    mesh = mesh or default_mesh()
    key = rngs.params() if isinstance(rngs, nnx.Rngs) else jax.random.key(rngs)
    abstract = abstract_model(
        config, param_dtype=param_dtype, dtype=dtype, mesh=mesh, sharding_rules=sharding_rules,
        remat=remat, quantization=quantization, scan_layers=scan_layers,
    )
    return initialise(abstract, key, parameter_shardings(abstract, mesh, sharding_rules))


def _check_quantization(quantization: Any, mesh: Mesh | None) -> Quantization | None:
  """The Quantization asked for, checked against the devices it will run on."""
  quantization = Quantization.of(quantization)
  if quantization is not None:
    quantization.check_platform(list(mesh.devices.flat) if mesh is not None
                                else jax.local_devices()[:1])
  return quantization


def _check_arguments(mesh: Any, *, dtype: Any, param_dtype: Any,
                     sharding_rules: sharding.Rules | None,
                     model_source: Any = ModelSource.HUGGINGFACE) -> None:
  """Raises a ZooError for arguments that cannot work, before anything is fetched or built."""
  arguments.float_dtype(dtype, "dtype")
  arguments.float_dtype(param_dtype, "param_dtype")
  if arguments.mesh_or_none(mesh) is not None:
    sharding.check_mesh_axes(mesh, sharding_rules)
  try:
    ModelSource(model_source)
  except ValueError:
    raise SourceError(
        f"model_source={model_source!r} is not a source. Use one of "
        f"{', '.join(repr(s.value) for s in ModelSource)} (or ModelSource.<NAME>).") from None


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


def checkpoint_dtype(folder: str | os.PathLike | Any, variant: str | None = None) -> np.dtype:
  """The dtype holding most of a checkpoint's bytes (a folder, or an open reader)."""
  opened = isinstance(folder, (str, os.PathLike))
  with CheckpointFiles(folder, variant) if opened else contextlib.nullcontext(folder) as ckpt:
    by_dtype: dict[np.dtype, int] = {}
    for key in ckpt.keys():
      by_dtype[ckpt.dtype(key)] = by_dtype.get(ckpt.dtype(key), 0) + ckpt.nbytes(key)
  return max(by_dtype, key=by_dtype.get)


def family_and_config(hf_config: dict[str, Any],
                      preset_id: str | None) -> tuple[Any, DecoderConfig]:
  """The registered family and the config a parsed config.json describes, checked against
  the preset ``preset_id`` names (if it names one)."""
  spec = registry.family_for_hf_config(hf_config)
  config = spec.config_class.from_hf_config(hf_config)
  preset = preset_for(preset_id)
  if preset is not None:
    check_against_preset(config, *preset)
  return spec, config


def load_folder(
    folder: str | os.PathLike,
    mesh: Mesh | None = None,
    *,
    preset_id: str | None = None,
    dtype: Any = None,
    param_dtype: Any = None,
    sharding_rules: sharding.Rules | None = None,
    remat: str = "none",
    scan_layers: bool = False,
    variant: str | None = None,
    quantization: Quantization | str | None = None,
) -> nnx.Module:
  """Loads a local HF checkpoint folder (config.json + safetensors) onto ``mesh``;
  ``variant`` reads ``model.<variant>.safetensors`` (or its index) instead.

  A folder without config.json that holds an orbax (Kaggle Flax) checkpoint is read by
  :func:`load_orbax_folder`, with the architecture of the preset ``preset_id`` names.
  ``quantization`` as in :meth:`AutoModel.from_pretrained`.
  """
  if not (pathlib.Path(folder) / "config.json").is_file() and orbax_io.is_orbax_folder(folder):
    return load_orbax_folder(folder, mesh, preset_id=preset_id, dtype=dtype,
                             param_dtype=param_dtype, sharding_rules=sharding_rules,
                             remat=remat, quantization=quantization,
                             scan_layers=scan_layers)
  hf_config = read_hf_config(folder)
  with CheckpointFiles(folder, variant) as files:
    check_not_prequantized(folder, hf_config, files.keys())
  spec, config = family_and_config(hf_config, preset_id)
  check_layer_count(folder, spec.param_table, config.num_layers, variant)
  if "ConditionalGeneration" in " ".join(hf_config.get("architectures") or ()):
    log.warning(
        "%s is a multimodal checkpoint: loading its language model only; the vision "
        "weights are skipped.", folder,
    )
  mesh = mesh or default_mesh()
  param_dtype = param_dtype or checkpoint_dtype(folder, variant)
  dtype = dtype or param_dtype
  abstract = abstract_model(
      config, param_dtype=param_dtype, dtype=dtype, mesh=mesh, sharding_rules=sharding_rules,
      remat=remat, quantization=quantization, scan_layers=scan_layers,
  )
  return _load_with_progress(abstract, CheckpointFiles(folder, variant), spec.param_table, mesh,
                             sharding_rules)


def load_stream(
    reader: Any,
    mesh: Mesh | None = None,
    *,
    preset_id: str | None = None,
    dtype: Any = None,
    param_dtype: Any = None,
    sharding_rules: sharding.Rules | None = None,
    remat: str = "none",
    scan_layers: bool = False,
    quantization: Quantization | str | None = None,
) -> nnx.Module:
  """Loads a :class:`~tunix_zoo.checkpoint.remote_safetensors.RemoteCheckpoint` (from
  :func:`tunix_zoo.sources.open_stream`) onto ``mesh``, reading its config.json too.

  The progress bar counts the bytes this process fetches.

  An orbax folder on ``gs://`` (``reader.orbax_folder``) carries no config.json: the
  preset ``preset_id`` names decides, and tensorstore reads the slices from the bucket.

  Example::

      model = load_stream(open_stream(None, source="gcs", model_path="gs://b/m"), mesh)
  """
  orbax_folder = getattr(reader, "orbax_folder", None)
  if orbax_folder is not None:
    return load_orbax_folder(orbax_folder, mesh, preset_id=preset_id, dtype=dtype,
                             param_dtype=param_dtype, sharding_rules=sharding_rules,
                             remat=remat, quantization=quantization,
                             tensorstore_context=reader.tensorstore_context)
  try:
    hf_config = reader.read_json("config.json")
    check_not_prequantized(reader.location, hf_config, reader.keys())
    spec, config = family_and_config(hf_config, preset_id)
    mesh = mesh or default_mesh()
    param_dtype = param_dtype or checkpoint_dtype(reader)
    abstract = abstract_model(
        config, param_dtype=param_dtype, dtype=dtype or param_dtype, mesh=mesh,
        sharding_rules=sharding_rules, remat=remat, quantization=quantization,
        scan_layers=scan_layers,
    )
    share = reader.total_bytes // jax.process_count()
    with progress_class()(total=share, unit="B", unit_scale=True, disable=None,
                          desc=f"stream {reader.location}") as bar:
      reader.progress = bar.update
      return load_checkpoint(abstract, reader, spec.param_table, mesh,
                             sharding_rules=sharding_rules)
  except BaseException:
    reader.close()  # load_checkpoint closes it once it has it
    raise


def _load_with_progress(abstract, reader, key_map, mesh, sharding_rules) -> nnx.Module:
  total = sum(v.size * np.dtype(v.dtype).itemsize
              for _, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param)))
  # disable=None: drawn on a terminal only, so logs and CI output stay clean.
  with progress_class()(total=total, unit="B", unit_scale=True, desc="load",
                        disable=None) as bar:
    return load_checkpoint(abstract, reader, key_map, mesh,
                           sharding_rules=sharding_rules, progress=bar.update)


def orbax_checkpoint(folder: str | os.PathLike, preset_id: str | None,
                     abstract: nnx.Module | None = None, *,
                     tensorstore_context: dict[str, Any] | None = None
                     ) -> tuple[Any, DecoderConfig, Any]:
  """``(family spec, preset config, OrbaxCheckpoint reader)`` of an orbax folder.

  The reader is None when ``abstract`` (whose parameter shapes it needs) is None;
  ``tensorstore_context`` adds tensorstore context resources to the reader's.
  Raises ConfigError when ``preset_id`` names no preset: orbax checkpoints carry no
  config, so the preset decides the architecture.
  """
  preset = preset_for(preset_id)
  if preset is None:
    raise ConfigError(
        f"{folder} is an orbax (Flax) checkpoint, which carries no config.json, and "
        f"{preset_id!r} names no preset. Pass the preset as model_id (CLI: --model-id), "
        "e.g. 'gemma2_2b_it', 'gemma3_1b' or 'google/gemma-3-1b-it'; `tunix-zoo list` "
        "shows them all.")
  config_id, config = preset
  spec = registry.family_of_config(config_id)
  table = spec.orbax_layout
  if table is None:
    raise CheckpointError(
        f"{folder} is an orbax checkpoint, but the {spec.category} family has no orbax "
        "layout (only the Gemma families do). Use its safetensors checkpoint.")
  if abstract is None:
    return spec, config, None
  expected = {}
  for path, var in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
    if not quantized.is_quantization_scale(var):
      expected[spec.param_table.checkpoint_key(module_path(path))] = quantized.dense_shape(var)
  return spec, config, orbax_io.open_checkpoint(folder, table, expected,
                                                 context=tensorstore_context)


def load_orbax_folder(
    folder: str | os.PathLike,
    mesh: Mesh | None = None,
    *,
    preset_id: str | None,
    dtype: Any = None,
    param_dtype: Any = None,
    sharding_rules: sharding.Rules | None = None,
    remat: str = "none",
    scan_layers: bool = False,
    quantization: Quantization | str | None = None,
    tensorstore_context: dict[str, Any] | None = None,
) -> nnx.Module:
  """Loads an orbax (Kaggle Flax Gemma) checkpoint folder with the preset's architecture.

  A ``gs://`` folder is read in place, tensorstore fetching the slices from the bucket;
  ``tensorstore_context`` adds context resources (e.g. ``gcs_request_concurrency``).

  Example::

      model = load_orbax_folder("/kaggle/gemma2-2b-it", mesh, preset_id="gemma2_2b_it")
  """
  _, config, _ = orbax_checkpoint(folder, preset_id)
  mesh = mesh or default_mesh()
  if param_dtype is None:
    leaves = orbax_io.read_metadata(orbax_io.find_checkpoint(folder))
    by_dtype: dict[np.dtype, int] = {}
    for meta in leaves.values():
      dt = np.dtype(meta.dtype)
      by_dtype[dt] = by_dtype.get(dt, 0) + int(np.prod(meta.shape)) * dt.itemsize
    param_dtype = max(by_dtype, key=by_dtype.get)
  dtype = dtype or param_dtype
  abstract = abstract_model(
      config, param_dtype=param_dtype, dtype=dtype, mesh=mesh, sharding_rules=sharding_rules,
      remat=remat, quantization=quantization, scan_layers=scan_layers,
  )
  spec, _, reader = orbax_checkpoint(folder, preset_id, abstract,
                                     tensorstore_context=tensorstore_context)
  return _load_with_progress(abstract, reader, spec.param_table, mesh, sharding_rules)
