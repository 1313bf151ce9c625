"""Writes a tunix_zoo model back out as a Hugging Face checkpoint folder.

The folder holds safetensors named by the same key map the loader reads (so export then
load is exact by construction), a ``config.json`` transformers reads, and optionally the
tokenizer files of the checkpoint the model came from::

    model = load_folder("/ckpt/Qwen3-0.6B", mesh)
    ...  # fine-tune
    save_pretrained(model, "/ckpt/qwen3-sft", dtype=jnp.bfloat16, source_dir="/ckpt/Qwen3-0.6B")
    AutoModelForCausalLM.from_pretrained("/ckpt/qwen3-sft")  # transformers reads it as is

Memory: parameters are copied to the host one at a time, shard by shard, so host memory
holds about one parameter (plus the writer's copy buffer) whatever the model's size.

Atomicity: everything is written into a hidden staging folder next to ``out_dir`` (same
filesystem) and renamed into place at the end, so ``out_dir`` either does not exist or
is complete. Replacing an existing ``out_dir`` (``overwrite=True``) swaps the two folders
in one step with Linux's ``renameat2(RENAME_EXCHANGE)``, so ``out_dir`` always holds
the old or the new checkpoint. Where that call is missing (other systems, filesystems
without it), the old folder is first renamed to a hidden ``.<name>.replaced-*`` folder;
a process killed between the two renames leaves it there, and the next
``save_pretrained`` to the same ``out_dir`` puts it back before anything else. An
exception removes the staging folder; a hard kill can leave a hidden
``.<name>.partial-*`` folder, which never passes for a checkpoint and is deleted by the
next successful export to the same ``out_dir`` (each staging folder is ``flock``-ed
while in use, so a concurrent export's is left alone). A full disk or a read-only
folder is an ``ExportError`` naming the folder.

Several processes (multi-host): every process must call ``save_pretrained`` with the same
arguments, as with any collective. A tensor whose shards on process 0's devices already
cover it is copied from those shards; any other tensor is gathered with
``multihost_utils.process_allgather``, one tensor at a time, which is a collective every
process joins (it briefly holds that one tensor whole on every device and host). Only
process 0 touches the filesystem; it decides whether ``out_dir`` may
be written and whether the export succeeded, and broadcasts both, so every process
raises or returns together and none returns before the folder exists.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import fcntl
import json
import logging
import os
import pathlib
import shutil
import sys
import uuid
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from tunix_zoo import registry
from tunix_zoo.build import module_path
from tunix_zoo.checkpoint.push import check_push_arguments, push_folder
from tunix_zoo.checkpoint.reader import SAFETENSORS_DTYPES
from tunix_zoo.checkpoint.writer import ShardedWriter, parse_size
from tunix_zoo.errors import ExportError
from tunix_zoo.layers.stacked import unrolled_path, unrolled_paths

log = logging.getLogger(__name__)

__all__ = ["save_pretrained", "TOKENIZER_FILES"]

# Files of a checkpoint folder that belong with the weights but are not made from them.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "tokenizer.model",
)
# Chat templates as transformers 5 saves them: one file, and named ones in a folder.
TEMPLATE_PATTERNS = ("*.jinja", "additional_chat_templates/*.jinja")


def save_pretrained(
    model: nnx.Module,
    out_dir: str | os.PathLike[str],
    *,
    dtype: Any = None,
    max_shard_size: int | str = "5GB",
    source_dir: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    push_to_hub: bool = False,
    repo_id: str | None = None,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str | None = None,
) -> pathlib.Path:
  """Writes ``model`` to ``out_dir`` as an HF checkpoint; returns the folder's path.

  Args:
    model: a tunix_zoo model (anything ``AutoModel`` returns), on any mesh.
    out_dir: the folder to create. An existing empty folder is filled; a non-empty one is
      replaced only with ``overwrite=True``.
    dtype: the dtype of the written floating-point weights (e.g. ``jnp.bfloat16``); by
      default each parameter keeps its own.
    max_shard_size: the largest safetensors file, e.g. ``"5GB"`` or ``"512MiB"``; larger
      checkpoints are split into ``model-0000i-of-0000N.safetensors`` plus
      ``model.safetensors.index.json``.
    source_dir: a checkpoint folder whose tokenizer, chat template and generation
      config files are copied along (the ones that exist).
    overwrite: replace a non-empty ``out_dir``.
    push_to_hub: then upload the folder to the Hub as one commit (process 0 only; see
      :func:`tunix_zoo.checkpoint.push.push_folder`).
    repo_id: the Hub repo to push to (default: ``out_dir``'s name), created if missing.
    token: Hub token with write access (default ``HF_TOKEN`` or the stored login).
    private: visibility of a repo the push creates.
    commit_message: of the Hub commit.

  Raises:
    ExportError: ``out_dir`` is a file or a non-empty folder (without ``overwrite``),
      ``source_dir`` is not a folder, ``dtype`` cannot be written, the model has
      unmerged LoRA adapters, or the push failed (the folder is then complete on disk).

  Example::

      save_pretrained(model, "/ckpt/my-sft", dtype=jnp.bfloat16, source_dir=original_folder)
  """
  if not isinstance(out_dir, (str, os.PathLike)) or not os.fspath(out_dir):
    raise ExportError(f"out_dir={out_dir!r} is not a folder path; pass e.g. '/ckpt/my-sft'.")
  if not isinstance(overwrite, bool):
    raise ExportError(f"overwrite={overwrite!r} must be True or False.")
  out = pathlib.Path(out_dir).absolute()
  check_push_arguments(push_to_hub, repo_id, token, private)
  target_dtype = _target_dtype(dtype)
  max_shard_size = parse_size(max_shard_size)
  config = getattr(model, "config", None)
  if config is None or not hasattr(config, "to_hf_config"):
    raise ExportError(
        f"save_pretrained exports tunix_zoo models, which carry a .config; got "
        f"{type(model).__name__}. Load or build the model with AutoModel."
    )
  if nnx.state(model, nnx.LoRAParam):
    raise ExportError(
        "The model has LoRA adapters, which an HF checkpoint has no place for: "
        "tunix_zoo.lora.merge_lora(model) folds them into the weights first, or "
        "tunix_zoo.lora.save_lora_adapter writes them alone in PEFT's format."
    )
  quantized = [module_path(path[:-1]) for path, var in nnx.to_flat_state(nnx.state(model))
               if var.get_metadata().get("quantization") is not None]
  if quantized:
    raise ExportError(
        f"{quantized[0]} (and {len(quantized) - 1} more Linear layers) hold quantized "
        "weights, which an HF checkpoint of this family has no place for. Export the "
        "model loaded without quantization (save_lora_adapter saves QLoRA adapters).")
  tensors = _export_tensors(model, target_dtype)
  hf_config = {**config.to_hf_config(), **_dtype_fields(tensors)}
  source = pathlib.Path(source_dir).absolute() if source_dir is not None else None

  staging, writer, problem = None, None, None
  if jax.process_index() == 0:
    try:
      staging, writer = _prepare_staging(out, overwrite, source, hf_config, max_shard_size,
                                         _write_plan(tensors))
    except Exception as e:
      problem = e
  if not _all_agree(problem is None):
    raise problem or ExportError(f"Process 0 cannot export to {out}; see its error.")
  try:
    failure = _stream_tensors(tensors, writer)
    if failure is not None:
      raise failure
    if writer is not None:
      writer.finish()
      move_into_place(staging, out)
  except BaseException as e:
    if writer is not None:
      writer.abort()
      shutil.rmtree(staging, ignore_errors=True)
      _release(staging)
    if isinstance(e, Exception):
      _all_agree(False)  # The other processes wait for this verdict below.
    if isinstance(e, OSError):
      raise _os_error(e, out.parent) from e
    raise
  if not _all_agree(True):
    raise ExportError(f"Exporting to {out} failed on process 0; see its error.")
  log.info("Exported %d parameters to %s", len(tensors), out)
  if push_to_hub and jax.process_index() == 0:
    url = push_folder(out, repo_id or out.name, token=token, private=private,
                      commit_message=commit_message)
    log.info("Pushed %s to %s", out, url)
  return out


@dataclasses.dataclass(frozen=True)
class _ExportTensor:
  """One model parameter and where it goes."""

  # One key, or (stacked) one per row of the leading axis, e.g. one per expert.
  keys: tuple[str, ...]
  stacked: bool
  value: Any
  dtype: np.dtype  # as written
  # A scanned model's stacked layer parameter: the slice of ``value`` that is this tensor.
  layer: int | None = None

  @property
  def shape(self) -> tuple[int, ...]:
    shape = tuple(self.value.shape[1:] if self.layer is not None else self.value.shape)
    return shape[1:] if self.stacked else shape

  def device_value(self) -> Any:
    """The tensor, sliced out of its stacked layer parameter on the devices (so the host
    never holds more than one layer's tensor)."""
    if self.layer is None:
      return self.value
    return layer_slice(self.value, np.int32(self.layer))


@jax.jit
def layer_slice(value: jax.Array, layer: jax.Array) -> jax.Array:
  """Slice ``layer`` of a stacked layer parameter, on its devices (one compiled program
  per shape, whatever the layer)."""
  return jax.lax.dynamic_index_in_dim(value, layer, 0, keepdims=False)


def _export_tensors(model: nnx.Module, target_dtype: np.dtype | None) -> list[_ExportTensor]:
  """Every parameter with the checkpoint keys the loader reads it from."""
  key_map = registry.family_for_config_class(type(model.config)).param_table
  tensors = []
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    name, value, metadata = module_path(path), var.get_value(), var.get_metadata()
    per_layer = unrolled_paths(name, metadata)
    shape = value.shape if per_layer is None else value.shape[1:]
    for layer, layer_name in enumerate(per_layer or [unrolled_path(name, metadata)]):
      per_row = key_map.stacked_keys(layer_name, shape[0]) if shape else None
      tensors.append((unrolled_order(layer_name), _ExportTensor(
          keys=tuple(per_row or [key_map.checkpoint_key(layer_name)]),
          stacked=per_row is not None,
          value=value,
          dtype=_written_dtype(np.dtype(value.dtype), target_dtype),
          layer=None if per_layer is None else layer,
      )))
  # A scanned model writes the tensors in the unrolled model's order, so the files match.
  return [tensor for _, tensor in sorted(tensors, key=lambda item: item[0])]


def unrolled_order(name: str) -> tuple[Any, ...]:
  """The position of parameter ``name`` in NNX's state order (layer numbers as numbers)."""
  return tuple((0, int(part), "") if part.isdigit() else (1, 0, part)
               for part in name.split("."))


def _write_plan(tensors: list[_ExportTensor]) -> list[tuple[str, tuple[int, ...], np.dtype]]:
  """Every written tensor's key, shape and dtype, in writing order."""
  return [(key, tensor.shape, tensor.dtype) for tensor in tensors for key in tensor.keys]


def _stream_tensors(tensors: list[_ExportTensor], writer: ShardedWriter | None) -> Exception | None:
  """Copies each tensor to the host and hands it to ``writer``, one tensor at a time.

  Every process runs this (gathers can be collectives); only process 0 has a writer.
  With several processes a write error is returned rather than raised, after joining
  every remaining gather, so that the other processes finish too.
  """
  failure: Exception | None = None
  for tensor in tensors:
    host = host_copy(tensor.device_value(), tensor.dtype,
                     assemble=writer is not None and failure is None)
    if host is not None:
      try:
        pieces = zip(tensor.keys, host) if tensor.stacked else [(tensor.keys[0], host)]
        for key, piece in pieces:
          writer.add(key, piece)
      except Exception as e:
        if jax.process_count() == 1:
          raise
        failure = e
    # Freed before the next tensor is copied, so only one is ever held.
    del host
  return failure


def _target_dtype(dtype: Any) -> np.dtype | None:
  if dtype is None:
    return None
  try:
    target = np.dtype(dtype)
  except TypeError as e:
    raise ExportError(f"dtype {dtype!r} is not a dtype; pass e.g. jnp.bfloat16.") from e
  if not jnp.issubdtype(target, jnp.floating) or target not in SAFETENSORS_DTYPES.values():
    raise ExportError(
        f"Cannot export weights as {target}: pass a floating dtype safetensors holds, such "
        "as jnp.bfloat16, jnp.float16 or jnp.float32."
    )
  return target


def _written_dtype(dtype: np.dtype, target: np.dtype | None) -> np.dtype:
  """The dtype a parameter is written in: ``target`` for floating ones, else its own."""
  return target if target is not None and jnp.issubdtype(dtype, jnp.floating) else dtype


def _dtype_fields(tensors: list[_ExportTensor]) -> dict[str, str]:
  """config.json's dtype keys: the dtype holding most bytes, in both spellings."""
  by_dtype: dict[np.dtype, int] = {}
  for tensor in tensors:
    nbytes = len(tensor.keys) * int(np.prod(tensor.shape)) * tensor.dtype.itemsize
    by_dtype[tensor.dtype] = by_dtype.get(tensor.dtype, 0) + nbytes
  name = max(by_dtype, key=by_dtype.get).name if by_dtype else "float32"
  # transformers 4 reads "torch_dtype", transformers 5 "dtype".
  return {"torch_dtype": name, "dtype": name}


def new_staging_folder(out: pathlib.Path, overwrite: bool) -> pathlib.Path:
  """Checks that ``out`` may be written, then makes a hidden staging folder beside it.

  Fill the staging folder, then :func:`move_into_place`; on failure, remove it.
  """
  if out.exists() and not out.is_dir():
    raise ExportError(f"{out} exists and is not a folder; choose another out_dir.")
  _recover_replaced(out)
  if out.is_dir() and any(out.iterdir()) and not overwrite:
    raise ExportError(
        f"{out} already exists and is not empty; pass overwrite=True to replace it, or "
        "choose another out_dir."
    )
  try:
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:12]}"
    staging.mkdir()  # Not tempfile.mkdtemp: its 0700 mode would end up on out_dir.
  except OSError as e:
    raise _os_error(e, out.parent) from e
  _hold(staging)
  return staging


