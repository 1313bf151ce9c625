"""Where checkpoints come from: each :class:`ModelSource` turns a reference into a folder.

:func:`fetch` is the one entry point; it checks the arguments fit the source, then hands
over to one module per source (imported on first use, since their client libraries are
slow to import)::

    from tunix_zoo.sources import ModelSource, fetch

    folder = fetch("Qwen/Qwen3-0.6B")                                    # HF Hub
    folder = fetch("gemma3-1b-it", source=ModelSource.KAGGLE,
                   model_path="google/gemma-3/transformers/gemma-3-1b-it")
    folder = fetch("qwen3-0.6b", source=ModelSource.GCS, model_path="gs://b/qwen3-0.6b")
    folder = fetch(None, source=ModelSource.LOCAL, model_path="/ckpt/qwen3-0.6b")

:func:`open_stream` reads a GCS or Hub checkpoint in place instead, with no local copy::

    with open_stream(None, source=ModelSource.GCS, model_path="gs://b/qwen3") as ckpt:
      config = ckpt.read_json("config.json")

Every returned folder holds config.json and ``*.safetensors`` (plus tokenizer files when
the source has them), or an orbax checkpoint (a Kaggle Flax Gemma) and its
tokenizer.model. Download progress is drawn with tqdm unless ``TUNIX_ZOO_QUIET=1``.
"""

from __future__ import annotations

import enum
import importlib
import os
import pathlib
from typing import Any

from tunix_zoo.errors import SourceError
from tunix_zoo.sources._download import (cache_root, checksum_record_path, file_digest,
                                         read_checksums)

__all__ = ["ModelSource", "cache_root", "checksum_record_path", "fetch", "file_digest",
           "open_stream", "read_checksums"]


class ModelSource(str, enum.Enum):
  """Where :func:`fetch` looks for a checkpoint."""

  HUGGINGFACE = "huggingface"
  KAGGLE = "kaggle"
  GCS = "gcs"
  LOCAL = "local"


_ARG_USE = {
    "model_path": "is the Kaggle handle, the gs:// path or the local folder",
    "revision": "applies to HUGGINGFACE only",
    "token": "applies to HUGGINGFACE (a Hub token) and GCS (gcsfs credentials) only",
    "model_download_path": "does not apply to a LOCAL folder, which is used in place",
    "subfolder": "applies to HUGGINGFACE and LOCAL only",
    "cache_dir": "is the Hugging Face cache root and applies to HUGGINGFACE only",
    "force_download": "applies to HUGGINGFACE only",
}
_ACCEPTS = {
    ModelSource.HUGGINGFACE: {"revision", "token", "model_download_path", "subfolder",
                              "cache_dir", "force_download"},
    ModelSource.KAGGLE: {"model_path", "model_download_path"},
    ModelSource.GCS: {"model_path", "token", "model_download_path"},
    ModelSource.LOCAL: {"model_path", "subfolder"},
}
_FIXES = {
    "model_path": "For HUGGINGFACE pass the repo id as model_id and leave model_path unset.",
    "revision": ("For KAGGLE put the version at the end of the handle "
                 "('owner/model/framework/variation/3'); for GCS and LOCAL point to the "
                 "folder itself."),
    "token": ("For KAGGLE set KAGGLE_API_TOKEN (or KAGGLE_USERNAME and KAGGLE_KEY) in the "
              "environment."),
    "model_download_path": "Leave model_download_path unset for LOCAL.",
    "subfolder": "For GCS end the gs:// path with the sub-folder instead.",
    "cache_dir": "For KAGGLE set KAGGLEHUB_CACHE; for GCS pass model_download_path.",
    "force_download": "Delete the download first (`tunix-zoo cache remove MODEL`).",
}


def _source(source: ModelSource | str) -> ModelSource:
  try:
    return ModelSource(source)
  except ValueError:
    names = ", ".join(s.name for s in ModelSource)
    raise SourceError(f"[sources] unknown source {source!r}. Use one of ModelSource.{{{names}}}"
                      ".") from None


