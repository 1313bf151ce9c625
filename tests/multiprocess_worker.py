"""One process of the multi-process test (tests/test_multiprocess.py starts two).

It joins a ``jax.distributed`` cluster on 127.0.0.1, loads a checkpoint onto the global
``(2, 4)`` ``("fsdp", "tp")`` mesh for each axis type, and writes what the parent checks
into ``--out``: which tensor slices it read, which slices its devices hold, the checkpoint
bytes it read, and the global logits of a jitted forward. Then it exports the
last model it loaded to ``--export`` (every process calls ``save_pretrained``; process 0
writes).

Run as ``python -m tests.multiprocess_worker --process-id 0 --port 12345 ...`` with
``XLA_FLAGS=--xla_force_host_platform_device_count=4`` in the environment.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import threading
import traceback
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from tunix_zoo import automodel, registry
from tunix_zoo.automodel import load_folder, read_hf_config
from tunix_zoo.checkpoint import loader
from tunix_zoo.checkpoint.export import save_pretrained
from tunix_zoo.build import module_path
from tunix_zoo.checkpoint.reader import CheckpointFiles

AXIS_TYPES = {"explicit": AxisType.Explicit, "auto": AxisType.Auto}


def block(index: tuple[slice, ...], shape: tuple[int, ...]) -> list[list[int]]:
  """``[[start, stop], ...]`` per dimension: a slice index as JSON, trailing dims whole."""
  index = tuple(index) + (slice(None),) * (len(shape) - len(index))
  out = []
  for s, dim in zip(index, shape):
    start, stop, step = s.indices(dim)
    assert step == 1, f"unexpected strided read {s}"
    out.append([start, stop])
  return out


class RecordingFiles(CheckpointFiles):
  """CheckpointFiles that records every slice read and keeps ``bytes_read`` after close."""

  instances: list[RecordingFiles] = []

  def __init__(self, folder: Any, variant: str | None = None):
    super().__init__(folder, variant)
    self.reads: list[tuple[str, list[list[int]]]] = []
    self.final_bytes_read = 0
    self._reads_lock = threading.Lock()
    RecordingFiles.instances.append(self)

  def read(self, key: str, index: tuple[slice, ...] | None = None) -> np.ndarray:
    with self._reads_lock:
      self.reads.append((key, block(index or (), self.shape(key))))
    return super().read(key, index)

  def close(self) -> None:
    self.final_bytes_read = self.bytes_read
    super().close()


def held_blocks(model: nnx.Module) -> dict[str, dict[str, Any]]:
  """Per parameter: its shape, whether it is fully replicated, its addressable blocks."""
  out = {}
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    value = var[...]
    indices = value.sharding.addressable_devices_indices_map(value.shape)
    out[module_path(path)] = {
        "shape": list(value.shape),
        "itemsize": value.dtype.itemsize,
        "fully_replicated": value.sharding.is_fully_replicated,
        "spec": [None if a is None else a if isinstance(a, str) else list(a)
                 for a in value.sharding.spec],
        "blocks": [block(index, value.shape) for index in indices.values()],
    }
  return out


# One jitted function: models of one structure on one mesh (a streamed load and the local
# load it is compared with) share its compiled program.
_forward = nnx.jit(lambda m, t, k: m(t, attention_mask=k))


def global_logits(model: nnx.Module, mesh: jax.sharding.Mesh, tokens: np.ndarray,
                  mask: np.ndarray) -> np.ndarray:
  """The jitted forward on global inputs, gathered to every process as numpy."""
  replicated = NamedSharding(mesh, PartitionSpec())
  as_global = lambda x: jax.make_array_from_callback(  # noqa: E731
      x.shape, replicated, lambda index: x[index])
  logits, _ = _forward(model, as_global(tokens), as_global(mask))
  return np.asarray(multihost_utils.process_allgather(logits, tiled=True))


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--process-id", type=int, required=True)
  parser.add_argument("--num-processes", type=int, default=2)
  parser.add_argument("--port", type=int, required=True)
  parser.add_argument("--checkpoint", required=True)
  parser.add_argument("--inputs", required=True, help="npz with tokens and mask")
  parser.add_argument("--out", required=True)
  parser.add_argument("--export", required=True, help="folder to export the last model to")
  args = parser.parse_args()

  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.config.update("jax_default_matmul_precision", "highest")
  jax.distributed.initialize(
      coordinator_address=f"127.0.0.1:{args.port}", num_processes=args.num_processes,
      process_id=args.process_id, initialization_timeout=60,
  )
  # load_folder opens the reader it hands the loader; the loader opens one for the layer check.
  automodel.CheckpointFiles = loader.CheckpointFiles = RecordingFiles
  key_map = registry.family_for_hf_config(read_hf_config(args.checkpoint)).param_table
  inputs = np.load(args.inputs)
  out = pathlib.Path(args.out)
  result: dict[str, Any] = {
      "process_index": jax.process_index(),
      "local_devices": [d.id for d in jax.local_devices()],
  }
  for name, axis_type in AXIS_TYPES.items():
    mesh = jax.make_mesh((2, 4), ("fsdp", "tp"), axis_types=(axis_type,) * 2)
    RecordingFiles.instances.clear()
    model = load_folder(args.checkpoint, mesh)
    (files,) = [f for f in RecordingFiles.instances if f.reads]
    result[name] = {
        "mesh_process_rows": [[d.process_index for d in row] for row in mesh.devices],
        "reads": [[key_map.module_path(key), b] for key, b in files.reads],
        "bytes_read": files.final_bytes_read,
        "held": held_blocks(model),
    }
    np.save(out / f"logits_{name}_{args.process_id}.npy",
            global_logits(model, mesh, inputs["tokens"], inputs["mask"]))
  save_pretrained(model, args.export)
  (out / f"result_{args.process_id}.json").write_text(json.dumps(result))
  jax.distributed.shutdown()


if __name__ == "__main__":
  try:
    main()
  except BaseException:
    traceback.print_exc()
    sys.stderr.flush()
    # Exit now: jax.distributed's exit barrier would wait for the other process, which
    # may itself be waiting in a collective for this one.
    os._exit(1)