def _os_error(e: OSError, where: pathlib.Path) -> ExportError:
  """An ExportError saying which folder refused the write and what to do."""
  if e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
    return ExportError(f"Cannot write the export in {where}: {e.strerror} ({e.filename or where})."
                       " Free space there (or raise the file size limit), or choose an out_dir "
                       "on another disk; nothing was left half-written.")
  if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
    return ExportError(f"Cannot write in {where}: {e.strerror}. Choose an out_dir you can write "
                       "to, or fix the folder's permissions; nothing was written.")
  return ExportError(f"Cannot write the export in {where}: {e}.")


# Staging folders this process is filling, each with its open, flock-ed descriptor.
_held: dict[pathlib.Path, int] = {}


def _hold(staging: pathlib.Path) -> None:
  fd = os.open(staging, os.O_RDONLY)
  fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  _held[staging] = fd


def discard_staging(staging: pathlib.Path) -> None:
  """Removes a staging folder from :func:`new_staging_folder` that will not be moved."""
  shutil.rmtree(staging, ignore_errors=True)
  _release(staging)


def _release(staging: pathlib.Path) -> None:
  fd = _held.pop(staging, None)
  if fd is not None:
    os.close(fd)


def _recover_replaced(out: pathlib.Path) -> None:
  """Puts back the previous checkpoint that a process killed mid-replacement left hidden."""
  if out.exists():
    return
  retired = sorted(out.parent.glob(f".{out.name}.replaced-*"), key=lambda p: p.stat().st_mtime)
  if retired:
    log.warning("%s is missing and %s holds the checkpoint an interrupted export was "
                "replacing; restoring it.", out, retired[-1])
    os.replace(retired[-1], out)