def fetch(model_id: str | None, *, source: ModelSource | str = ModelSource.HUGGINGFACE,
          model_path: str | os.PathLike[str] | None = None,
          model_download_path: str | os.PathLike[str] | None = None,
          revision: str | None = None, token: str | None = None,
          local_files_only: bool = False, verify: bool = False,
          subfolder: str | None = None, variant: str | None = None,
          cache_dir: str | os.PathLike[str] | None = None,
          force_download: bool = False) -> pathlib.Path:
  """Returns a local folder holding config.json + ``*.safetensors`` (+ tokenizer files).

  Args:
    model_id: the HF repo id for HUGGINGFACE; for the other sources only a name (it may
      be None), except that LOCAL falls back to it when ``model_path`` is None.
    source: where to look.
    model_path: the Kaggle handle ``owner/model/framework/variation[/version]``, the
      ``gs://bucket/prefix`` path, or the local folder.
    model_download_path: download straight into this folder instead of the source's
      cache (HUGGINGFACE, KAGGLE, GCS).
    revision: Hub branch, tag or commit (HUGGINGFACE).
    token: Hub token (HUGGINGFACE) or gcsfs credentials (GCS). Never logged.
    local_files_only: make no request; use what earlier calls downloaded (for the Hub,
      ``HF_HUB_OFFLINE=1`` does the same).
    verify: re-hash every file already downloaded against the checksum its server
      advertised (new downloads are always checked); bad files are fetched again.
    subfolder: the model lives in this folder of the repo (HUGGINGFACE) or of
      ``model_path`` (LOCAL); the returned folder is that one.
    variant: download only the ``model.<variant>.safetensors`` weights (and their index
      ``model.safetensors.index.<variant>.json``) of a Hub repo; load with the same
      ``variant``.
    cache_dir: the Hugging Face cache root to use instead of ``HF_HUB_CACHE``.
    force_download: download again even what the cache holds (HUGGINGFACE).

  Returns:
    The folder, absolute.

  Raises:
    SourceError: arguments that do not fit the source, a malformed id, handle or path,
      or any failure of the source, with what to do about it.

  Example::

      folder = fetch("Qwen/Qwen3-0.6B", revision="main")
  """
  source = _source(source)
  given = {"model_path": model_path, "revision": revision, "token": token,
           "model_download_path": model_download_path, "subfolder": subfolder,
           "cache_dir": cache_dir, "force_download": force_download or None}
  for arg, value in given.items():
    if value is not None and arg not in _ACCEPTS[source]:
      raise SourceError(
          f"[{source.value}] {model_id or model_path}: {arg} {_ARG_USE[arg]}, not to "
          f"source={source.name}. {_FIXES[arg]}")
  if source is ModelSource.HUGGINGFACE:
    if model_id is None:
      raise SourceError("[huggingface] model_id is None: the Hub needs a repo id. Pass e.g. "
                        "'Qwen/Qwen3-0.6B', or choose another source with model_path.")
    module = importlib.import_module("tunix_zoo.sources.huggingface")
    return module.fetch(model_id, revision=revision, token=token,
                        download_dir=model_download_path, local_files_only=local_files_only,
                        verify=verify, subfolder=subfolder, variant=variant,
                        cache_dir=cache_dir, force_download=force_download)
  if source is ModelSource.LOCAL:
    path = model_path if model_path is not None else model_id
    if path is None:
      raise SourceError("[local] no folder given. Pass model_path=<folder holding "
                        "config.json and *.safetensors>.")
    if subfolder:
      path = os.path.join(path, importlib.import_module(
          "tunix_zoo.sources._download").check_relative_name(
              subfolder, source=source.value, ref=os.fspath(path)))
    return importlib.import_module("tunix_zoo.sources.local").fetch(path)
  if model_path is None:
    example = ("'google/gemma-3/transformers/gemma-3-1b-it'" if source is ModelSource.KAGGLE
               else "'gs://my-bucket/checkpoints/qwen3-0.6b'")
    raise SourceError(f"[{source.value}] {model_id}: model_path is required for "
                      f"source={source.name}. Pass model_path={example}.")
  if source is ModelSource.KAGGLE:
    return importlib.import_module("tunix_zoo.sources.kaggle").fetch(
        os.fspath(model_path), download_dir=model_download_path,
        local_files_only=local_files_only, verify=verify)
  return importlib.import_module("tunix_zoo.sources.gcs").fetch(
      os.fspath(model_path), download_dir=model_download_path, token=token,
      local_files_only=local_files_only, verify=verify)


def open_stream(model_id: str | None, *, source: ModelSource | str = ModelSource.HUGGINGFACE,
                model_path: str | os.PathLike[str] | None = None,
                revision: str | None = None, token: str | None = None,
                concurrency: int | None = None) -> Any:
  """A :class:`~tunix_zoo.checkpoint.remote_safetensors.RemoteCheckpoint` reading the
  checkpoint straight from GCS (``model_path="gs://..."``) or the Hub (``model_id``), with
  no local copy; ``concurrency`` ranges are fetched at a time (default 16). A ``gs://``
  prefix holding an orbax checkpoint gives an :class:`~tunix_zoo.sources.stream.
  OrbaxFolder` instead, which tensorstore reads in place.

  Raises:
    SourceError: a source that cannot stream, arguments that do not fit it, or any
      failure of the source (missing bucket or repo, refused credentials, ...).

  Example::

      with open_stream("Qwen/Qwen3-0.6B") as ckpt:
        print(ckpt.total_bytes)
  """
  source = _source(source)
  if source not in (ModelSource.GCS, ModelSource.HUGGINGFACE):
    raise SourceError(f"[{source.value}] {model_id or model_path}: streaming reads GCS and "
                      "the HF Hub only. Drop stream=True (CLI: --stream) for this source.")
  for arg, value in {"model_path": model_path, "revision": revision, "token": token}.items():
    if value is not None and arg not in _ACCEPTS[source]:
      raise SourceError(
          f"[{source.value}] {model_id or model_path}: {arg} {_ARG_USE[arg]}, not to "
          f"source={source.name}. {_FIXES[arg]}")
  if source is ModelSource.HUGGINGFACE and model_id is None:
    raise SourceError("[huggingface] model_id is None: the Hub needs a repo id. Pass e.g. "
                      "'Qwen/Qwen3-0.6B'.")
  if source is ModelSource.GCS and model_path is None:
    raise SourceError(f"[gcs] {model_id}: model_path is required for source=GCS. Pass "
                      "model_path='gs://my-bucket/checkpoints/qwen3-0.6b'.")
  if concurrency is not None and (isinstance(concurrency, bool) or not isinstance(
      concurrency, int) or concurrency < 1):
    raise SourceError(f"[{source.value}] stream concurrency must be a positive int, got "
                      f"{concurrency!r}. Pass e.g. 16.")
  return importlib.import_module("tunix_zoo.sources.stream").open_remote(
      source, model_id, model_path=model_path, revision=revision, token=token,
      concurrency=concurrency)
