"""Writing safetensors files that the ``safetensors`` library and transformers read.

A file's header, which names every tensor's dtype, shape and byte range, comes before the
tensors' bytes. So the header is planned from shapes and dtypes first, and each tensor's
bytes are then written once, straight into place. :class:`ShardedWriter` takes that plan
up front (export knows every shape before copying any tensor to the host) and so holds
one tensor at a time::

    plan = [(key, array.shape, array.dtype) for key, array in tensors]
    with ShardedWriter(out_dir, max_shard_size="5GB", plan=plan) as writer:
      for key, array in tensors:
        writer.add(key, array)

Files appear only when complete: each is written under a temporary name, flushed to disk
and renamed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import struct
import uuid
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from tunix_zoo.checkpoint.reader import INDEX_FILE_NAME, SAFETENSORS_DTYPES, SINGLE_FILE_NAME
from tunix_zoo.errors import CheckpointError

_DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}

_SIZE_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_SIZE_PATTERN = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*([a-z]*)\s*$", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class _Entry:
  """One tensor's place in a file's data region."""

  key: str
  dtype_name: str
  shape: tuple[int, ...]
  begin: int
  end: int


def _is_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def parse_size(size: int | str) -> int:
  """Bytes in a size such as ``"5GB"`` (decimal, as HF: 1KB = 1000) or ``"512MiB"``.

  Example::

      parse_size("100KB")  # 100_000
      parse_size("2GiB")   # 2_147_483_648
  """
  if _is_int(size):
    value = size
  else:
    match = _SIZE_PATTERN.match(size) if isinstance(size, str) else None
    if not match or match.group(2).lower() not in _SIZE_UNITS:
      raise CheckpointError(
          f"Cannot read {size!r} as a size; write a number with a unit among "
          f"B, KB, MB, GB, TB (powers of 1000) or KiB, MiB, GiB, TiB, such as '5GB'.")
    value = int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])
  if value <= 0:
    raise CheckpointError(f"Size {size!r} must be positive.")
  return value


def _file_metadata(metadata: Mapping[str, str] | None) -> dict[str, str]:
  """Metadata with ``format: pt`` unless given, which transformers needs to load a file."""
  merged = {"format": "pt", **(metadata or {})}
  if not all(isinstance(k, str) and isinstance(v, str) for k, v in merged.items()):
    raise CheckpointError(f"safetensors metadata must map strings to strings, got {merged!r}.")
  return merged


def _check_key(key: Any) -> None:
  if not isinstance(key, str) or key == "__metadata__":
    raise CheckpointError(f"Cannot write a tensor named {key!r}: names are strings other "
                          f"than '__metadata__'.")


def _dtype_name(key: str, dtype: np.dtype) -> str:
  name = _DTYPE_NAMES.get(dtype.newbyteorder("<") if dtype.byteorder == ">" else dtype)
  if name is None:
    raise CheckpointError(f"Cannot write tensor {key!r}: safetensors has no dtype for "
                          f"{dtype}; cast it to one of "
                          f"{', '.join(map(str, _DTYPE_NAMES))}.")
  return name


def _prepare_array(key: Any, array: Any) -> tuple[np.ndarray, str]:
  """A C-contiguous little-endian array and its safetensors dtype name."""
  _check_key(key)
  array = np.asarray(array)
  name = _dtype_name(key, array.dtype)
  if array.dtype.byteorder == ">":
    array = array.astype(array.dtype.newbyteorder("<"))
  # Not np.ascontiguousarray, which turns a scalar into shape (1,).
  return (array if array.flags.c_contiguous else array.copy(order="C")), name


def _layout(tensors: Iterable[tuple[str, str, tuple[int, ...], int]]) -> list[_Entry]:
  """Back-to-back byte ranges for ``(key, dtype_name, shape, nbytes)`` in order."""
  entries, offset = [], 0
  for key, dtype_name, shape, nbytes in tensors:
    entries.append(_Entry(key, dtype_name, shape, offset, offset + nbytes))
    offset += nbytes
  return entries


def _encode_header(entries: Iterable[_Entry], metadata: Mapping[str, str]) -> bytes:
  """The length field and JSON header, padded with spaces so tensor data is 8-aligned."""
  header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
  for e in entries:
    header[e.key] = {"dtype": e.dtype_name, "shape": list(e.shape),
                     "data_offsets": [e.begin, e.end]}
  raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
  raw += b" " * (-len(raw) % 8)
  return struct.pack("<Q", len(raw)) + raw


def _write_bytes(f: Any, array: np.ndarray) -> None:
  f.write(memoryview(array.reshape(-1).view(np.uint8)))


def _flush_to_disk(f: Any) -> None:
  f.flush()
  os.fsync(f.fileno())



class _PlannedFile:
  """One safetensors file laid out in advance: its header is written when the file is
  opened, and each tensor's bytes go straight to their planned place, in any order."""

  def __init__(self, path: str, entries: list[_Entry], metadata: Mapping[str, str]):
    self.path = path
    self.entries = {entry.key: entry for entry in entries}
    self._metadata = metadata
    self._unwritten = set(self.entries)
    self._file: Any = None
    self._data_start = 0
    self.finished = False

  def write(self, key: str, array: np.ndarray, dtype_name: str) -> None:
    entry = self.entries[key]
    if (dtype_name, array.shape) != (entry.dtype_name, entry.shape):
      raise CheckpointError(
          f"Tensor {key!r} is {dtype_name} of shape {array.shape}, but the writer planned "
          f"{entry.dtype_name} of shape {entry.shape}; plan the shapes and dtypes that are "
          f"then added.")
    self._open()
    position = self._data_start + entry.begin
    if self._file.tell() != position:
      self._file.seek(position)
    _write_bytes(self._file, array)
    self._unwritten.discard(key)

  @property
  def complete(self) -> bool:
    return not self._unwritten

  def finish(self) -> None:
    """Flushes the file to disk; raises if a planned tensor was never written."""
    if self._unwritten:
      raise CheckpointError(
          f"{len(self._unwritten)} planned tensor(s) were never given for {self.path}: "
          f"{', '.join(sorted(self._unwritten)[:5])}. Add every planned tensor, or leave "
          f"it out of the plan.")
    self._open()
    _flush_to_disk(self._file)
    self._file.close()
    self.finished = True

  def abort(self) -> None:
    if self._file is not None:
      try:
        self._file.close()
      except OSError:
        pass  # Flushing what a full disk refused fails again; the file is removed below.
    if os.path.exists(self.path):
      os.remove(self.path)

  def _open(self) -> None:
    if self._file is None:
      self._file = open(self.path, "wb")
      header = _encode_header(self.entries.values(), self._metadata)
      self._file.write(header)
      self._data_start = len(header)


