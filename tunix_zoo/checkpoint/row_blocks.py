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
the reshards in one fixed order. A reshard is a collective that waits for every process,
so with several processes they first agree, through jax.distributed's key-value store,
that each read its blocks: a read that fails on one process fails the load on all of
them, with every wait bounded, instead of leaving the others in a collective::

    with OrderedResharder(order) as resharder:
      staging = staging_sharding(reader, shape, target)
      if staging is not None:
        array = resharder.load(path, shape, staging, target, read)
"""

from __future__ import annotations

import collections
import functools
import itertools
import os
import threading
from typing import Any, Callable, Hashable

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from tunix_zoo.checkpoint import device_blocks
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


# Seconds a process waits for the others to report a tensor read (or the whole load) before
# it gives up: one tensor's read under the sources' retry policy takes far less.
PEER_TIMEOUT_ENV = "TUNIX_ZOO_PEER_TIMEOUT_S"
DEFAULT_PEER_TIMEOUT_S = 600.0
_loads = itertools.count()  # every process opens its loads in the same order


def peer_timeout_s() -> float:
  """``TUNIX_ZOO_PEER_TIMEOUT_S``, or 600."""
  text = os.environ.get(PEER_TIMEOUT_ENV, "")
  try:
    value = float(text) if text else DEFAULT_PEER_TIMEOUT_S
  except ValueError:
    value = -1.0
  if value <= 0:
    raise CheckpointError(f"{PEER_TIMEOUT_ENV}={text!r} is not a positive number of "
                          f"seconds. Set it to e.g. {DEFAULT_PEER_TIMEOUT_S:g}, or unset it.")
  return value


class _Peers:
  """What the other processes of a multi-process load report, through jax.distributed's
  key-value store (the coordinator every process already talks to)."""

  def __init__(self, load: int):
    from jax._src import distributed  # pylint: disable=import-outside-toplevel  (as orbax does)

    self._client = distributed.global_state.client
    self._prefix = f"tunix_zoo/load/{load}"
    self._me = jax.process_index()
    self._others = [p for p in range(jax.process_count()) if p != self._me]
    self._timeout_ms = int(peer_timeout_s() * 1000)

  def agree(self, step: str, what: str, error: BaseException | None) -> None:
    """Posts this process's outcome of ``step``, then waits for every other's; raises
    CheckpointError if one failed or did not report within the timeout."""
    self._client.key_value_set(f"{self._prefix}/{step}/{self._me}",
                               "ok" if error is None else f"{type(error).__name__}: {error}")
    for process in self._others:
      try:
        outcome = self._client.blocking_key_value_get(f"{self._prefix}/{step}/{process}",
                                                      self._timeout_ms)
      except Exception as e:  # pylint: disable=broad-except  (jax raises its runtime error)
        raise CheckpointError(
            f"Process {process} did not report {what} within {self._timeout_ms / 1000:g} s "
            f"({str(e).splitlines()[0][:200]}); the load was abandoned on process "
            f"{self._me}. See process {process}'s log; {PEER_TIMEOUT_ENV} sets the "
            "wait.") from e
      if outcome != "ok" and error is None:
        raise CheckpointError(f"Process {process} failed {what} ({outcome[:500]}); the load "
                              f"was abandoned on every process.")


class OrderedResharder:
  """Reads staged tensors in parallel; issues their reshards in ``order`` on every process.

  With several processes, each reshard waits until every process has read its blocks of
  that tensor, and leaving the ``with`` block waits until every process has finished the
  load: a failure anywhere is raised everywhere (CheckpointError on the others).

  Example::

      with OrderedResharder([path for path, _ in flat if path in staged]) as resharder:
        array = resharder.load(path, shape, staging, target, read)  # from any thread
  """

  def __init__(self, order: list[Hashable]):
    self._turn = {key: n for n, key in enumerate(order)}
    self._next = 0
    self._failed = False
    self._cond = threading.Condition()
    self._peers = _Peers(next(_loads)) if jax.process_count() > 1 else None

  def __enter__(self) -> OrderedResharder:
    return self

  def __exit__(self, exc_type: object, error: BaseException | None, *_: object) -> None:
    if self._peers is not None:
      self._peers.agree("done", "the load", error)

  def load(self, key: Hashable, shape: tuple[int, ...], staging: NamedSharding,
           target: NamedSharding, read: Callable[[tuple[slice, ...]], np.ndarray],
           block_bytes: int | None = None, dtype: Any = None) -> jax.Array:
    """``read`` (called with row-only indices) into ``staging``, resharded to ``target``.

    With ``block_bytes``, the staging array is filled in blocks of rows of ``dtype``
    (:mod:`~tunix_zoo.checkpoint.device_blocks`), each read on its own; otherwise each
    run of this process's rows is read at once. Waits for the reshards of the keys before
    ``key`` in the order, so that every process launches them in the same sequence.
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
      run = None if block_bytes is not None else next(
          (r for r in runs if r[0] <= real_start and real_stop <= r[1]), None)
      real = (read((slice(real_start, real_stop),)) if run is None else
              read((slice(*run),))[real_start - run[0]:real_stop - run[0]])
      if stop <= rows:
        return real
      pad = np.zeros((stop - max(start, rows),) + tuple(shape[1:]), real.dtype)
      return np.concatenate([real, pad])

    staged, error = None, None
    try:
      if self._failed:
        raise CheckpointError("Not read: reading an earlier tensor failed.")
      staged = (jax.make_array_from_callback(padded_shape, staging, read_block)
                if block_bytes is None else
                device_blocks.load_in_blocks(padded_shape, dtype, staging, read_block,
                                             block_bytes, whole_rows=True))
    except Exception as e:  # pylint: disable=broad-except
      error = e  # raised in this key's turn, which must still pass to the next key
    with self._cond:
      self._cond.wait_for(lambda: self._next == self._turn[key])
      try:
        if self._peers is not None and not self._failed:
          try:
            self._peers.agree(f"tensor/{self._turn[key]}", f"reading {key}", error)
          except CheckpointError:
            self._failed = True
            raise
        if error is not None:
          self._failed = True
          raise error
        if self._failed:
          raise CheckpointError("Not resharded: reading an earlier tensor failed.")
        return _reshard(target, rows, padded, len(shape))(staged)
      finally:
        self._next += 1
        self._cond.notify_all()
