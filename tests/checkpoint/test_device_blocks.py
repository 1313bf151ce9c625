"""Large tensors reach the devices in blocks: every layout fills exactly, no host read
passes the block budget, devices holding the same slice share each read, and a model
loaded in blocks holds the same parameters as one loaded in whole slices."""

from __future__ import annotations

import threading

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from tests import reference
from tunix_zoo.automodel import AutoModel
from tunix_zoo.checkpoint import device_blocks, loader
from tunix_zoo.layers.quantized import Quantization

AXIS_TYPES = [AxisType.Auto, AxisType.Explicit]


class RecordedReads:
  """``read(index)`` of a numpy tensor, recording the bytes of every read."""

  def __init__(self, tensor: np.ndarray):
    self.tensor, self.sizes = tensor, []
    self._lock = threading.Lock()

  def __call__(self, index):
    out = np.ascontiguousarray(self.tensor[index])
    with self._lock:
      self.sizes.append(out.nbytes)
    return out


# (shape, spec, budget in bytes): a replicated tensor whose rows do not divide into
# blocks (the last block overlaps), stacked ones whose one layer passes the budget.
CASES = [
    ((40, 24), P("fsdp", "tp"), 200),
    ((40, 24), P(None, "tp"), 500),
    ((37, 16), P(), 700),
    ((3, 16, 8), P(None, "fsdp", "tp"), 40),
    ((3, 10, 8), P(None, None, "tp"), 128),
]


@pytest.mark.parametrize("axis_type", AXIS_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("shape, spec, budget", CASES, ids=lambda c: str(c))
def test_blocks_fill_the_array_within_the_budget(axis_type, shape, spec, budget):
  mesh = reference.mesh_2x4(axis_type)
  target = NamedSharding(mesh, spec)
  tensor = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
  read = RecordedReads(tensor)
  assert device_blocks.uses_blocks(shape, tensor.dtype, target, budget, on_cpu=True)

  array = device_blocks.load_in_blocks(shape, tensor.dtype, target, read, budget)

  assert array.sharding == target
  np.testing.assert_array_equal(np.asarray(array), tensor)
  distinct_slices = len({tuple((s.start, s.stop) for s in index) for index in
                         target.devices_indices_map(shape).values()})
  assert max(read.sizes) * distinct_slices <= budget
  # Each distinct slice is read once (the overlap of its last block aside), not once per
  # device holding it.
  slice_bytes = np.prod(target.shard_shape(shape)) * tensor.itemsize
  assert distinct_slices * slice_bytes <= sum(read.sizes) < 2 * distinct_slices * slice_bytes


def test_blocks_for_large_tensors_off_cpu_unless_told():
  target = NamedSharding(reference.one_device_mesh(), P())
  assert not device_blocks.uses_blocks((2048, 2048), np.float32, target, 1 << 10)
  assert device_blocks.uses_blocks((2048, 2048), np.float32, target, 1 << 10, on_cpu=True)
  assert not device_blocks.uses_blocks((16, 16), np.float32, target, 1 << 10, on_cpu=True)
  assert not device_blocks.uses_blocks((2048, 2048), np.float32, target, None, on_cpu=True)
  # What counts is what the host would hold at once: every distinct slice of its devices.
  mesh = reference.mesh_2x4(AxisType.Auto)
  sharded, replicated = NamedSharding(mesh, P("fsdp", "tp")), NamedSharding(mesh, P())
  assert device_blocks.uses_blocks((64, 64), np.float32, sharded, 4096, on_cpu=True)
  assert not device_blocks.uses_blocks((16, 16), np.float32, replicated, 4096, on_cpu=True)


def parameters(model) -> dict[str, jax.Array]:
  return {".".join(map(str, path)): var.get_value()
          for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.mark.parametrize("axis_type, scan_layers", [(AxisType.Auto, False),
                                                    (AxisType.Explicit, False),
                                                    (AxisType.Explicit, True)],
                         ids=["auto", "explicit", "explicit-scanned"])
def test_model_loaded_in_blocks_equals_the_whole_slice_load(reference_checkpoints,
                                                            monkeypatch, axis_type, scan_layers):
  folder = str(reference_checkpoints["qwen3"][0])
  mesh = reference.mesh_2x4(axis_type)
  whole = parameters(AutoModel.from_pretrained(folder, mesh, scan_layers=scan_layers)[0])
  monkeypatch.setattr(loader, "BLOCKS_ON_CPU", True)
  monkeypatch.setattr(loader, "BLOCK_BYTES", 2048)  # every weight matrix goes in blocks

  blocked = parameters(AutoModel.from_pretrained(folder, mesh, scan_layers=scan_layers)[0])

  embedding = blocked["embed_tokens.weight"]
  assert device_blocks.uses_blocks(embedding.shape, embedding.dtype, embedding.sharding,
                                   2048, on_cpu=True)
  assert blocked.keys() == whole.keys()
  for name, value in whole.items():
    assert blocked[name].sharding == value.sharding, name
    np.testing.assert_array_equal(np.asarray(blocked[name]), np.asarray(value), err_msg=name)


@pytest.mark.parametrize("quantization", [Quantization("int8"),
                                          Quantization("int4", group_size=32)],
                         ids=["int8", "int4"])
def test_quantized_model_loaded_in_blocks_equals_the_whole_slice_load(
    reference_checkpoints, monkeypatch, quantization):
  folder = str(reference_checkpoints["qwen3"][0])
  mesh = reference.mesh_2x4(AxisType.Explicit)
  whole = parameters(AutoModel.from_pretrained(folder, mesh, quantization=quantization)[0])
  monkeypatch.setattr(loader, "BLOCKS_ON_CPU", True)
  monkeypatch.setattr(loader, "BLOCK_BYTES", 512)

  blocked = parameters(AutoModel.from_pretrained(folder, mesh, quantization=quantization)[0])

  values = blocked["layers.0.mlp.down_proj.weight"]
  assert values.dtype == quantization.storage_dtype
  assert device_blocks.uses_blocks(values.shape, values.dtype, values.sharding, 512, on_cpu=True)
  assert blocked.keys() == whole.keys()
  for name, value in whole.items():
    assert blocked[name].sharding == value.sharding, name
    np.testing.assert_array_equal(np.asarray(blocked[name]), np.asarray(value), err_msg=name)


def test_whole_row_blocks_never_split_a_row():
  # A row-only reader's layout (each device a run of rows, as streaming stages them),
  # with a budget under one row: blocks still take whole rows.
  target = NamedSharding(reference.mesh_2x4(AxisType.Explicit), P(("fsdp", "tp")))
  tensor = np.arange(16 * 8, dtype=np.float32).reshape(16, 8)
  indices = []

  def read_rows(index):
    indices.append(index)
    return tensor[index[0]]

  array = device_blocks.load_in_blocks(tensor.shape, tensor.dtype, target, read_rows, 8,
                                       whole_rows=True)

  np.testing.assert_array_equal(np.asarray(array), tensor)
  assert len(indices) == 16 and all(index[1] == slice(0, 8) for index in indices)