def write_safetensors(path: str | os.PathLike[str],
                      tensors: Mapping[str, Any] | Iterable[tuple[str, Any]],
                      metadata: Mapping[str, str] | None = None) -> None:
  """Writes one safetensors file that ``safetensors`` and transformers read.

  ``tensors`` is a dict or an iterable of ``(key, array)`` pairs; an iterable is read to
  the end before anything is written, since the header needs every shape first, so all
  its arrays are held at once (:class:`ShardedWriter` with a plan holds one). The file
  appears complete or not at all. Metadata defaults to ``{"format": "pt"}``, which
  transformers requires; given metadata is added to it.

  Example::

      write_safetensors("/tmp/w.safetensors", {"w": np.ones((2, 3), ml_dtypes.bfloat16)})
  """
  path = os.fspath(path)
  metadata = _file_metadata(metadata)
  prepared: dict[str, tuple[np.ndarray, str]] = {}
  for key, array in (tensors.items() if isinstance(tensors, Mapping) else tensors):
    if key in prepared:
      raise CheckpointError(f"Tensor {key!r} was given twice for {path}.")
    prepared[key] = _prepare_array(key, array)
  entries = _layout((key, name, array.shape, array.nbytes)
                    for key, (array, name) in prepared.items())
  folder, name = os.path.split(path)
  planned = _PlannedFile(os.path.join(folder, f".{name}.{uuid.uuid4().hex[:8]}.partial"),
                         entries, metadata)
  try:
    for key, (array, dtype_name) in prepared.items():
      planned.write(key, array, dtype_name)
    planned.finish()
    os.replace(planned.path, path)
  except BaseException:
    planned.abort()
    raise


