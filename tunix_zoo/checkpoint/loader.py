"""Streams a checkpoint into an abstract NNX model, already sharded.

For every parameter of the abstract model (built with ``nnx.eval_shape``, so no
memory), the family's key map names the checkpoint tensor, the sharding rules give its
``NamedSharding`` on the caller's mesh, and ``jax.make_array_from_callback`` asks for
each addressable device's slice, read straight from the checkpoint. Host memory stays
bounded by the slices in flight; a process reads only the slices its devices hold. On
accelerators a tensor whose slices pass ``BLOCK_BYTES`` travels in blocks of rows written
into the array on the devices (:mod:`~tunix_zoo.checkpoint.device_blocks`), so the host
never holds the whole of a large tensor.

The checkpoint is any :class:`CheckpointReader`: a safetensors folder
(:class:`~tunix_zoo.checkpoint.reader.CheckpointFiles`, opened from a path) or
an orbax one (:class:`~tunix_zoo.checkpoint.orbax_io.OrbaxCheckpoint`, whose tensorstore
reads fetch only the slice asked for).

Example::

    abstract = nnx.eval_shape(lambda: Qwen3ForCausalLM(cfg, rngs=nnx.Rngs(0)))
    model = load_checkpoint(abstract, "/ckpt", QWEN3_PARAMS, mesh)
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import os
import re
import threading
from typing import Any, Callable, Protocol

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from tunix_zoo import sharding
from tunix_zoo.build import module_path, parameter_shardings
from tunix_zoo.checkpoint import device_blocks, quantize, row_blocks
from tunix_zoo.checkpoint.keymap import KeyMap
from tunix_zoo.checkpoint.reader import CheckpointFiles
from tunix_zoo.errors import CheckpointError
from tunix_zoo.layers import quantized
from tunix_zoo.layers.stacked import unrolled_path, unrolled_paths

log = logging.getLogger(__name__)

READ_THREADS = min(8, os.cpu_count() or 1)
# Host bytes whose copy to the devices may still be under way. Reads outrun the copies;
# on an H100 host this bound cut the 8B load from 3.3 s to 2.8 s and its peak
# anonymous memory from 2.2 to 1.9 GB (benchmarks/README.md).
MAX_BYTES_IN_FLIGHT = 256 << 20
# A tensor whose slices on this host pass this many bytes goes to accelerators in blocks
# of at most this many host bytes (device_blocks), so the host never holds a whole 1.24 GB
# embedding; None sends whole slices. CPU devices adopt a whole slice's host buffer as
# their own (no copy), so they take whole slices unless BLOCKS_ON_CPU.
BLOCK_BYTES: int | None = 32 << 20
BLOCKS_ON_CPU = False


class CheckpointReader(Protocol):
  """HF-named tensors read slice by slice: what :func:`load_checkpoint` reads from."""

  def keys(self) -> list[str]: ...

  def shape(self, key: str) -> tuple[int, ...]: ...

  def read(self, key: str, index: tuple[slice, ...] | None = None) -> np.ndarray:
    """A new host array holding ``tensor[index]``."""

  def __enter__(self) -> "CheckpointReader": ...

  def __exit__(self, *exc_info: object) -> None: ...


_LAYER_PATH = re.compile(r"layers\.(\d+)\.")


def check_layer_count(folder: str | os.PathLike, key_map: KeyMap, num_layers: int,
                      variant: str | None = None) -> None:
  """Raises CheckpointError when the checkpoint lacks some of ``num_layers`` decoder layers.

  Read from the tensor names alone, before any model is built: a config.json claiming
  50000 layers over a one-layer checkpoint fails here at once, not after building them.
  """
  layers: set[int] = set()
  with CheckpointFiles(folder, variant) as ckpt:
    for key in ckpt.keys():
      for spelling in [key] + [old + key[len(new):] for old, new in key_map.aliases
                               if key.startswith(new)]:
        path = key_map.module_path(spelling)
        match = _LAYER_PATH.match(path) if path else None
        if match:
          layers.add(int(match[1]))
          break
  # Layers the weights hold beyond the config are left to the loader's unused-tensor check.
  if layers and not set(range(num_layers)) <= layers:
    raise CheckpointError(
        f"config.json in {folder} says the model has {num_layers} layers, but the weights "
        f"hold {len(layers)} (numbered {min(layers)}..{max(layers)}): config.json and weights "
        "disagree. Use the config.json that belongs to these weights."
    )


def load_checkpoint(
    abstract: nnx.Module,
    folder: str | os.PathLike | CheckpointReader,
    key_map: KeyMap,
    mesh: Mesh,
    *,
    sharding_rules: sharding.Rules | None = None,
    progress: Callable[[int], None] | None = None,
) -> nnx.Module:
  """Fills ``abstract``'s parameters from the checkpoint in ``folder`` (or a reader).

  Raises CheckpointError for missing, unexpected or misshaped tensors. Each parameter
  is cast to the abstract model's dtype; quantized Linear weights (an abstract model with
  ``quantization``) are quantized slice by slice (:mod:`tunix_zoo.checkpoint.quantize`).
  ``progress`` is called with bytes loaded.
  ``variant`` reads ``model.<variant>.safetensors`` (or its index) instead.
  """
  graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
  shardings = parameter_shardings(abstract, mesh, sharding_rules)
  flat = nnx.to_flat_state(params)
  reader = CheckpointFiles(folder) if isinstance(folder, (str, os.PathLike)) else folder
  folder = getattr(reader, "folder", folder)
  with reader as ckpt:
    available = set(ckpt.keys())
    # Module path -> its checkpoint key, or (stacked) a list per slice of the leading axis
    # of keys or lists: a scanned model's layers stack over layers, then over experts.
    wanted: dict[str, KeyTree] = {}
    stacked: set[str] = set()
    scales = {path for path, var in flat if quantized.is_quantization_scale(var)}
    for path, var in flat:
      if path in scales:
        continue  # quantized with its weight
      name = module_path(path)
      wanted[name] = _checkpoint_keys(
          key_map, name, var.get_metadata(), quantized.dense_shape(var), ckpt, available, folder
      )
      if not isinstance(wanted[name], str):
        stacked.add(name)
    tied = getattr(abstract.config, "tie_word_embeddings", False)
    used = set(_leaves(wanted.values()))
    unexpected = sorted(
        k for k in available - used
        if not key_map.is_ignored(k) and not (tied and k.endswith("lm_head.weight"))
    )
    if unexpected:
      raise CheckpointError(
          f"Checkpoint {folder} has {len(unexpected)} tensors the model does not use, e.g. "
          f"{unexpected[:5]}. The config.json may not match the weights (e.g. wrong "
          "num_hidden_layers), or the family's key map lacks them."
      )

    def load_one(item):
      path, var = item
      name = module_path(path)
      keys, dtype, shape = wanted[name], var.dtype, tuple(var.shape)
      if quantized.is_quantized_weight(var):
        return load_quantized(path, var)

      def read(index):
        if name not in stacked:
          return np.asarray(ckpt.read(keys, index)).astype(dtype, copy=False)
        return gather(keys, tuple(index) + (slice(None),) * (len(shape) - len(index)), shape)

      def gather(keys, index, shape):
        # Gather the device's slice of the stack one checkpoint tensor at a time, so
        # host memory holds the slice plus one tensor's part of it.
        if isinstance(keys, str):
          return ckpt.read(keys, index)
        # The slice's shape, from a zero-stride view (nothing allocated).
        out = np.empty(np.broadcast_to(np.empty((), dtype), shape)[index].shape, dtype)
        for n, row in enumerate(range(*index[0].indices(shape[0]))):
          out[n] = gather(keys[row], index[1:], shape[1:])
        return out

      if path in staging:
        padded = (row_blocks.padded_rows(shape[0], staging[path]),) + shape[1:]
        if device_blocks.uses_blocks(padded, dtype, staging[path], BLOCK_BYTES, BLOCKS_ON_CPU):
          array = resharder.load(path, shape, staging[path], shardings[name], read,
                                 BLOCK_BYTES, dtype)
        else:
          read_once = _OncePerBlock(read)
          array = resharder.load(path, shape, staging[path], shardings[name], read_once)
          transfers.add(array, read_once.nbytes)
      elif device_blocks.uses_blocks(shape, dtype, shardings[name], BLOCK_BYTES,
                                     BLOCKS_ON_CPU):
        array = device_blocks.load_in_blocks(shape, dtype, shardings[name], read,
                                             BLOCK_BYTES)
      else:
        read_once = _OncePerBlock(read)
        array = jax.make_array_from_callback(shape, shardings[name], read_once)
        transfers.add(array, read_once.nbytes)
      if progress is not None:
        progress(int(np.prod(var.shape)) * np.dtype(dtype).itemsize)
      return [(path, array)]

    def load_quantized(path, var):
      scale_path = path[:-1] + ("weight_scale",)
      values, scales, nbytes = quantize.load_quantized(
          ckpt, wanted[module_path(path)], var.get_metadata()["quantization"],
          np.dtype(variables[scale_path].dtype), shardings[module_path(path)],
          shardings[module_path(scale_path)], BLOCK_BYTES, BLOCKS_ON_CPU)
      transfers.add(values, nbytes)
      transfers.add(scales, 0)
      if progress is not None:
        progress(values.nbytes + scales.nbytes)
      return [(path, values), (scale_path, scales)]

    # A reader with ``read_rows`` (a remote one) reads in row blocks and reshards on the
    # devices; see row_blocks.
    staging = {path: row_blocks.staging_sharding(ckpt, tuple(var.shape),
                                                 shardings[module_path(path)])
               for path, var in flat if module_path(path) not in stacked
               and path not in scales and not quantized.is_quantized_weight(var)}
    staging = {path: layout for path, layout in staging.items() if layout is not None}
    transfers = TransferWindow(MAX_BYTES_IN_FLIGHT)
    variables = dict(flat)
    # With several processes, leaving it waits until every process has finished the load.
    with row_blocks.OrderedResharder([path for path, _ in flat if path in staging]) as resharder, \
        concurrent.futures.ThreadPoolExecutor(READ_THREADS) as pool:
      loaded = dict(pair for pairs in pool.map(load_one, [(p, v) for p, v in flat
                                                          if p not in scales])
                    for pair in pairs)
  for path, var in flat:
    var.set_value(loaded[path])
  return nnx.merge(graphdef, nnx.from_flat_state(flat), rest)


KeyTree = str | list["KeyTree"]


def _checkpoint_keys(key_map: KeyMap, name: str, metadata: dict[str, Any],
                     shape: tuple[int, ...], ckpt: CheckpointReader, available: set[str],
                     folder: Any) -> KeyTree:
  """The checkpoint key of the parameter at ``name``, or a list per slice of its leading
  axis (of keys or lists) for a stacked one; raises CheckpointError for a missing or
  misshaped tensor."""
  per_layer = unrolled_paths(name, metadata)
  if per_layer is not None:
    return [_checkpoint_keys(key_map, layer, {}, shape[1:], ckpt, available, folder)
            for layer in per_layer]
  name = unrolled_path(name, metadata)
  per_slice = key_map.stacked_keys(name, shape[0]) if shape else None
  keys = []
  for wanted_key in per_slice or [key_map.checkpoint_key(name)]:
    key = _find_key(key_map, wanted_key, available)
    if key is None:
      raise CheckpointError(
          f"Checkpoint {folder} has no tensor for model parameter {name!r} "
          f"(looked for {wanted_key!r}). Is this checkpoint of the "
          f"architecture its config.json names?"
      )
    expected = shape if per_slice is None else shape[1:]
    if tuple(ckpt.shape(key)) != expected:
      raise CheckpointError(
          f"Tensor {key!r} in {folder} has shape {tuple(ckpt.shape(key))}, but the model "
          f"expects {expected} for {name!r}: config.json and weights disagree."
      )
    keys.append(key)
  return keys if per_slice is not None else keys[0]


def _leaves(trees: Any) -> list[str]:
  """Every key of a collection of key trees."""
  out: list[str] = []
  for tree in trees:
    out.extend([tree] if isinstance(tree, str) else _leaves(tree))
  return out


def _find_key(key_map: KeyMap, key: str, available: set[str]) -> str | None:
  return next((k for k in key_map.spellings(key) if k in available), None)


class _OncePerBlock:
  """``read``, called once per distinct block of the array.

  ``make_array_from_callback`` calls back once per addressable device. Devices of this
  process that hold the same block (the parameter is replicated on a mesh axis within the
  process) share one read instead of each reading it again.
  """

  def __init__(self, read: Callable[[Any], np.ndarray]):
    self._read = read
    self._blocks: dict[tuple[Any, ...], np.ndarray] = {}

  def __call__(self, index: tuple[slice, ...]) -> np.ndarray:
    key = tuple((s.start, s.stop, s.step) for s in index)
    if key not in self._blocks:
      self._blocks[key] = self._read(index)
    return self._blocks[key]

  @property
  def nbytes(self) -> int:
    """Host bytes read so far."""
    return sum(block.nbytes for block in self._blocks.values())


class TransferWindow:
  """Bounds the host bytes of arrays whose copy to the devices may be in flight.

  ``add`` records a freshly made array with the host bytes it was made from, then, while
  the recorded bytes pass ``limit``, waits for the oldest arrays (their host buffers are
  then free). The newest array is never waited for, so a parameter larger than the limit
  still loads. Safe to call from several threads.

  Example::

      window = TransferWindow(256 << 20)
      window.add(jax.device_put(host_array, sharding), host_array.nbytes)
  """

  def __init__(self, limit: int):
    self.limit = limit
    self.bytes_in_flight = 0
    self._pending: collections.deque[tuple[jax.Array, int]] = collections.deque()
    self._lock = threading.Lock()

  def add(self, array: jax.Array, nbytes: int) -> None:
    with self._lock:
      self._pending.append((array, nbytes))
      self.bytes_in_flight += nbytes
    while True:
      with self._lock:
        if self.bytes_in_flight <= self.limit or len(self._pending) <= 1:
          return
        oldest, oldest_bytes = self._pending.popleft()
      # Outside the lock, so other threads may wait for the next oldest meanwhile; the
      # bytes stay counted until the copy is done.
      oldest.block_until_ready()
      with self._lock:
        self.bytes_in_flight -= oldest_bytes
