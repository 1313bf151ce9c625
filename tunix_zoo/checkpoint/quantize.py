"""Quantizing a checkpoint's Linear weights while they load, one device slice at a time.

:func:`load_quantized` makes a quantized weight's two arrays (values and scales, see
:mod:`tunix_zoo.layers.quantized`) with ``jax.make_array_from_callback``: for each device
it reads the rows of the float tensor that device's slice covers (whole rows, since a
scale may span all inputs), quantizes them on the host in blocks of rows, and hands over
that device's columns. A row range is read and quantized once for both arrays and every
device holding it; host memory holds one weight's quantized rows, never a float copy of
the model, and on accelerators (:mod:`~tunix_zoo.checkpoint.device_blocks`) a large
weight's two arrays fill in step, block by block, so it holds one block's rows. :func:`check_not_prequantized` refuses checkpoints quantized by other tools.

Example::

    values, scales, nbytes = load_quantized(ckpt, "model.layers.0.mlp.up_proj.weight",
                                            Quantization.of("int8"), jnp.bfloat16,
                                            values_sharding, scales_sharding)
"""

from __future__ import annotations

import threading
from typing import Any, Iterable

import jax
import numpy as np

from tunix_zoo.checkpoint import device_blocks
from tunix_zoo.errors import CheckpointError
from tunix_zoo.layers.quantized import Quantization

# Float rows quantized at a time: bounds the float32 temporaries (a 28672-wide row block
# of 512 rows is 56 MiB).
ROWS_PER_BLOCK = 512

# Tensor-name endings of weights other tools stored quantized, and what stored them.
FOREIGN_QUANTIZED_SUFFIXES = {
    ".weight_scale": "fp8 / compressed-tensors (weight_scale)",
    ".weight_scale_inv": "fp8 block-quantized (weight_scale_inv)",
    ".qweight": "GPTQ / AWQ (qweight)",
    ".qzeros": "GPTQ / AWQ (qzeros)",
    ".scales": "GPTQ / AWQ (scales)",
    ".absmax": "bitsandbytes (absmax)",
    ".SCB": "bitsandbytes int8 (SCB)",
    ".quant_map": "bitsandbytes 4-bit (quant_map)",
}


def check_not_prequantized(where: Any, hf_config: dict[str, Any] | None,
                           keys: Iterable[str]) -> None:
  """Raises CheckpointError for a checkpoint another tool stored quantized (a
  ``quantization_config`` in config.json, or tensors such as ``*.weight_scale``).

  Example::

      with CheckpointFiles(folder) as files:
        check_not_prequantized(folder, read_hf_config(folder), files.keys())
  """
  found = []
  if hf_config and hf_config.get("quantization_config") is not None:
    config = hf_config["quantization_config"]
    method = config.get("quant_method", "unnamed") if isinstance(config, dict) else config
    found.append(f"config.json's quantization_config (quant_method {method!r})")
  for key in keys:
    suffix = next((s for s in FOREIGN_QUANTIZED_SUFFIXES if key.endswith(s)), None)
    if suffix is not None:
      found.append(f"tensor {key!r}: {FOREIGN_QUANTIZED_SUFFIXES[suffix]}")
      break
  if found:
    raise CheckpointError(
        f"{where} is a checkpoint quantized by another tool ({'; '.join(found)}), which "
        "tunix_zoo does not read. Load the unquantized (bf16 / fp32) checkpoint with "
        "quantization='int8', 'int4', 'nf4' or 'fp8' to quantize it while loading.")


class _RowQuantizer:
  """Quantized row ranges of one checkpoint tensor, each computed once (thread-safe)."""

  def __init__(self, ckpt: Any, key: str, quantization: Quantization, scale_dtype: Any,
               shape: tuple[int, int]):
    self._ckpt, self._key, self._scheme = ckpt, key, quantization
    self._scale_dtype, self._shape = scale_dtype, shape
    self._rows: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
    self._lock = threading.Lock()
    self.nbytes = 0  # host bytes of the quantized rows

  def rows(self, index: slice) -> tuple[np.ndarray, np.ndarray]:
    start, stop, _ = index.indices(self._shape[0])
    with self._lock:
      if (start, stop) not in self._rows:
        blocks = [
            self._scheme.quantize(
                np.asarray(self._ckpt.read(self._key, (slice(r, min(r + ROWS_PER_BLOCK, stop)),
                                                       slice(None)))),
                np, self._scale_dtype)
            for r in range(start, stop, ROWS_PER_BLOCK)
        ]
        values = np.concatenate([v for v, _ in blocks])
        scales = np.concatenate([s for _, s in blocks])
        self._rows[(start, stop)] = values, scales
        self.nbytes += values.nbytes + scales.nbytes
      return self._rows[(start, stop)]