def _remove_stale_staging(out: pathlib.Path) -> None:
  """Deletes the staging and retired folders of earlier, killed exports to ``out``."""
  stale_folders = [*out.parent.glob(f".{out.name}.partial-*"),
                   *out.parent.glob(f".{out.name}.replaced-*")]
  for stale in stale_folders:
    if not stale.is_dir() or stale in _held:
      continue
    try:
      fd = os.open(stale, os.O_RDONLY)
    except OSError:
      continue
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # fails while an export fills it
    except OSError:
      os.close(fd)
      continue
    shutil.rmtree(stale, ignore_errors=True)
    os.close(fd)


def _prepare_staging(
    out: pathlib.Path,
    overwrite: bool,
    source: pathlib.Path | None,
    hf_config: dict[str, Any],
    max_shard_size: int,
    plan: list[tuple[str, tuple[int, ...], np.dtype]],
) -> tuple[pathlib.Path, ShardedWriter]:
  """Checks ``out``, then makes the staging folder with everything but the weights.

  Everything that can fail before the weights is done here, while the other processes
  wait for the verdict rather than for gathers.
  """
  if source is not None and not source.is_dir():
    raise ExportError(
        f"source_dir {source} is not a folder; pass the checkpoint folder holding the "
        "tokenizer files, or leave source_dir out."
    )
  staging = new_staging_folder(out, overwrite)
  try:
    _write_json(staging / "config.json", hf_config)
    if source is not None:
      _copy_tokenizer_files(source, staging)
    return staging, ShardedWriter(staging, max_shard_size, plan=plan)
  except BaseException as e:
    shutil.rmtree(staging, ignore_errors=True)
    _release(staging)
    if isinstance(e, OSError):
      raise _os_error(e, out.parent) from e
    raise


