"""Reading Kaggle Flax (orbax, tensorstore/OCDBT) Gemma checkpoints slice by slice.

Such a checkpoint holds no config.json and no safetensors: a folder written by
``orbax.checkpoint`` whose tree is either "flat" (``{'transformer/layer_0/attn/q_einsum':
{'w': ...}}``) or nested (``{'transformer': {'layer_0': ...}}``). :class:`OrbaxCheckpoint`
presents it under the HF keys of the family's safetensors layout, each HF tensor a view
(select, transpose, merge axes, resize rows) of one orbax leaf given by the family's
:class:`~tunix_zoo.checkpoint.keymap.OrbaxTable`. It is a checkpoint reader like
:class:`~tunix_zoo.checkpoint.reader.CheckpointFiles`, so the one loader serves
both: each device slice of an HF tensor becomes one tensorstore read of the region of
the leaf that covers it; no leaf is restored whole on the host unless a device holds it
whole. A folder on ``gs://`` is read in place (:class:`RemoteOrbaxCheckpoint`):
tensorstore fetches the slices from the bucket itself::

    shapes = {"model.norm.weight": (1152,), ...}  # what the model expects
    with OrbaxCheckpoint("/ckpt/gemma3-1b", GEMMA3_ORBAX, shapes) as ckpt:
      rows = ckpt.read("model.embed_tokens.weight", (slice(0, 1024), slice(None)))
"""

from __future__ import annotations

import collections
import concurrent.futures
import ctypes
import functools
import logging
import math
import os
import pathlib
import platform
import re
import threading
from typing import Any, Mapping

import numpy as np

from tunix_zoo.checkpoint.keymap import OrbaxRule, OrbaxTable
from tunix_zoo.checkpoint.reader import aligned_empty
from tunix_zoo.errors import CheckpointError

log = logging.getLogger(__name__)

# Files orbax writes at the root of every checkpoint it saves.
MARKERS = ("_METADATA", "_CHECKPOINT_METADATA", "manifest.ocdbt")
_LAYOUTS_NOT_READ = re.compile(r"(^|/)stacked_layers(/|$)")
# glibc's malloc raises its mmap threshold to the size of each large block freed (up to
# 32 MB); past that, tensorstore's chunk buffers (a whole leaf each, 32 MB for Gemma 3 1B's
# MLP) come from malloc's arenas, which keep them resident once freed: 0.10-0.15x the
# weights above them for the rest of a load. A fixed threshold returns every block of at
# least 1 MB to the system when freed (peak 1.15x -> 1.03x; benchmarks/README.md).
_MMAP_THRESHOLD = 1 << 20
_M_MMAP_THRESHOLD = -3  # glibc's malloc.h


@functools.cache
def _return_large_blocks_on_free() -> None:
  """Has glibc's malloc unmap freed blocks of 1 MB or more (process-wide, once).

  Other C libraries are left as they are.
  """
  if platform.libc_ver()[0] != "glibc":
    return
  ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)


def _path(folder: Any) -> Any:
  """A pathlib.Path, or for ``gs://`` an etils ``epath.Path`` (gcsfs underneath)."""
  if str(folder).startswith("gs://"):
    from etils import epath  # pylint: disable=import-outside-toplevel  (orbax's own path type)

    return epath.Path(str(folder))
  return pathlib.Path(folder)


def is_orbax_folder(folder: str | os.PathLike[str]) -> bool:
  """Whether ``folder`` is an orbax checkpoint, or holds one as its only sub-folder."""
  try:
    find_checkpoint(folder)
  except CheckpointError:
    return False
  return True


def find_checkpoint(folder: str | os.PathLike[str]) -> Any:
  """The orbax checkpoint folder: ``folder`` itself, or its one sub-folder holding one (a
  ``pathlib.Path``, or an ``epath.Path`` for ``gs://``).

  Kaggle's Flax variations unpack as ``<download>/tokenizer.model`` beside
  ``<download>/<variation>/`` (the checkpoint).
  """
  root = _path(folder)
  if any((root / name).is_file() for name in MARKERS):
    return root
  found = sorted(p for p in root.iterdir() if p.is_dir()
                 and any((p / name).is_file() for name in MARKERS)) if root.is_dir() else []
  if len(found) == 1:
    return found[0]
  if found:
    raise CheckpointError(
        f"{folder} holds {len(found)} orbax checkpoints ({', '.join(p.name for p in found)}); "
        "pass the one to load.")
  raise CheckpointError(f"{folder} is not an orbax checkpoint folder (no {MARKERS[0]}).")


