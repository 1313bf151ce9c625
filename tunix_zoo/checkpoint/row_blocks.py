"""Reading a tensor in its file's layout (blocks of rows), then resharding on the devices.

A safetensors tensor is row-major, and most weights shard ``fsdp`` on their second axis,
so a process's own slice of an ``[out, in]`` weight is half of every row: a remote reader
would need one request per row, or fetch the covering rows (the whole tensor) on every
process. For a reader that offers ``read_rows`` (:class:`~tunix_zoo.checkpoint.
remote_safetensors.RemoteCheckpoint`), the loader instead reads each tensor into a
*staging* layout, its rows split evenly over every device of the mesh (padded up to a
multiple of the device count), so each process fetches a disjoint 1/P of the tensor in a
few contiguous ranges; one jitted identity then reshards it to the target sharding.
A target that already splits only rows, and splits them across processes, is read
directly.

Multi-controller JAX needs every process to launch collectives in the same order, while
the loader's threads finish their reads in any order: :class:`OrderedResharder` issues
the reshards in one fixed order::

    staging = staging_sharding(reader, shape, target)
    if staging is not None:
      array = resharder.load(path, shape, staging, target, read)
"""

from __future__ import annotations

import collections
import functools
import threading
from typing import Any, Callable, Hashable

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from tunix_zoo.errors import CheckpointError


def staging_sharding(reader: Any, shape: tuple[int, ...],
                     target: NamedSharding) -> NamedSharding | None:
  """The row-split layout to read a tensor of ``shape`` in, or None to read ``target``'s
  blocks directly (the reader has no ``read_rows``, the tensor is 0-d, or each process
  holds one block of ``target``, of whole rows, that no other process holds)."""
  if not hasattr(reader, "read_rows") or not shape:
    return None
  holders: dict[tuple[Any, ...], set[int]] = {}
  rows_only = True
  for device, index in target.devices_indices_map(shape).items():
    rows_only &= all(s == slice(None) for s in index[1:])
    holders.setdefault(_block_key(index), set()).add(device.process_index)
  blocks_per_process = collections.Counter(p for processes in holders.values() for p in processes)
  if (rows_only and max(blocks_per_process.values()) == 1
      and all(len(processes) == 1 for processes in holders.values())):
    return None  # each process reads one contiguous range, its own
  mesh = target.mesh
  return NamedSharding(mesh, PartitionSpec(tuple(mesh.axis_names)))


def _block_key(index: tuple[slice, ...]) -> tuple[Any, ...]:
  return tuple((s.start, s.stop, s.step) for s in index)


def padded_rows(rows: int, staging: NamedSharding) -> int:
  """``rows`` rounded up to a multiple of the staging layout's device count."""
  devices = staging.mesh.size
  return -(-rows // devices) * devices


@functools.lru_cache(maxsize=None)
def _reshard(target: NamedSharding, rows: int, padded: int, ndim: int) -> Callable:
  """A jitted identity from the staging layout to ``target``, dropping padding rows."""
  spec = tuple(target.spec) + (None,) * (ndim - len(target.spec))
  whole_rows = NamedSharding(target.mesh, PartitionSpec(None, *spec[1:]))
  explicit = all(t == AxisType.Explicit for t in target.mesh.axis_types)

  def reshard(x: jax.Array) -> jax.Array:
    if padded != rows:
      # Slicing a sharded axis is refused under Explicit axes: gather the rows first.
      x = (jax.sharding.reshard(x, whole_rows) if explicit
           else jax.lax.with_sharding_constraint(x, whole_rows))
      x = x[:rows]
    return x

  return jax.jit(reshard, out_shardings=target)


class OrderedResharder:
  """Reads staged tensors in parallel; issues their reshards in ``order`` on every process.

  Example::

      resharder = OrderedResharder([path for path, _ in flat if path in staged])
      array = resharder.load(path, shape, staging, target, read)  # from any thread
  """

  def __init__(self, order: list[Hashable]):
    self._turn = {key: n for n, key in enumerate(order)}
    self._next = 0
    self._failed = False
    self._cond = threading.Condition()

  def load(self, key: Hashable, shape: tuple[int, ...], staging: NamedSharding,
           target: NamedSharding, read: Callable[[tuple[slice, ...]], np.ndarray]
           ) -> jax.Array:
    """``read`` (called with row-only indices) into ``staging``, resharded to ``target``.

    Waits for the reshards of the keys before ``key`` in the order, so that every process
    launches them in the same sequence.
    """
    rows = shape[0]
    padded = padded_rows(rows, staging)
    padded_shape = (padded,) + tuple(shape[1:])
    # This process's devices hold neighbouring row blocks: read each run of them once.
    runs: list[list[int]] = []
    for start, stop in sorted({index[0].indices(padded)[:2] for index in
                               staging.addressable_devices_indices_map(padded_shape).values()}):
      start, stop = min(start, rows), min(stop, rows)
      if runs and start <= runs[-1][1]:
        runs[-1][1] = max(runs[-1][1], stop)
      elif stop > start:
        runs.append([start, stop])

    def read_block(index: tuple[slice, ...]) -> np.ndarray:
      start, stop, _ = index[0].indices(padded)
      real_start, real_stop = min(start, rows), min(stop, rows)
      run = next((r for r in runs if r[0] <= real_start and real_stop <= r[1]), None)
      real = (read((slice(real_start, real_stop),)) if run is None else
              read((slice(*run),))[real_start - run[0]:real_stop - run[0]])
      if stop <= rows:
        return real
      pad = np.zeros((stop - max(start, rows),) + tuple(shape[1:]), real.dtype)
      return np.concatenate([real, pad])

    staged, error = None, None
    try:
      staged = jax.make_array_from_callback(padded_shape, staging, read_block)
    except Exception as e:  # pylint: disable=broad-except
      error = e  # raised in this key's turn, which must still pass to the next key
    with self._cond:
      self._cond.wait_for(lambda: self._next == self._turn[key])
      try:
        if error is not None:
          self._failed = True
          raise error
        if self._failed:
          raise CheckpointError("Not resharded: reading an earlier tensor failed.")
        return _reshard(target, rows, padded, len(shape))(staged)
      finally:
        self._next += 1
        self._cond.notify_all()
