"""Safetensors checkpoints read straight from a server with byte-range requests.

:class:`RemoteCheckpoint` is a :class:`~tunix_zoo.checkpoint.loader.CheckpointReader`
over a :class:`ByteFetcher` (GCS, the HF Hub: :mod:`tunix_zoo.sources.stream`). Opening
it fetches the index (if any) and each file's header, a few KB; every tensor read then
fetches exactly the rows asked for, split into ranges of at most ``chunk_bytes`` fetched
``concurrency`` at a time. Nothing is written to local disk. Rows are contiguous in a
safetensors file, so the reader offers ``read_rows``: the loader then reads each tensor in
disjoint row blocks and reshards on the devices (:mod:`tunix_zoo.checkpoint.row_blocks`)
instead of fetching the covering rows of a column-sharded slice::

    with RemoteCheckpoint(fetcher) as ckpt:
      config = ckpt.read_json("config.json")
      block = ckpt.read_rows("model.embed_tokens.weight", 0, 1024)
      print(ckpt.bytes_fetched, "of", ckpt.total_bytes)
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import struct
import threading
from typing import Callable, Protocol

import jax
import numpy as np

from tunix_zoo.checkpoint.reader import (INDEX_FILE_NAME, MAX_HEADER_BYTES, SINGLE_FILE_NAME,
                                         json_object_without_duplicates, normalize_index,
                                         parse_header, suggest_key, TensorInfo, aligned_empty)
from tunix_zoo.errors import CheckpointError

log = logging.getLogger(__name__)

DEFAULT_CONCURRENCY = 16
# Large enough that a request's latency is small against its transfer, small enough that
# a tensor of a few hundred MB is fetched by many requests in parallel.
DEFAULT_CHUNK_BYTES = 16 << 20


class ByteFetcher(Protocol):
  """Byte ranges of the files of one remote checkpoint folder, one pinned version each.

  Implementations retry transient failures themselves and raise
  :class:`~tunix_zoo.errors.SourceError` for everything else.
  """

  location: str  # e.g. "gs://bucket/prefix", for messages

  def size(self, name: str) -> int | None:
    """Bytes of file ``name`` of the folder; None when it has no such file."""

  def fetch(self, name: str, start: int, end: int) -> bytes:
    """Exactly the bytes ``[start, end)`` of file ``name``, of the version ``size`` saw."""

  def check_unchanged(self, names: list[str]) -> None:
    """Raises SourceError if any of ``names`` is no longer the version first seen."""


class RemoteCheckpoint:
  """Every tensor of a remote safetensors folder (an index and its shards, or one file).

  ``progress`` is called with the bytes of each range fetched. On a clean exit the
  fetched files are checked to be still the versions the load began with (a file
  replaced mid-load raises SourceError), and one log line says how many bytes this
  process fetched against the checkpoint's size.

  Example::

      with RemoteCheckpoint(fetcher, concurrency=32) as ckpt:
        rows = ckpt.read_rows("lm_head.weight", 0, 128)
  """

  def __init__(self, fetcher: ByteFetcher, *, concurrency: int = DEFAULT_CONCURRENCY,
               chunk_bytes: int = DEFAULT_CHUNK_BYTES,
               progress: Callable[[int], None] | None = None):
    if concurrency < 1 or chunk_bytes < 1:
      raise ValueError(f"concurrency ({concurrency}) and chunk_bytes ({chunk_bytes}) must be "
                       "positive.")
    self.fetcher = fetcher
    self.location = fetcher.location
    self.chunk_bytes = chunk_bytes
    self.progress = progress
    self._lock = threading.Lock()
    self.bytes_fetched = 0
    self.requests = 0
    self._pool = concurrent.futures.ThreadPoolExecutor(concurrency,
                                                       thread_name_prefix="stream")
    try:
      names, file_of_key = self._files()
      headers = list(self._pool.map(self._header, names))
    except BaseException:
      self._pool.shutdown(cancel_futures=True)
      raise
    self._tensors: dict[str, tuple[str, TensorInfo]] = {}
    for name, tensors in zip(names, headers):
      for key, info in tensors.items():
        if file_of_key is None or file_of_key.get(key) == name:
          self._tensors[key] = (name, info)
    missing = sorted(set(file_of_key or ()) - set(self._tensors))
    if missing:
      raise CheckpointError(
          f"{self.location}/{INDEX_FILE_NAME} names {len(missing)} tensor(s) its shards do "
          f"not hold, e.g. {missing[:3]}: the index and the shards come from different "
          "versions. Upload the checkpoint again.")
    self.files = names

  # -------------------------------------------------------------- CheckpointReader

  def keys(self) -> list[str]:
    """Tensor names, sorted."""
    return sorted(self._tensors)

  def __contains__(self, key: object) -> bool:
    return key in self._tensors

  def shape(self, key: str) -> tuple[int, ...]:
    return self._info(key)[1].shape

  def dtype(self, key: str) -> np.dtype:
    """The numpy dtype; BF16 is ``ml_dtypes.bfloat16``."""
    return self._info(key)[1].dtype

  def nbytes(self, key: str) -> int:
    return self._info(key)[1].nbytes

  @property
  def total_bytes(self) -> int:
    """Bytes of tensor data over all keys."""
    return sum(info.nbytes for _, info in self._tensors.values())

  def read(self, key: str, index: tuple[slice, ...] | None = None) -> np.ndarray:
    """A new host array holding ``tensor[index]``, fetched as the rows covering it."""
    _, info = self._info(key)
    index = normalize_index(index, info.shape, f"{self.location}: {key}")
    if not info.shape:
      return self.read_rows(key, 0, 1)
    rows = range(*index[0].indices(info.shape[0]))
    rest = index[1:]
    if not rows:
      empty = np.empty((0,) + info.shape[1:], info.dtype)[(slice(None),) + rest]
      return aligned_empty(empty.shape, info.dtype)
    first, last = min(rows[0], rows[-1]), max(rows[0], rows[-1])
    block = self.read_rows(key, first, last + 1)
    rows_index = slice(None) if rows.step == 1 else np.asarray(rows) - first
    selected = block[(rows_index,) + rest]
    if rows.step == 1 and selected.shape == block.shape:
      return block
    out = aligned_empty(selected.shape, info.dtype)
    out[...] = selected
    return out

  def read_rows(self, key: str, start: int, stop: int) -> np.ndarray:
    """Rows ``[start, stop)`` of the tensor (the whole of a 0-d one), fetched in ranges of
    at most ``chunk_bytes``, in parallel."""
    name, info = self._info(key)
    rows = info.shape[0] if info.shape else 1
    if not 0 <= start <= stop <= rows:
      raise ValueError(f"{self.location}: rows [{start}, {stop}) of {key!r}, which has "
                       f"{rows}.")
    row_bytes = info.nbytes // rows if rows else 0
    out = aligned_empty(((stop - start),) + info.shape[1:] if info.shape else (), info.dtype)
    flat = out.reshape(-1).view(np.uint8)
    begin, end = info.start + start * row_bytes, info.start + stop * row_bytes

    def fetch_into(offset: int) -> None:
      upto = min(offset + self.chunk_bytes, end)
      flat[offset - begin:upto - begin] = np.frombuffer(self._fetch(name, offset, upto),
                                                        np.uint8)

    for done in [self._pool.submit(fetch_into, o) for o in range(begin, end, self.chunk_bytes)]:
      done.result()
    return out

  def read_json(self, name: str) -> dict:
    """A small JSON file of the folder (e.g. config.json), parsed."""
    size = self.fetcher.size(name)
    if size is None:
      raise CheckpointError(f"{self.location} has no {name}; tunix_zoo reads the "
                            "architecture from it. Upload the config.json of these weights.")
    try:
      return json.loads(self._fetch(name, 0, size).decode("utf-8"))
    except ValueError as e:
      raise CheckpointError(f"{self.location}/{name} is not valid JSON ({e}); upload it "
                            "again.") from e

  def close(self) -> None:
    self._pool.shutdown(cancel_futures=True)

  def __enter__(self) -> RemoteCheckpoint:
    return self

  def __exit__(self, exc_type: object, *exc_info: object) -> None:
    self.close()
    if exc_type is None:
      self.fetcher.check_unchanged(self.files)
      total = self.total_bytes
      log.info("process %d of %d streamed %d of %d checkpoint bytes (%.3fx) in %d "
               "requests from %s", jax.process_index(), jax.process_count(),
               self.bytes_fetched, total, self.bytes_fetched / max(total, 1), self.requests,
               self.location)

  # -------------------------------------------------------------- internals

  def _fetch(self, name: str, start: int, end: int) -> bytes:
    data = self.fetcher.fetch(name, start, end)
    with self._lock:
      self.bytes_fetched += len(data)
      self.requests += 1
    if self.progress is not None:
      self.progress(len(data))
    return data

  def _info(self, key: str) -> tuple[str, TensorInfo]:
    try:
      return self._tensors[key]
    except KeyError:
      raise CheckpointError(f"{self.location} has no tensor {key!r}."
                            f"{suggest_key(key, self._tensors)}") from None

  def _files(self) -> tuple[list[str], dict[str, str] | None]:
    """The safetensors files to read, and the index's key -> file map (None: no index)."""
    index_size = self.fetcher.size(INDEX_FILE_NAME)
    if index_size is None:
      if self.fetcher.size(SINGLE_FILE_NAME) is None:
        raise CheckpointError(
            f"{self.location} holds neither {INDEX_FILE_NAME} nor {SINGLE_FILE_NAME}, so "
            "there is nothing to stream. Point at the folder holding config.json and the "
            "safetensors weights.")
      return [SINGLE_FILE_NAME], None
    where = f"{self.location}/{INDEX_FILE_NAME}"
    try:
      index = json.loads(self._fetch(INDEX_FILE_NAME, 0, index_size).decode("utf-8"),
                         object_pairs_hook=json_object_without_duplicates)
    except ValueError as e:
      raise CheckpointError(f"{where} is not valid JSON ({e}); upload it again.") from e
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(name, str) for name in weight_map.values()):
      raise CheckpointError(f"{where} has no 'weight_map' object mapping tensor names to "
                            "file names; upload it again.")
    names = sorted(set(weight_map.values()))
    bad = [n for n in names if n.startswith("/") or ".." in n.replace("\\", "/").split("/")]
    if bad:
      raise CheckpointError(f"{where} names shard {bad[0]!r}, which lies outside the "
                            "checkpoint folder; shards must be files in the folder.")
    missing = [n for n in names if self.fetcher.size(n) is None]
    if missing:
      raise CheckpointError(f"{where} names {len(missing)} shard(s) missing from "
                            f"{self.location}: {', '.join(missing)}. Upload them again.")
    return names, dict(weight_map)

  def _header(self, name: str) -> dict[str, TensorInfo]:
    size = self.fetcher.size(name) or 0
    where = f"{self.location}/{name}"
    if size < 8:
      raise CheckpointError(f"{where} has {size} bytes, too few for a safetensors file. "
                            "Upload it again.")
    (length,) = struct.unpack("<Q", self._fetch(name, 0, 8))
    if length > min(MAX_HEADER_BYTES, size - 8):
      raise CheckpointError(f"{where}: its header claims {length} bytes, more than the file "
                            f"({size}) or the safetensors limit allows. Upload it again.")
    tensors, _ = parse_header(where, size, self._fetch(name, 8, 8 + length))
    return tensors