def _leaf_paths(tree: Any, prefix: tuple[str, ...] = ()) -> dict[str, Any]:
  """'/'-joined path of every leaf of a (flat or nested) metadata tree -> its metadata."""
  out: dict[str, Any] = {}
  if isinstance(tree, Mapping):
    for key, value in tree.items():
      out.update(_leaf_paths(value, prefix + (str(key),)))
  else:
    out["/".join(prefix)] = tree
  return out


def read_metadata(checkpoint: Any) -> dict[str, Any]:
  """'/'-joined leaf path -> orbax ArrayMetadata (shape, dtype, storage name)."""
  import orbax.checkpoint as ocp

  try:
    metadata = ocp.PyTreeCheckpointer().metadata(checkpoint)
  except Exception as e:  # orbax raises FileNotFoundError, ValueError, KeyError... here.
    raise CheckpointError(
        f"Cannot read the orbax metadata of {checkpoint} ({type(e).__name__}: {e}). The "
        "folder is incomplete or not an orbax checkpoint: download it again.") from e
  tree = getattr(getattr(metadata, "item_metadata", metadata), "tree", None)
  tree = tree if tree is not None else metadata
  leaves = _leaf_paths(tree)
  if not leaves or not all(hasattr(m, "shape") and hasattr(m, "dtype")
                           for m in leaves.values()):
    raise CheckpointError(f"{checkpoint}: the orbax tree holds no arrays; download it again.")
  return leaves