class ShardedWriter:
  """Writes tensors one by one into HF-named safetensors shards.

  A new shard starts when the next tensor would push the current one past
  ``max_shard_size`` (a tensor larger than the limit gets a shard of its own). ``finish``
  names the shards ``model-00001-of-0000N.safetensors`` and writes
  ``model.safetensors.index.json``, or names a single shard ``model.safetensors``. Leaving
  a ``with`` block finishes, or on an exception removes the partial shards. Not
  thread-safe; atomic replacement of a previous export is the caller's job.

  ``plan`` lists every tensor's ``(key, shape, dtype)``: the shards and their headers are
  then laid out up front and ``add`` writes each array straight into place, in any order,
  holding none. Without a plan each shard's arrays are held until the shard is full, so
  host memory grows to ``max_shard_size``; use that only for small checkpoints.

  Example::

      plan = [(key, array.shape, array.dtype) for key, array in host_arrays()]
      with ShardedWriter(out_dir, max_shard_size="5GB", plan=plan) as writer:
        for key, array in host_arrays():
          writer.add(key, array)
  """

  def __init__(self, out_dir: str | os.PathLike[str], max_shard_size: int | str = "5GB",
               metadata: Mapping[str, str] | None = None, *,
               plan: Iterable[tuple[str, Sequence[int], Any]] | None = None):
    self.out_dir = os.fspath(out_dir)
    self.max_shard_size = parse_size(max_shard_size)
    self._metadata = _file_metadata(metadata)
    shards = None if plan is None else self._plan_shards(plan)
    os.makedirs(self.out_dir, exist_ok=True)
    existing = sorted(name for name in os.listdir(self.out_dir)
                      if name.endswith(".safetensors") or name == INDEX_FILE_NAME)
    if existing:
      raise CheckpointError(
          f"{self.out_dir} already holds checkpoint files ({', '.join(existing)}); mixing "
          f"them with new shards would corrupt both. Write into an empty folder.")
    self._planned = shards is not None
    self._shards = [_PlannedFile(self._pending_path(number), entries, self._metadata)
                    for number, entries in enumerate(shards or [], start=1)]
    self._planned_shard = {key: number for number, shard in enumerate(self._shards, start=1)
                           for key in shard.entries}
    self._held: list[tuple[str, np.ndarray, str]] = []
    self._held_bytes = 0
    self._shard_of_key: dict[str, int] = {}
    self._total_size = 0
    self._total_parameters = 0
    self._finished = False

  def add(self, key: str, array: Any) -> None:
    """Writes one tensor; with a plan, the caller may free ``array`` once this returns."""
    if self._finished:
      raise ValueError(f"ShardedWriter for {self.out_dir} is finished; add tensors before "
                       f"finish().")
    if key in self._shard_of_key:
      raise CheckpointError(f"Tensor {key!r} was given twice to the writer for {self.out_dir}.")
    array, dtype_name = _prepare_array(key, array)
    if self._planned:
      number = self._planned_shard.get(key)
      if number is None:
        raise CheckpointError(f"Tensor {key!r} is not in the plan of the writer for "
                              f"{self.out_dir}; plan every tensor that is added.")
      shard = self._shards[number - 1]
      shard.write(key, array, dtype_name)
      if shard.complete:
        shard.finish()  # Now, so that only the shard being filled holds a descriptor.
    else:
      if self._held and self._held_bytes + array.nbytes > self.max_shard_size:
        self._write_held()
      self._held.append((key, array, dtype_name))
      self._held_bytes += array.nbytes
      number = len(self._shards) + 1
    self._shard_of_key[key] = number
    self._total_size += array.nbytes
    self._total_parameters += array.size

  def finish(self) -> list[str]:
    """Names the shards, writes the index if sharded; returns the paths written."""
    if self._finished:
      raise ValueError(f"ShardedWriter for {self.out_dir} is already finished.")
    self._finished = True
    if not self._planned and (self._held or not self._shards):
      self._write_held()
    for shard in self._shards:
      if not shard.finished:
        shard.finish()
    count = len(self._shards)
    names = ([SINGLE_FILE_NAME] if count == 1 else
             [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)])
    written = []
    for shard, name in zip(self._shards, names):
      written.append(os.path.join(self.out_dir, name))
      os.replace(shard.path, written[-1])
    if count > 1:
      index = {
          "metadata": {"total_parameters": self._total_parameters,
                       "total_size": self._total_size},
          "weight_map": {key: names[shard - 1]
                         for key, shard in sorted(self._shard_of_key.items())},
      }
      written.append(os.path.join(self.out_dir, INDEX_FILE_NAME))
      with open(written[-1], "w") as f:
        f.write(json.dumps(index, indent=2) + "\n")
        _flush_to_disk(f)
    return written

  def abort(self) -> None:
    """Removes the shards written so far."""
    self._finished = True
    self._held.clear()
    for shard in self._shards:
      shard.abort()

  def __enter__(self) -> ShardedWriter:
    return self

  def __exit__(self, exc_type: type[BaseException] | None, *exc_info: object) -> None:
    if exc_type is not None:
      self.abort()
    elif not self._finished:
      self.finish()

  def _plan_shards(self, plan: Iterable[tuple[str, Sequence[int], Any]]) -> list[list[_Entry]]:
    """The tensors of each shard, split as ``add`` would split them unplanned."""
    shards: list[list[tuple[str, str, tuple[int, ...], int]]] = [[]]
    size, seen = 0, set()
    for key, shape, dtype in plan:
      _check_key(key)
      if key in seen:
        raise CheckpointError(f"Tensor {key!r} is planned twice for {self.out_dir}.")
      seen.add(key)
      dtype = np.dtype(dtype)
      shape = tuple(int(d) for d in shape)
      nbytes = math.prod(shape) * dtype.itemsize
      if shards[-1] and size + nbytes > self.max_shard_size:
        shards.append([])
        size = 0
      shards[-1].append((key, _dtype_name(key, dtype), shape, nbytes))
      size += nbytes
    return [_layout(shard) for shard in shards]

  def _write_held(self) -> None:
    """Writes the held arrays as the next shard."""
    entries = _layout((key, name, array.shape, array.nbytes) for key, array, name in self._held)
    shard = _PlannedFile(self._pending_path(len(self._shards) + 1), entries, self._metadata)
    self._shards.append(shard)
    for key, array, dtype_name in self._held:
      shard.write(key, array, dtype_name)
    shard.finish()
    self._held, self._held_bytes = [], 0

  def _pending_path(self, number: int) -> str:
    return os.path.join(self.out_dir, f".model-{number:05d}.safetensors.partial")