def _all_agree(ok: bool) -> bool:
  """Process 0's ``ok``, on every process (a collective when there are several)."""
  if jax.process_count() == 1:
    return ok
  return bool(multihost_utils.broadcast_one_to_all(np.asarray(ok)))


def host_copy(value: Any, dtype: np.dtype, *, assemble: bool) -> np.ndarray | None:
  """The whole of ``value`` as host numpy of ``dtype`` when ``assemble``; else None.

  Every process must call this for the same tensors in the same order: when process 0's
  devices do not hold all of a tensor, gathering it is a collective.
  """
  if not isinstance(value, jax.Array):
    return np.asarray(value).astype(dtype, copy=False) if assemble else None
  if not _process_zero_covers(value):
    gathered = multihost_utils.process_allgather(value, tiled=True)
    return np.asarray(gathered).astype(dtype, copy=False) if assemble else None
  if not assemble:
    return None
  out = np.empty(value.shape, dtype)
  copied = set()
  for shard in value.addressable_shards:
    block = _block(shard.index, value.shape)
    if block not in copied:  # Replicas of a block hold the same data; copy it once.
      copied.add(block)
      out[shard.index] = np.asarray(shard.data)
  return out


def _process_zero_covers(value: jax.Array) -> bool:
  """Whether the devices of process 0 together hold every element of ``value``.

  Decided from the sharding alone, so every process reaches the same answer. The blocks
  of a sharding are equal or disjoint, so distinct blocks cover the array exactly when
  their sizes add up to its size.
  """
  if value.is_fully_addressable:
    return True
  blocks = {
      _block(index, value.shape)
      for device, index in value.sharding.devices_indices_map(value.shape).items()
      if device.process_index == 0
  }
  covered = sum(int(np.prod([stop - start for start, stop in block])) for block in blocks)
  return covered == int(np.prod(value.shape))


