"""Reading safetensors files with numpy alone.

The loader hands ``jax.make_array_from_callback`` a callback that must return host numpy
for exactly one device's slice of one tensor. ``safetensors``' numpy API reads whole
tensors (BF16 included, as ``ml_dtypes.bfloat16``) and its flax/jax APIs materialise on
the default device, so this module parses the format itself: an 8-byte little-endian
header length, a JSON header naming each tensor's dtype, shape and byte range, then the
raw little-endian bytes. Slices are copied out of a read-only memory map, so host memory
stays bounded by the slice::

    with CheckpointFiles("/ckpt/Qwen3-0.6B") as files:
      shape = files.shape("model.embed_tokens.weight")
      rows = files.read("model.embed_tokens.weight", (slice(0, 1024), slice(None)))

:mod:`tunix_zoo.checkpoint.writer` writes the files.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import mmap
import os
import struct
import threading
from typing import Any, Iterable

import ml_dtypes
import numpy as np

from tunix_zoo.errors import CheckpointError

SINGLE_FILE_NAME = "model.safetensors"
INDEX_FILE_NAME = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")

SAFETENSORS_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E4M3FNUZ": np.dtype(ml_dtypes.float8_e4m3fnuz),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "F8_E5M2FNUZ": np.dtype(ml_dtypes.float8_e5m2fnuz),
    "F8_E8M0": np.dtype(ml_dtypes.float8_e8m0fnu),
    "C64": np.dtype(np.complex64),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U64": np.dtype(np.uint64),
    "U32": np.dtype(np.uint32),
    "U16": np.dtype(np.uint16),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}

# The reference implementation refuses larger headers; so do we, before allocating one.
MAX_HEADER_BYTES = 100_000_000
# numpy's limit on an array's bytes (strides are int64).
_MAX_BYTES = 2**63
# A slice is copied in blocks of about this many source bytes, and each block's pages are
# unmapped after the copy, so reading a column slice of a huge tensor does not leave the
# whole tensor resident.
_BLOCK_BYTES = 64 << 20
_ALIGNMENT = 64


@dataclasses.dataclass(frozen=True)
class TensorInfo:
  """One tensor's entry in a safetensors header (local and remote readers share it)."""

  dtype: np.dtype
  shape: tuple[int, ...]
  start: int  # Absolute offset in the file.
  nbytes: int


def json_object_without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
  """``json.loads`` hook refusing a key given twice (a header could otherwise say two
  things about one tensor)."""
  result = {}
  for key, value in pairs:
    if key in result:
      raise ValueError(f"the key {key!r} appears twice")
    result[key] = value
  return result


def _is_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def suggest_key(key: str, known: Iterable[str]) -> str:
  """A ' Did you mean ...?' hint naming the closest keys in ``known`` (empty if none)."""
  close = difflib.get_close_matches(key, list(known), n=3)
  return f" Did you mean {', '.join(map(repr, close))}?" if close else ""


