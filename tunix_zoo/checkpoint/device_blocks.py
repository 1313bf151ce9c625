"""Filling a sharded device array from host blocks of bounded size.

``jax.make_array_from_callback`` asks for each device's whole slice, so the host holds
that slice until its copy to the device is done: 1.24 GB for Qwen3-8B's embedding on one
GPU. :func:`load_in_blocks` instead allocates the array on its devices, then walks the
device slices block by block: one small array per block (every device's piece is the
same block of its own slice, made with ``make_array_from_callback``), written in place
into the array (a jitted ``dynamic_update_slice`` under ``shard_map``, the array
donated). The host holds at most two blocks of a tensor (one being read, one being
copied), the devices the array plus those blocks. Blocks are whole rows of the slice's
first axis; where one such row passes the budget (a stacked ``[layers, out, in]``
weight), blocks take one index of the leading axes and rows of the first axis that fits.
Concatenating blocks on the devices instead would hold the tensor twice there.

On CPU the host array a callback returns becomes the device buffer itself (XLA:CPU
adopts 64-byte-aligned memory), so a whole slice there costs no host copy and blocks
would only add one: :func:`uses_blocks` leaves CPU devices to whole slices unless told.
XLA:CPU also writes a bf16 block through f32, one pass over the whole array per block.

Example::

    if uses_blocks(shape, dtype, sharding, 64 << 20):
      array = load_in_blocks(shape, dtype, sharding, read, 64 << 20)
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec


def uses_blocks(shape: tuple[int, ...], dtype: Any, sharding: NamedSharding,
                block_bytes: int | None, on_cpu: bool = False) -> bool:
  """Whether a tensor of ``shape`` goes to ``sharding``'s devices in blocks: the distinct
  slices this process's devices hold (read at once otherwise) pass ``block_bytes`` (None:
  never), and the devices are not CPUs (unless ``on_cpu``)."""
  if block_bytes is None or not shape:
    return False
  if not on_cpu and all(d.platform == "cpu" for d in sharding.mesh.devices.flat):
    return False
  slice_bytes = math.prod(sharding.shard_shape(shape)) * np.dtype(dtype).itemsize
  return _distinct_slices(shape, sharding) * slice_bytes > block_bytes


def load_in_blocks(shape: tuple[int, ...], dtype: Any, sharding: NamedSharding,
                   read: Callable[[tuple[slice, ...]], np.ndarray],
                   block_bytes: int, whole_rows: bool = False) -> jax.Array:
  """The array of ``shape`` in ``sharding``, filled from ``read(index)`` (host arrays of
  ``tensor[index]`` in ``dtype``) in blocks of at most ``block_bytes`` host bytes over
  this process's devices (one element of a device slice at least; with ``whole_rows``,
  for a ``read`` of rows only, one row of the first axis at least)."""
  fill = BlockFill(shape, dtype, sharding, block_bytes, whole_rows=whole_rows)
  for corner in fill.corners():
    fill.write(corner, read)
  return fill.array


class BlockFill:
  """One array being filled block by block (see the module docstring).

  ``rows`` fixes the blocks to that many rows of the first axis (arrays filled in step,
  block for block, as a quantized weight's values and scales); otherwise the budget
  sets the block. Example::

      fill = BlockFill(shape, dtype, sharding, 32 << 20)
      for corner in fill.corners():
        fill.write(corner, read)
      array = fill.array
  """

  def __init__(self, shape: tuple[int, ...], dtype: Any, sharding: NamedSharding,
               block_bytes: int, whole_rows: bool = False, rows: int | None = None):
    self._shape, self._dtype, self._sharding = tuple(shape), np.dtype(dtype), sharding
    self._local = tuple(sharding.shard_shape(self._shape))
    if rows is None:
      budget = max(1, block_bytes // _distinct_slices(self._shape, sharding))
      last = 0 if whole_rows else len(self._local) - 1
      self._axis, self._rows = _block_box(self._local, self._dtype.itemsize, budget, last)
    else:
      self._axis, self._rows = 0, min(rows, self._local[0])
    self._box = (1,) * self._axis + (self._rows,) + self._local[self._axis + 1:]
    parts = tuple(g // n for g, n in zip(self._shape, self._local))
    self._block_shape = tuple(b * p for b, p in zip(self._box, parts))
    self.array = jnp.zeros(self._shape, self._dtype, device=sharding)
    self._write = _writer(sharding, len(self._shape))

  def corners(self) -> Iterator[tuple[int, ...]]:
    """Each block's first index within a device slice."""
    return _corners(self._local, self._axis, self._rows)

  def write(self, corner: tuple[int, ...],
            read: Callable[[tuple[slice, ...]], np.ndarray]) -> None:
    """Makes the block at ``corner`` from ``read`` (called with each distinct piece's
    index into the whole tensor, once) and writes it into :attr:`array`."""
    pieces: dict[tuple[Any, ...], np.ndarray] = {}

    def read_piece(index: tuple[slice, ...]) -> np.ndarray:
      # This device's part of the block: the same box of its own slice.
      wanted = tuple(slice(start, start + extent) for start, extent in (
          ((s.start or 0) // b * n + c, b)
          for s, b, n, c in zip(index, self._box, self._local, corner)))
      if _key(wanted) not in pieces:  # devices holding the same slice share one read
        pieces[_key(wanted)] = read(wanted)
      return pieces[_key(wanted)]

    block = jax.make_array_from_callback(self._block_shape, self._sharding, read_piece)
    # The previous block is written (so its host copy is free) before this one goes: the
    # host holds at most two blocks of this array, however far reads run ahead.
    self.array.block_until_ready()
    self.array = self._write(self.array, block, np.asarray(corner, np.int32))


def _key(index: tuple[slice, ...]) -> tuple[Any, ...]:
  return tuple((s.start, s.stop, s.step) for s in index)


def _distinct_slices(shape: tuple[int, ...], sharding: NamedSharding) -> int:
  """How many different slices this process's devices hold (replicas hold the same)."""
  return len({_key(index) for index in sharding.addressable_devices_indices_map(shape).values()})


def _block_box(local: tuple[int, ...], itemsize: int, budget: int,
               last_axis: int) -> tuple[int, int]:
  """``(axis, rows)``: blocks take one index of each axis before ``axis``, ``rows`` of
  ``axis`` and all of the rest; ``axis`` is the first whose rows fit the budget (at most
  ``last_axis``), and the fewest blocks that fit it share its rows evenly (the last
  overlaps by under a row per block)."""
  for axis in range(len(local)):
    row_bytes = math.prod(local[axis + 1:]) * itemsize
    if row_bytes <= budget or axis == last_axis:
      blocks = -(-local[axis] // max(1, min(local[axis], budget // row_bytes)))
      return axis, -(-local[axis] // blocks)
  raise AssertionError("unreachable: the loop stops at last_axis")


def _corners(local: tuple[int, ...], axis: int, rows: int) -> Iterator[tuple[int, ...]]:
  """Each block's first index within a device slice. The last block along ``axis`` ends
  at the slice's end, overlapping the one before (rewriting a few rows with the same
  values), so every block has one shape and one compiled write serves them all."""
  starts = list(range(0, local[axis] - rows, rows)) + [local[axis] - rows]
  rest = (0,) * (len(local) - axis - 1)
  for leading in itertools.product(*(range(n) for n in local[:axis])):
    for start in starts:
      yield leading + (start,) + rest


@functools.lru_cache(maxsize=None)
def _writer(sharding: NamedSharding, ndim: int) -> Callable:
  """``write(array, block, corner)``: each device writes its piece of ``block`` into its
  slice of ``array`` at ``corner`` (the same for every device), in place."""
  spec = PartitionSpec(*(tuple(sharding.spec) + (None,) * (ndim - len(sharding.spec))))

  def write_local(array: jax.Array, block: jax.Array, corner: jax.Array) -> jax.Array:
    return jax.lax.dynamic_update_slice(array, block, tuple(corner[a] for a in range(ndim)))

  write = jax.shard_map(write_local, mesh=sharding.mesh,
                        in_specs=(spec, spec, PartitionSpec()), out_specs=spec)
  return jax.jit(write, out_shardings=sharding, donate_argnums=0)