class OrbaxCheckpoint:
  """An orbax checkpoint seen as HF-named tensors; see the module docstring.

  ``expected`` maps each HF key the model reads to its shape: it picks among a key's
  rules (``qkv_einsum`` or ``q_einsum``, the gating orientation) and sizes the
  embedding, whose extra rows are dropped and missing ones read as zeros (logged once).

  ``context`` adds tensorstore context resources (e.g. ``gcs_request_concurrency``) to
  orbax's own.

  Raises CheckpointError on opening for a missing or unreadable metadata file, a leaf no
  rule reads (a layout this reader does not know, e.g. ``stacked_layers``), or an HF
  key no leaf gives in the expected shape.
  """

  def __init__(self, folder: str | os.PathLike[str], table: OrbaxTable,
               expected: Mapping[str, tuple[int, ...]], *,
               context: Mapping[str, Any] | None = None):
    import orbax.checkpoint as ocp
    import tensorstore as ts

    self.folder = find_checkpoint(folder)
    leaves = read_metadata(self.folder)
    stacked = sorted(k for k in leaves if _LAYOUTS_NOT_READ.search(k))
    if stacked:
      raise CheckpointError(
          f"{self.folder} stores its layers stacked ({stacked[0]!r}, ...), a layout tunix_zoo "
          "does not read. Re-save it per layer (gemma's unstacked 'transformer/layer_{i}' "
          "form) or use the model's 'transformers' (safetensors) variation.")
    self._leaves = leaves
    self._views: dict[str, tuple[OrbaxRule, str]] = {}
    for key, shape in expected.items():
      view = self._pick_rule(table, key, tuple(shape))
      if view is not None:
        self._views[key] = view
    used = {leaf for _, leaf in self._views.values()}
    unknown = sorted(k for k in leaves if k not in used and not table.is_ignored(k))
    if unknown:
      raise CheckpointError(
          f"{self.folder} has {len(unknown)} leaves the model does not read, e.g. "
          f"{unknown[:4]}. The preset may not match the checkpoint (e.g. another size), "
          "or this is a layout tunix_zoo does not read.")
    if any(table.is_ignored(k) for k in leaves):
      log.warning("%s is a multimodal checkpoint: loading its language model only; the "
                  "vision weights are skipped.", self.folder)
    self._expected = dict(expected)
    _return_large_blocks_on_free()
    # Asked once: on gs:// each question is a request.
    self._ocdbt = self._uses_ocdbt()
    self._context = ocp.type_handlers.get_ts_context(use_ocdbt=self._ocdbt)
    if context:
      self._context = ts.Context(ts.Context.Spec(dict(context)), self._context)
    self._stores: dict[str, Any] = {}
    self._lock = threading.Lock()
    self._resized_logged = False
    # A leaf several HF keys select from (gating_einsum: gate and up) is read once per
    # region for all of them, as any read decodes (and on gs:// fetches) its whole chunk.
    self._sharers = collections.Counter(leaf for rule, leaf in self._views.values()
                                        if rule.select is not None)
    self._shared: dict[tuple[Any, ...], list[Any]] = {}

  def _uses_ocdbt(self) -> bool:
    return (self.folder / "manifest.ocdbt").is_file() or any(self.folder.glob("ocdbt.process_*"))

  def _pick_rule(self, table: OrbaxTable, key: str,
                 shape: tuple[int, ...]) -> tuple[OrbaxRule, str] | None:
    seen = []
    for rule in table.rules:
      leaf = rule.leaf_for(key)
      if leaf is None or leaf not in self._leaves:
        continue
      view = rule.view_shape(tuple(self._leaves[leaf].shape))
      seen.append((leaf, tuple(self._leaves[leaf].shape)))
      if view == shape or (rule.resize_rows and view is not None
                           and view[1:] == shape[1:]):
        return rule, leaf
    if seen:
      leaf, leaf_shape = seen[0]
      raise CheckpointError(
          f"Leaf {leaf!r} in {self.folder} has shape {leaf_shape}, which gives no {shape} for "
          f"{key!r}: the preset does not match the checkpoint (another size?).")
    return None

  def keys(self) -> list[str]:
    """The HF keys this checkpoint gives, sorted."""
    return sorted(self._views)

  def __contains__(self, key: object) -> bool:
    return key in self._views

  def leaf_of(self, key: str) -> str:
    """The orbax leaf an HF key is read from."""
    return self._views[key][1]

  def shape(self, key: str) -> tuple[int, ...]:
    rule, leaf = self._views[key]
    view = rule.view_shape(tuple(self._leaves[leaf].shape))
    return self._expected[key] if rule.resize_rows else view

  def dtype(self, key: str) -> np.dtype:
    return np.dtype(self._leaves[self._views[key][1]].dtype)

  def nbytes(self, key: str) -> int:
    return math.prod(self.shape(key)) * self.dtype(key).itemsize

  def read(self, key: str, index: tuple[slice, ...] | None = None) -> np.ndarray:
    """``tensor[index]`` as a new C-contiguous array, read from the covering leaf region."""
    rule, leaf = self._views[key]
    shape = self.shape(key)
    index = tuple(index or ()) + (slice(None),) * (len(shape) - len(tuple(index or ())))
    bounds = [s.indices(n) for s, n in zip(index, shape)]
    if any(step != 1 for _, _, step in bounds):
      raise ValueError(f"{key}: only unit-step slices are read, got {index}.")
    if rule.resize_rows:
      return self._read_resized(key, rule, leaf, bounds)
    return self._read_view(key, rule, leaf, bounds)

  def _read_resized(self, key: str, rule: OrbaxRule, leaf: str,
                    bounds: list[tuple[int, int, int]]) -> np.ndarray:
    rows = self._leaves[leaf].shape[0]
    wanted = self._expected[key][0]
    if rows == wanted:
      return self._read_view(key, rule, leaf, bounds)
    if not self._resized_logged:
      self._resized_logged = True
      log.warning(
          "%s: %r has %d rows, the model's vocab %d: %s.", self.folder, leaf, rows, wanted,
          f"dropping the {rows - wanted} unused rows" if rows > wanted
          else f"the {wanted - rows} missing rows (image soft-token slots) read as zeros")
    (begin, end, _), rest = bounds[0], bounds[1:]
    out = aligned_empty((end - begin,) + tuple(e - b for b, e, _ in rest), self.dtype(key))
    stop = min(end, rows)
    out[max(stop - begin, 0):] = 0
    if stop > begin:
      out[:stop - begin] = self._read_view(key, rule, leaf, [(begin, stop, 1)] + rest)
    return out

  def _read_view(self, key: str, rule: OrbaxRule, leaf: str,
                 bounds: list[tuple[int, int, int]]) -> np.ndarray:
    leaf_shape = tuple(self._leaves[leaf].shape)
    inner_shape = leaf_shape[1:] if rule.select is not None else leaf_shape
    perm = rule.perm or tuple(range(len(inner_shape)))
    transposed = [inner_shape[p] for p in perm]
    merge = rule.merge or (1,) * len(transposed)
    # Per transposed axis, the range to read; per HF axis, the offset into what is read.
    ranges: list[tuple[int, int]] = []
    trims: list[slice] = []
    axis = 0
    for (begin, end, _), count in zip(bounds, merge):
      inner = math.prod(transposed[axis + 1:axis + count])
      first, last = begin // inner, -(-end // inner)
      ranges.append((first, last))
      ranges.extend((0, n) for n in transposed[axis + 1:axis + count])
      trims.append(slice(begin - first * inner, end - first * inner))
      axis += count
    region = [None] * len(inner_shape)
    for t, p in enumerate(perm):
      region[p] = slice(*ranges[t])
    leaf_index = ((rule.select,) if rule.select is not None else ()) + tuple(region)
    block = self._read_leaf(key, leaf, leaf_index).transpose(perm)
    merged, axis = [], 0
    for count in merge:
      merged.append(math.prod(block.shape[axis:axis + count]))
      axis += count
    view = block.reshape(merged)[tuple(trims)]
    # tensorstore's arrays are 16-byte aligned; JAX's CPU client copies those, leaving two
    # copies in flight. An aligned copy made here is adopted as is, and the read freed.
    out = aligned_empty(view.shape, view.dtype)
    out[...] = view
    return out

  def _store(self, key: str, leaf: str) -> Any:
    import orbax.checkpoint as ocp
    import tensorstore as ts
    from etils import epath

    with self._lock:
      store = self._stores.get(leaf)
    if store is not None:
      return store
    info = ocp.type_handlers.ParamInfo(
        name=self._leaves[leaf].name, parent_dir=epath.Path(self.folder),
        use_zarr3=bool(getattr(self._leaves[leaf], "use_zarr3", False)),
        ts_context=self._context)
    spec = ocp.type_handlers.get_json_tspec_read(info, use_ocdbt=self._ocdbt)
    try:
      store = ts.open(spec, read=True, context=self._context).result()
    except Exception as e:  # tensorstore raises ValueError for every storage failure.
      raise self._leaf_error(key, leaf, e) from e
    if tuple(store.shape) != tuple(self._leaves[leaf].shape):
      raise CheckpointError(
          f"Leaf {leaf!r} (for {key!r}) in {self.folder} stores shape {tuple(store.shape)}, "
          f"but the checkpoint's metadata says {tuple(self._leaves[leaf].shape)}: the "
          "folder is corrupt; download it again.")
    with self._lock:
      return self._stores.setdefault(leaf, store)

  def _read_leaf(self, key: str, leaf: str, index: tuple[Any, ...]) -> np.ndarray:
    if self._views[key][0].select is None or self._sharers[leaf] < 2:
      return self._read_region(key, leaf, index)
    select, region = index[0], index[1:]
    region_key = (leaf,) + tuple((s.start, s.stop) for s in region)
    with self._lock:
      entry = self._shared.get(region_key)
      first = entry is None
      if first:  # [every selection's block, once read; the reads still to come]
        entry = self._shared[region_key] = [concurrent.futures.Future(), self._sharers[leaf]]
      entry[1] -= 1
      if entry[1] == 0:
        del self._shared[region_key]
    if first:
      try:
        entry[0].set_result(self._read_region(key, leaf, (slice(None),) + region))
      except BaseException as e:  # pylint: disable=broad-except  (the other keys raise it too)
        entry[0].set_exception(e)
    return entry[0].result()[select]

  def _read_region(self, key: str, leaf: str, index: tuple[Any, ...]) -> np.ndarray:
    store = self._store(key, leaf)
    try:
      return np.asarray(store[index].read().result())
    except Exception as e:
      raise self._leaf_error(key, leaf, e) from e

  def _leaf_error(self, key: str, leaf: str, error: Exception) -> CheckpointError:
    first_line = str(error).splitlines()[0][:300] if str(error) else type(error).__name__
    return CheckpointError(
        f"Cannot read leaf {leaf!r} (for {key!r}) of {self.folder}: {first_line}. The "
        "checkpoint is truncated or incomplete: download it again.")

  def close(self) -> None:
    with self._lock:
      self._stores.clear()

  def __enter__(self) -> OrbaxCheckpoint:
    return self

  def __exit__(self, *exc_info: object) -> None:
    self.close()