def parse_header(path: str, file_size: int, raw: bytes) -> tuple[dict[str, TensorInfo],
                                                                   dict[str, str]]:
  """Validates a raw JSON header against the file size; returns tensors and metadata."""
  redownload = "The file is corrupt or truncated: download or export it again."
  try:
    header = json.loads(raw.decode("utf-8"), object_pairs_hook=json_object_without_duplicates)
  except RecursionError:
    raise CheckpointError(f"{path}: the safetensors header nests JSON too deeply to be a "
                          f"header. {redownload}") from None
  except ValueError as e:  # Covers UnicodeDecodeError and JSONDecodeError.
    raise CheckpointError(f"{path}: the safetensors header is not valid JSON ({e}). "
                          f"{redownload}") from e
  if not isinstance(header, dict):
    raise CheckpointError(f"{path}: the safetensors header is a JSON {type(header).__name__}, "
                          f"not an object. {redownload}")
  metadata = header.pop("__metadata__", None) or {}
  if not isinstance(metadata, dict) or not all(
      isinstance(value, str) for value in metadata.values()):
    raise CheckpointError(f"{path}: '__metadata__' must map strings to strings, got "
                          f"{metadata!r}. {redownload}")

  data_start = 8 + len(raw)
  data_size = file_size - data_start
  tensors = {}
  for key, entry in header.items():
    where = f"{path}: tensor {key!r}"
    if not isinstance(entry, dict):
      raise CheckpointError(f"{where} has header entry {entry!r}, not an object. {redownload}")
    dtype_name, shape, offsets = (entry.get(k) for k in ("dtype", "shape", "data_offsets"))
    if not isinstance(dtype_name, str) or dtype_name not in SAFETENSORS_DTYPES:
      raise CheckpointError(
          f"{where} has dtype {dtype_name!r}, which tunix_zoo cannot read (it reads "
          f"{', '.join(SAFETENSORS_DTYPES)}). Convert the checkpoint to one of them, "
          f"e.g. bfloat16.")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
      raise CheckpointError(f"{where} has shape {shape!r}, not a list of sizes. {redownload}")
    if math.prod(d for d in shape if d) * SAFETENSORS_DTYPES[dtype_name].itemsize >= _MAX_BYTES:
      raise CheckpointError(f"{where} has shape {shape!r}, too large for any array (even with a "
                            f"zero dimension, its strides overflow). {redownload}")
    if (not isinstance(offsets, list) or len(offsets) != 2 or
        not all(_is_int(o) for o in offsets) or not 0 <= offsets[0] <= offsets[1]):
      raise CheckpointError(f"{where} has data_offsets {offsets!r}, not [begin, end] with "
                            f"0 <= begin <= end. {redownload}")
    dtype = SAFETENSORS_DTYPES[dtype_name]
    expected = math.prod(shape) * dtype.itemsize
    begin, end = offsets
    if end - begin != expected:
      raise CheckpointError(
          f"{where} spans {end - begin} bytes, but shape {shape} of {dtype_name} needs "
          f"{expected}. {redownload}")
    if end > data_size:
      raise CheckpointError(
          f"{where} ends at byte {data_start + end}, but the file has only {file_size} "
          f"bytes. {redownload}")
    tensors[key] = TensorInfo(dtype, tuple(shape), data_start + begin, expected)
  _check_tiling(path, header, data_size, redownload)
  return tensors, metadata


def _check_tiling(path: str, header: dict[str, Any], data_size: int, redownload: str) -> None:
  """Raises unless the tensors' byte ranges cover the data region exactly once, as the
  reference implementation requires: an overlap makes two tensors share bytes, a gap
  holds bytes no tensor owns."""
  position, previous = 0, None
  for key, (begin, end) in sorted(((k, tuple(e["data_offsets"])) for k, e in header.items()),
                                  key=lambda item: item[1]):
    if begin != position:
      what = (f"overlaps {previous!r}" if begin < position else
              f"leaves bytes {position}-{begin} of the data region that no tensor covers")
      raise CheckpointError(f"{path}: tensor {key!r} at data_offsets [{begin}, {end}] {what}. "
                            f"{redownload}")
    position, previous = end, key
  if position != data_size:
    raise CheckpointError(f"{path}: the tensors end at byte {position} of the data region, "
                          f"but it holds {data_size} bytes; no tensor covers the rest. "
                          f"{redownload}")


def normalize_index(index: tuple[slice, ...] | None, shape: tuple[int, ...],
                     where: str) -> tuple[slice, ...]:
  """``index`` as one step-1 slice per axis of ``shape``, or a CheckpointError."""
  if index is None:
    index = ()
  elif not isinstance(index, tuple):
    index = (index,)
  if len(index) > len(shape) or not all(isinstance(s, slice) for s in index):
    raise ValueError(f"{where}: index {index!r} is not a tuple of at most {len(shape)} "
                     f"slices for shape {shape}.")
  return index + (slice(None),) * (len(shape) - len(index))


def _release_pages(mapped: mmap.mmap, start: int, end: int) -> None:
  """Unmaps pages of a read-only file mapping; they stay in the page cache."""
  aligned = start - start % mmap.PAGESIZE
  if end > aligned:
    mapped.madvise(mmap.MADV_DONTNEED, aligned, end - aligned)


def aligned_empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
  """An uninitialised array whose data starts on a 64-byte boundary.

  JAX's CPU client adopts such buffers without copying (it copies unaligned ones), so a
  slice read for a CPU device is never held twice.

  Example::

      out = aligned_empty((1024, 64), np.dtype(np.float32))
      out[...] = source_rows
  """
  nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
  raw = np.empty(nbytes + _ALIGNMENT, np.uint8)
  offset = (-raw.ctypes.data) % _ALIGNMENT
  return raw[offset:offset + nbytes].view(dtype).reshape(shape)


