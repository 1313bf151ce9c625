"""Loading, the forward and export on a mesh spanning two JAX processes.

Two worker processes (tests/multiprocess_worker.py) with 4 CPU devices each form a
``jax.distributed`` cluster on 127.0.0.1 and a global ``(2, 4)`` ``("fsdp", "tp")`` mesh:
process 0 holds row 0 (fsdp=0) and process 1 row 1. They load one checkpoint for each axis
type (Explicit and Auto). This file checks what they report: every process read exactly
the blocks its devices hold, each distinct block once (a fully replicated tensor once, a
block shared by several of its devices once); the jitted global forward equals the
single-process logits; and an export from the two processes is one complete checkpoint
that loads back bit-exactly.

The qwen3 reference case has 8 heads (sharded on tp=4), 2 KV heads and a vocabulary of
131 (neither divides tp=4, so those are replicated on tp and sharded on fsdp only).
"""

from __future__ import annotations

import collections
import json
import os
import pathlib
import re
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from tests import reference
from tests.workers import running_workers
from tunix_zoo.automodel import load_folder
from tunix_zoo.checkpoint.reader import CheckpointFiles

# Every test reads the module's two-process cluster, the file's most expensive part: one
# pytest-xdist worker runs them all (`--dist loadgroup`), so the cluster starts once.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("multiprocess_cluster")]

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
CASE = "qwen3"
NUM_PROCESSES = 2
# Generous for a loaded 2-core machine; the workers take about 35 s there.
WORKER_TIMEOUT_S = 150
MAX_ABS = 1e-5
AXIS_TYPES = ["explicit", "auto"]


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
  """Runs the two workers once; returns the checkpoint, inputs and their outputs."""
  root = tmp_path_factory.mktemp("multiprocess")
  checkpoint = root / "checkpoint"
  reference.make_checkpoint(CASE, checkpoint)
  tokens, mask, _ = reference.left_padded_batch(seed=3, batch=2)
  np.savez(root / "inputs.npz", tokens=tokens, mask=mask)
  exports = root / "exports"
  exports.mkdir()
  env = {
      **os.environ,
      # 4 devices each; the session's other XLA flags (its fast compile settings) too.
      "XLA_FLAGS": re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                          os.environ.get("XLA_FLAGS", ""))
                   + " --xla_force_host_platform_device_count=4",
      "JAX_PLATFORMS": "cpu",
      "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
  }
  port = free_port()
  logs = [root / f"worker_{i}.log" for i in range(NUM_PROCESSES)]
  with running_workers(logs, WORKER_TIMEOUT_S) as workers:
    for i, log in enumerate(logs):
      with open(log, "w") as log_file:
        workers.append(subprocess.Popen(
            [sys.executable, "-m", "tests.multiprocess_worker", "--process-id", str(i),
             "--num-processes", str(NUM_PROCESSES), "--port", str(port),
             "--checkpoint", str(checkpoint), "--inputs", str(root / "inputs.npz"),
             "--out", str(root), "--export", str(exports / "model")],
            cwd=REPO_ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT,
        ))
  results = [json.loads((root / f"result_{i}.json").read_text()) for i in range(NUM_PROCESSES)]
  return {"root": root, "checkpoint": checkpoint, "tokens": tokens, "mask": mask,
          "results": results, "exports": exports}


@pytest.fixture(scope="module")
def single(cluster):
  """The checkpoint loaded in this process on one device."""
  mesh = jax.make_mesh((1, 1), ("fsdp", "tp"), devices=jax.devices()[:1])
  return load_folder(cluster["checkpoint"], mesh)


@pytest.fixture(scope="module")
def single_logits(cluster, single):
  """The single-process model's logits of the cluster's inputs: one jitted forward rather
  than one compile per eager op."""
  logits, _ = nnx.jit(lambda m, t, k: m(t, attention_mask=k))(
      single, jax.numpy.asarray(cluster["tokens"]), jax.numpy.asarray(cluster["mask"]))
  return np.asarray(logits)


def expected_reads(held: dict) -> collections.Counter:
  """(parameter, block) -> 1 for every distinct block a process's devices hold."""
  return collections.Counter({
      (name, json.dumps(block)) for name, info in held.items() for block in info["blocks"]
  })


def block_bytes(block: list[list[int]], itemsize: int) -> int:
  return int(np.prod([stop - start for start, stop in block])) * itemsize


@pytest.mark.parametrize("axis_type", AXIS_TYPES)
def test_each_process_reads_exactly_its_blocks_once(cluster, axis_type):
  with CheckpointFiles(cluster["checkpoint"]) as ckpt:
    checkpoint_bytes = ckpt.total_bytes
  per_process_blocks = []
  for process, result in enumerate(cluster["results"]):
    run = result[axis_type]
    assert result["process_index"] == process
    # fsdp spans the processes, tp each process's own devices.
    assert run["mesh_process_rows"] == [[0] * 4, [1] * 4]
    held = run["held"]
    assert held["layers.0.attn.q_proj.weight"]["spec"] == ["tp", "fsdp"]
    assert held["layers.0.attn.k_proj.weight"]["spec"] == [None, "fsdp"]
    assert held["embed_tokens.weight"]["spec"] == [None, "fsdp"]
    assert held["final_norm.weight"]["fully_replicated"]

    reads = collections.Counter((name, json.dumps(block)) for name, block in run["reads"])
    expected = expected_reads(held)
    assert reads == expected, (
        f"process {process} read {sorted((reads - expected).elements())[:5]} beyond its "
        f"blocks and missed {sorted((expected - reads).elements())[:5]}")
    assert run["bytes_read"] == sum(
        block_bytes(json.loads(block), held[name]["itemsize"]) for name, block in expected)
    assert run["bytes_read"] < checkpoint_bytes
    per_process_blocks.append({key for key in expected if not held[key[0]]["fully_replicated"]})
  # The processes hold different halves (fsdp) of every sharded parameter.
  assert not per_process_blocks[0] & per_process_blocks[1]


@pytest.mark.parametrize("axis_type", AXIS_TYPES)
def test_global_forward_equals_single_process(cluster, single_logits, axis_type):
  expected = single_logits
  real = cluster["mask"].astype(bool)
  for process in range(NUM_PROCESSES):
    got = np.load(cluster["root"] / f"logits_{axis_type}_{process}.npy")
    assert got.shape == expected.shape
    diff = np.abs(got - expected)[real].max()
    assert diff <= MAX_ABS, f"process {process}: max abs logit diff {diff}"


def test_export_from_two_processes_is_one_exact_checkpoint(cluster, single):
  exported = cluster["exports"] / "model"
  # One folder, no staging leftovers from either process.
  assert sorted(p.name for p in cluster["exports"].iterdir()) == ["model"]
  with CheckpointFiles(exported) as got, CheckpointFiles(cluster["checkpoint"]) as original:
    assert got.keys() == original.keys()
    for key in original.keys():
      np.testing.assert_array_equal(got.read(key), original.read(key), err_msg=key)
  mesh = jax.make_mesh((1, 1), ("fsdp", "tp"), devices=jax.devices()[:1])
  reloaded = dict(nnx.to_flat_state(nnx.state(load_folder(exported, mesh), nnx.Param)))
  params = dict(nnx.to_flat_state(nnx.state(single, nnx.Param)))
  assert reloaded.keys() == params.keys()
  for path, param in params.items():
    np.testing.assert_array_equal(reloaded[path][...], param[...], err_msg=str(path))