class RemoteOrbaxCheckpoint(OrbaxCheckpoint):
  """An orbax checkpoint on ``gs://``, read in place: tensorstore fetches each read's
  chunks from the bucket (endpoint ``TENSORSTORE_GCS_HTTP_URL``, Application Default
  Credentials).

  A leaf is usually one chunk, which a read of any part of it fetches whole, so reading
  per device slice would fetch each leaf once per device. Like the remote safetensors
  reader it offers ``read_rows``: the loader then reads each tensor once per process, in
  row blocks, and reshards on the devices (:mod:`~tunix_zoo.checkpoint.row_blocks`).
  """

  def read_rows(self, key: str, start: int, stop: int) -> np.ndarray:
    """Rows ``[start, stop)`` of the HF tensor ``key``."""
    return self.read(key, (slice(start, stop),))


def open_checkpoint(folder: str | os.PathLike[str], table: OrbaxTable,
                    expected: Mapping[str, tuple[int, ...]], *,
                    context: Mapping[str, Any] | None = None
                    ) -> OrbaxCheckpoint:
  """The reader for ``folder``: :class:`RemoteOrbaxCheckpoint` for ``gs://``, else
  :class:`OrbaxCheckpoint`."""
  remote = str(folder).startswith("gs://")
  return (RemoteOrbaxCheckpoint if remote else OrbaxCheckpoint)(folder, table, expected,
                                                               context=context)