def _copy_slice(mapped: mmap.mmap, info: TensorInfo, index: tuple[slice, ...]) -> np.ndarray:
  source = np.ndarray(info.shape, info.dtype, buffer=mapped, offset=info.start)
  selected = source[index]
  out = aligned_empty(selected.shape, np.dtype(info.dtype))
  if out.size == 0:
    return out
  if source.ndim == 0:
    out[...] = selected
    _release_pages(mapped, info.start, info.start + info.nbytes)
    return out
  rows = range(*index[0].indices(info.shape[0]))
  row_bytes = source.strides[0]
  rows_per_block = max(1, _BLOCK_BYTES // (row_bytes * abs(rows.step)))
  for begin in range(0, len(rows), rows_per_block):
    end = min(begin + rows_per_block, len(rows))
    out[begin:end] = selected[begin:end]
    first, last = sorted((rows[begin], rows[end - 1]))
    _release_pages(mapped, info.start + first * row_bytes, info.start + (last + 1) * row_bytes)
  return out


class SafetensorsFile:
  """One safetensors file: its header, and slices read from a memory map.

  The header is read and validated on construction; the file is mapped on the first
  ``read``. Reads are thread-safe and each returns a C-contiguous copy of just the slice.

  Example::

      with SafetensorsFile("model.safetensors") as f:
        for key in f.keys():
          print(key, f.shape(key), f.dtype(key))
        top_rows = f.read("lm_head.weight", (slice(0, 128),))
  """

  def __init__(self, path: str | os.PathLike[str]):
    self.path = os.fspath(path)
    try:
      with open(self.path, "rb") as f:
        file_size = os.fstat(f.fileno()).st_size
        length_field = f.read(8)
        if len(length_field) < 8:
          raise CheckpointError(
              f"{self.path} has {file_size} bytes, fewer than the 8-byte length that starts "
              f"a safetensors file: it is truncated or not a safetensors file. Download or "
              f"export it again.")
        (header_length,) = struct.unpack("<Q", length_field)
        if header_length > min(MAX_HEADER_BYTES, file_size - 8):
          raise CheckpointError(
              f"{self.path} starts with a header length of {header_length} bytes, but the "
              f"file has {file_size} bytes (and headers are at most {MAX_HEADER_BYTES}): it "
              f"is truncated or not a safetensors file. Download or export it again.")
        raw_header = f.read(header_length)
    except OSError as e:
      raise CheckpointError(f"Cannot read safetensors file {self.path}: {e}") from e
    self._tensors, self.metadata = parse_header(self.path, file_size, raw_header)
    self._file_size = file_size
    self._mapped: mmap.mmap | None = None
    self._condition = threading.Condition()
    self._active_reads = 0
    self._closed = False
    self._bytes_read = 0

  def keys(self) -> list[str]:
    """Tensor names, sorted."""
    return sorted(self._tensors)

  def __contains__(self, key: object) -> bool:
    return key in self._tensors

  def shape(self, key: str) -> tuple[int, ...]:
    return self._info(key).shape

  def dtype(self, key: str) -> np.dtype:
    """The numpy dtype; BF16 is ``ml_dtypes.bfloat16``."""
    return self._info(key).dtype

  def nbytes(self, key: str) -> int:
    return self._info(key).nbytes

  @property
  def total_bytes(self) -> int:
    """Bytes of tensor data in the file."""
    return sum(info.nbytes for info in self._tensors.values())

  @property
  def bytes_read(self) -> int:
    """Bytes of all arrays ``read`` has returned so far."""
    with self._condition:
      return self._bytes_read

  def read(self, key: str, index: tuple[slice, ...] | None = None) -> np.ndarray:
    """Returns a C-contiguous copy of ``tensor[index]`` (the whole tensor when None).

    ``index`` is a tuple of slices, as ``jax.make_array_from_callback`` passes; missing
    trailing dimensions are taken whole.
    """
    info = self._info(key)
    index = normalize_index(index, info.shape, f"{self.path}: tensor {key!r}")
    mapped = self._begin_read()
    nbytes = 0
    try:
      out = _copy_slice(mapped, info, index)
      nbytes = out.nbytes
    finally:
      self._end_read(nbytes)
    return out

  def close(self) -> None:
    """Waits for reads in flight, then unmaps the file. Further reads raise."""
    with self._condition:
      self._closed = True
      self._condition.wait_for(lambda: self._active_reads == 0)
      if self._mapped is not None:
        try:
          self._mapped.close()
        except BufferError:
          pass  # A traceback still holds a view; the map goes when that view does.
        self._mapped = None

  def __enter__(self) -> SafetensorsFile:
    return self

  def __exit__(self, *exc_info: object) -> None:
    self.close()

  def _info(self, key: str) -> TensorInfo:
    try:
      return self._tensors[key]
    except KeyError:
      raise CheckpointError(f"{self.path} has no tensor {key!r}."
                            f"{suggest_key(key, self._tensors)}") from None

  def _begin_read(self) -> mmap.mmap:
    with self._condition:
      if self._closed:
        raise ValueError(f"{self.path} was closed; open it again to read.")
      if self._mapped is None:
        with open(self.path, "rb") as f:
          size = os.fstat(f.fileno()).st_size
          if size != self._file_size:
            raise CheckpointError(
                f"{self.path} changed size from {self._file_size} to {size} bytes while "
                f"open; do not modify checkpoints while loading them.")
          self._mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
      self._active_reads += 1
      return self._mapped

  def _end_read(self, nbytes: int) -> None:
    with self._condition:
      self._active_reads -= 1
      self._bytes_read += nbytes
      self._condition.notify_all()


def _no_safetensors_error(folder: str) -> CheckpointError:
  names = sorted(os.listdir(folder))
  pickles = [name for name in names if name.endswith(PICKLE_SUFFIXES)]
  message = f"{folder} holds no *.safetensors files."
  if pickles:
    message += (
        f" It holds PyTorch pickle files ({', '.join(pickles)}); tunix_zoo never reads "
        f"pickle weights, since loading a pickle can run arbitrary code. Convert them once "
        f"with transformers: `AutoModelForCausalLM.from_pretrained(folder)"
        f".save_pretrained(out_dir, safe_serialization=True)`.")
  else:
    shown = ", ".join(names[:10]) + (", ..." if len(names) > 10 else "")
    message += (f" Its files: {shown or '(none)'}. Point at the folder holding "
                f"{SINGLE_FILE_NAME} or {INDEX_FILE_NAME} and its shards.")
  return CheckpointError(message)


def variant_names(variant: str) -> tuple[str, str]:
  """The single file and the index of a weights variant, as transformers names them:
  ``model.<variant>.safetensors`` and ``model.safetensors.index.<variant>.json``."""
  return f"model.{variant}.safetensors", f"model.safetensors.index.{variant}.json"


class CheckpointFiles:
  """Every tensor of a checkpoint folder, whichever file holds it.

  The folder holds ``model.safetensors.index.json`` and its shards, or a single
  ``model.safetensors``, or (checked in that order) any number of ``*.safetensors`` files
  without an index. With ``variant`` (``"fp16"``) only that variant's index or single
  file is read (:func:`variant_names`). Shards listed by an index are opened on first use; reads are
  thread-safe.

  Example::

      with CheckpointFiles(folder) as files:
        for key in files.keys():
          local = files.read(key, (slice(0, 64),))
        print(files.bytes_read, "of", files.total_bytes)
  """

  def __init__(self, folder: str | os.PathLike[str], variant: str | None = None):
    self.folder = os.fspath(folder)
    if not os.path.isdir(self.folder):
      what = "is not a folder" if os.path.exists(self.folder) else "does not exist"
      raise CheckpointError(f"Checkpoint folder {self.folder} {what}; pass the folder "
                            f"holding config.json and the *.safetensors files.")
    self._lock = threading.Lock()
    self._open_files: dict[str, SafetensorsFile] = {}
    self._index_path: str | None = None
    index_path = os.path.join(self.folder, INDEX_FILE_NAME)
    if variant is not None:
      self._file_of_key = self._variant_keys(variant)
    elif os.path.isfile(index_path):
      self._index_path = index_path
      self._file_of_key = self._read_index(index_path)
    elif os.path.isfile(os.path.join(self.folder, SINGLE_FILE_NAME)):
      self._file_of_key = self._map_keys([SINGLE_FILE_NAME])
    else:
      names = sorted(name for name in os.listdir(self.folder) if name.endswith(".safetensors")
                     and os.path.isfile(os.path.join(self.folder, name)))
      if not names:
        raise _no_safetensors_error(self.folder)
      self._file_of_key = self._map_keys(names)

  def keys(self) -> list[str]:
    """Tensor names, sorted."""
    return sorted(self._file_of_key)

  def __contains__(self, key: object) -> bool:
    return key in self._file_of_key

  def file_of(self, key: str) -> str:
    """Path of the file holding ``key``."""
    return os.path.join(self.folder, self._file_name(key))

  def shape(self, key: str) -> tuple[int, ...]:
    return self._file_holding(key).shape(key)

  def dtype(self, key: str) -> np.dtype:
    """The numpy dtype; BF16 is ``ml_dtypes.bfloat16``."""
    return self._file_holding(key).dtype(key)

  def nbytes(self, key: str) -> int:
    return self._file_holding(key).nbytes(key)

  def read(self, key: str, index: tuple[slice, ...] | None = None) -> np.ndarray:
    """Returns a C-contiguous copy of ``tensor[index]``; see ``SafetensorsFile.read``."""
    return self._file_holding(key).read(key, index)

  @property
  def total_bytes(self) -> int:
    """Bytes of tensor data over all keys (opens every file's header)."""
    return sum(self.nbytes(key) for key in self._file_of_key)

  @property
  def bytes_read(self) -> int:
    """Bytes of all arrays ``read`` has returned so far."""
    with self._lock:
      files = list(self._open_files.values())
    return sum(f.bytes_read for f in files)

  def close(self) -> None:
    with self._lock:
      files = list(self._open_files.values())
      self._open_files.clear()
    for f in files:
      f.close()

  def __enter__(self) -> CheckpointFiles:
    return self

  def __exit__(self, *exc_info: object) -> None:
    self.close()

  def _variant_keys(self, variant: str) -> dict[str, str]:
    single, index = variant_names(variant)
    if os.path.isfile(os.path.join(self.folder, index)):
      self._index_path = os.path.join(self.folder, index)
      return self._read_index(self._index_path)
    if os.path.isfile(os.path.join(self.folder, single)):
      return self._map_keys([single])
    present = sorted(n for n in os.listdir(self.folder) if n.endswith(".safetensors"))
    raise CheckpointError(
        f"{self.folder} has no weights of variant {variant!r} (neither {single} nor "
        f"{index}); its safetensors files: {', '.join(present) or 'none'}. Pass the variant "
        "those files name (model.<variant>.safetensors), or no variant for "
        "model.safetensors.")

  def _read_index(self, index_path: str) -> dict[str, str]:
    try:
      with open(index_path, "rb") as f:
        raw_index = f.read()
    except OSError as e:
      raise CheckpointError(f"Cannot read {index_path}: {e}. Check the file's permissions.") from e
    try:
      index = json.loads(raw_index.decode("utf-8"),
                         object_pairs_hook=json_object_without_duplicates)
    except RecursionError:
      raise CheckpointError(f"{index_path} nests JSON too deeply to be an index; download it "
                            f"again.") from None
    except ValueError as e:
      raise CheckpointError(f"{index_path} is not valid JSON ({e}); download it again.") from e
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(name, str) for name in weight_map.values()):
      raise CheckpointError(f"{index_path} has no 'weight_map' object mapping tensor names "
                            f"to file names; download it again.")
    for name in set(weight_map.values()):
      if (not name or "\x00" in name or os.path.isabs(name)
          or ".." in name.replace("\\", "/").split("/")):
        raise CheckpointError(f"{index_path} names shard {name!r}, which is not a file name "
                              f"in the checkpoint folder (it is empty, or lies outside the "
                              f"checkpoint folder); shards must be files in the folder.")
    missing = sorted(name for name in set(weight_map.values())
                     if not os.path.isfile(os.path.join(self.folder, name)))
    if missing:
      raise CheckpointError(
          f"{index_path} names {len(missing)} shard(s) missing from {self.folder}: "
          f"{', '.join(missing)}. The download was probably interrupted: download them again.")
    return dict(weight_map)

  def _map_keys(self, names: list[str]) -> dict[str, str]:
    file_of_key: dict[str, str] = {}
    for name in names:
      for key in self._open(name).keys():
        if key in file_of_key:
          raise CheckpointError(
              f"Tensor {key!r} is in both {file_of_key[key]} and {name} in {self.folder}, so "
              f"it is ambiguous which to load. Remove the stray file, or add a "
              f"{INDEX_FILE_NAME} saying which file holds each tensor.")
        file_of_key[key] = name
    return file_of_key

  def _file_name(self, key: str) -> str:
    try:
      return self._file_of_key[key]
    except KeyError:
      raise CheckpointError(f"{self.folder} has no tensor {key!r}."
                            f"{suggest_key(key, self._file_of_key)}") from None

  def _open(self, name: str) -> SafetensorsFile:
    with self._lock:
      if name not in self._open_files:
        self._open_files[name] = SafetensorsFile(os.path.join(self.folder, name))
      return self._open_files[name]

  def _file_holding(self, key: str) -> SafetensorsFile:
    name = self._file_name(key)
    f = self._open(name)
    if key not in f:
      raise CheckpointError(
          f"{self._index_path} says {name} holds tensor {key!r}, but it does not: the index "
          f"and the shards come from different versions. Download the checkpoint again.")
    return f