def load_quantized(ckpt: Any, key: str, quantization: Quantization, scale_dtype: Any,
                   values_sharding: jax.sharding.NamedSharding,
                   scales_sharding: jax.sharding.NamedSharding,
                   block_bytes: int | None = None,
                   blocks_on_cpu: bool = False) -> tuple[jax.Array, jax.Array, int]:
  """``(values, scales, host bytes still held)`` of checkpoint tensor ``key``
  (``[out, in]``), quantized slice by slice into the two shardings (see the module's
  example). Where :func:`device_blocks.uses_blocks` says so for ``block_bytes``, both
  arrays are filled in step, in blocks of the same rows, each row range quantized once
  per block (the host then holds one block's quantized rows, not the slices')."""
  shape = tuple(ckpt.shape(key))
  values_shape, scales_shape = quantization.shapes(*shape)
  if (device_blocks.uses_blocks(values_shape, quantization.storage_dtype, values_sharding,
                                block_bytes, blocks_on_cpu)
      and _same_rows(values_shape, values_sharding, scales_shape, scales_sharding)):
    return _load_in_blocks(ckpt, key, quantization, scale_dtype, values_sharding,
                           scales_sharding, block_bytes)
  rows = _RowQuantizer(ckpt, key, quantization, scale_dtype, shape)
  values = jax.make_array_from_callback(
      values_shape, values_sharding, lambda index: rows.rows(index[0])[0][:, index[1]])
  scales = jax.make_array_from_callback(
      scales_shape, scales_sharding, lambda index: rows.rows(index[0])[1][:, index[1]])
  return values, scales, rows.nbytes


def _same_rows(values_shape: tuple[int, int], values_sharding: jax.sharding.NamedSharding,
               scales_shape: tuple[int, int],
               scales_sharding: jax.sharding.NamedSharding) -> bool:
  """Whether every device holds the same rows of the values as of the scales."""
  rows = lambda shape, sharding: {d: index[0].indices(shape[0]) for d, index in
                                  sharding.addressable_devices_indices_map(shape).items()}
  return rows(values_shape, values_sharding) == rows(scales_shape, scales_sharding)


def _load_in_blocks(ckpt: Any, key: str, quantization: Quantization, scale_dtype: Any,
                    values_sharding: jax.sharding.NamedSharding,
                    scales_sharding: jax.sharding.NamedSharding,
                    block_bytes: int) -> tuple[jax.Array, jax.Array, int]:
  shape = tuple(ckpt.shape(key))
  values_shape, scales_shape = quantization.shapes(*shape)
  row_ranges = len({index[0].indices(shape[0]) for index in
                    values_sharding.addressable_devices_indices_map(values_shape).values()})
  row_bytes = row_ranges * (values_shape[1] * quantization.storage_dtype.itemsize
                            + scales_shape[1] * np.dtype(scale_dtype).itemsize)
  local_rows = values_sharding.shard_shape(values_shape)[0]
  blocks = -(-local_rows // max(1, min(local_rows, block_bytes // row_bytes)))
  rows = -(-local_rows // blocks)
  values = device_blocks.BlockFill(values_shape, quantization.storage_dtype, values_sharding,
                                   block_bytes, rows=rows)
  scales = device_blocks.BlockFill(scales_shape, scale_dtype, scales_sharding, block_bytes,
                                   rows=rows)
  for corner in values.corners():
    # This block's rows, quantized once for both arrays, then dropped.
    block_rows = _RowQuantizer(ckpt, key, quantization, scale_dtype, shape)
    values.write(corner, lambda index, q=block_rows: q.rows(index[0])[0][:, index[1]])
    scales.write(corner, lambda index, q=block_rows: q.rows(index[0])[1][:, index[1]])
  return values.array, scales.array, 0