def _block(index: tuple[slice, ...], shape: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
  return tuple(s.indices(dim)[:2] for s, dim in zip(index, shape))


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def exchange_paths(a: pathlib.Path, b: pathlib.Path) -> bool:
  """Swaps two existing paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``).

  Returns False, having changed nothing, where the system or filesystem lacks the call.
  """
  renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None) \
      if sys.platform == "linux" else None
  if renameat2 is None:  # not Linux, or glibc older than 2.28
    return False
  if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
    return True
  code = ctypes.get_errno()
  if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
    return False
  raise OSError(code, os.strerror(code), str(b))


def move_into_place(staging: pathlib.Path, out: pathlib.Path) -> None:
  """Renames ``staging`` to ``out``, replacing a previous ``out`` (checked replaceable)
  atomically where the system allows (see the module docstring); then deletes what
  earlier killed exports to ``out`` left behind."""
  try:
    if not out.is_dir() or not any(out.iterdir()):
      os.replace(staging, out)  # Atomic; replaces an empty folder on POSIX.
    elif exchange_paths(staging, out):
      shutil.rmtree(staging, ignore_errors=True)  # now the previous checkpoint
    else:
      retired = out.parent / f".{out.name}.replaced-{uuid.uuid4().hex[:12]}"
      os.replace(out, retired)
      try:
        os.replace(staging, out)
      except BaseException:
        os.replace(retired, out)
        raise
      shutil.rmtree(retired, ignore_errors=True)
  finally:
    _release(staging)
  _sync_folder(out.parent)
  _remove_stale_staging(out)


def _sync_folder(folder: pathlib.Path) -> None:
  """Makes a rename in ``folder`` durable (a no-op where folders cannot be opened)."""
  try:
    fd = os.open(folder, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass  # Some filesystems refuse fsync on folders; the rename itself has happened.
  finally:
    os.close(fd)


def _write_json(path: pathlib.Path, content: dict[str, Any]) -> None:
  with open(path, "w", encoding="utf-8") as f:
    f.write(json.dumps(content, indent=2, sort_keys=True) + "\n")
    f.flush()
    os.fsync(f.fileno())


def _copy_tokenizer_files(source: pathlib.Path, staging: pathlib.Path) -> None:
  names = [name for name in TOKENIZER_FILES if (source / name).is_file()]
  names += sorted(
      str(path.relative_to(source)) for pattern in TEMPLATE_PATTERNS
      for path in source.glob(pattern) if path.is_file()
  )
  if not names:
    log.warning("%s holds no tokenizer files; the export has none.", source)
  for name in names:
    (staging / name).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source / name, staging / name)
