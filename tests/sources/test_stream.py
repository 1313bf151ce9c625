"""Streaming a checkpoint from GCS (the emulator) and the Hub (the test server): no copy.

Counting servers (tests/sources/counting.py) say how many body bytes each object cost;
every load is checked against the local-folder load of the same checkpoint. The
two-process runs (each process fetching only its half) are at the end, marked slow.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType

from tests import reference
from tests.sources import servers
from tests.sources.counting import counting
from tests.sources.fixtures import GCS_BUCKET, HF_REPO, upload_to_gcs
from tests.workers import running_workers
from tunix_zoo import AutoModel, ModelSource
from tunix_zoo.automodel import load_folder, load_stream
from tunix_zoo.checkpoint.reader import CheckpointFiles
from tunix_zoo.checkpoint.writer import ShardedWriter
from tunix_zoo.errors import SourceError
from tunix_zoo.sources import open_stream

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
MAX_ABS = 1e-6
TOKENS = np.array([[1, 5, 9, 3, 7, 2, 11, 4]], np.int32)
CountingGcsProxy = counting(servers.GcsProxy)
CountingHubServer = counting(servers.HubServer)


def make_sharded(source: pathlib.Path, folder: pathlib.Path) -> pathlib.Path:
  """``source``'s tensors rewritten as an index and (at least) two shards."""
  folder.mkdir(parents=True, exist_ok=True)
  with CheckpointFiles(source) as ckpt:
    total = ckpt.total_bytes
    with ShardedWriter(folder, max_shard_size=total // 2 + 1) as writer:
      for key in ckpt.keys():
        writer.add(key, ckpt.read(key))
  (folder / "config.json").write_bytes((source / "config.json").read_bytes())
  assert len(list(folder.glob("*.safetensors"))) >= 2
  return folder


def safetensors_bytes(folder: pathlib.Path) -> int:
  return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


# Compiled once per model structure and mesh, for every test here: eagerly, each of the
# model's operations would compile alone.
_forward = nnx.jit(lambda model, tokens: model(tokens)[0])


def logits(model) -> np.ndarray:
  return np.asarray(_forward(model, jax.numpy.asarray(TOKENS)))


def mesh_of(axis_type: str) -> jax.sharding.Mesh:
  kind = AxisType.Explicit if axis_type == "explicit" else AxisType.Auto
  return jax.make_mesh((2, 4), ("fsdp", "tp"), axis_types=(kind, kind))


@pytest.fixture(scope="module")
def folders(checkpoint, tmp_path_factory):
  return {"single": checkpoint,
          "sharded": make_sharded(checkpoint, tmp_path_factory.mktemp("sharded"))}


@pytest.fixture(scope="module")
def local_logits(folders):
  """(layout, axis type) -> the logits of the local-folder load, each computed once."""
  computed = {}

  def get(layout: str, axis_type: str) -> np.ndarray:
    if (layout, axis_type) not in computed:
      computed[layout, axis_type] = logits(load_folder(folders[layout], mesh_of(axis_type)))
    return computed[layout, axis_type]

  return get


@pytest.fixture(scope="module")
def proxy(gcs_emulator, folders):
  """A counting proxy in front of the emulator; both checkpoints uploaded."""
  with CountingGcsProxy(gcs_emulator) as server:
    for name, folder in folders.items():
      upload_to_gcs(server, folder, f"stream/{name}")
    yield server


@pytest.fixture
def gcs_stream(proxy, tmp_path, monkeypatch):
  proxy.faults.reset()
  proxy.reset_counts()
  monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.url)
  monkeypatch.setenv("TUNIX_ZOO_CACHE", str(tmp_path / "zoo-cache"))
  monkeypatch.setenv("TUNIX_ZOO_RETRY_BASE_DELAY_S", "0.05")
  return proxy


def url(name: str) -> str:
  return f"gs://{GCS_BUCKET}/stream/{name}"


def stream_gcs(name: str, mesh, **kwargs):
  return AutoModel.from_pretrained(None, mesh, model_source=ModelSource.GCS,
                                   model_path=url(name), stream=True, token="anon", **kwargs)


def data_requests(server, match: str) -> int:
  return sum(1 for path, _ in server.faults.ranges if match in path)


@pytest.mark.parametrize("layout", ["single", "sharded"])
@pytest.mark.parametrize("axis_type", ["explicit", "auto"])
def test_gcs_stream_equals_the_local_folder(gcs_stream, folders, local_logits, tmp_path, caplog,
                                           layout, axis_type):
  mesh = mesh_of(axis_type)
  with caplog.at_level("INFO", logger="tunix_zoo.checkpoint.remote_safetensors"):
    model, path = stream_gcs(layout, mesh)
  assert re.search(r"process 0 of 1 streamed \d+ of \d+ checkpoint bytes \(1\.\d+x\)",
                   caplog.text)
  assert path == url(layout)
  diff = np.abs(logits(model) - local_logits(layout, axis_type)).max()
  assert diff <= MAX_ABS
  # One process reads every byte once: the files, plus nothing but headers.
  sent = gcs_stream.bytes_sent(".safetensors?")
  with CheckpointFiles(folders[layout]) as ckpt:
    tensors, total = len(ckpt.keys()), ckpt.total_bytes
  assert total <= sent <= safetensors_bytes(folders[layout])
  # Per file: the 8-byte length and the header; then one range per tensor (the
  # process's 8 devices hold neighbouring row blocks), never one per row.
  files = len(list(folders[layout].glob("*.safetensors")))
  assert data_requests(gcs_stream, ".safetensors?") == 2 * files + tensors
  assert not (tmp_path / "zoo-cache").exists()


def test_gcs_stream_in_blocks_equals_the_local_folder(gcs_stream, folders, local_logits,
                                                     monkeypatch):
  from tunix_zoo.checkpoint import loader  # pylint: disable=import-outside-toplevel

  monkeypatch.setattr(loader, "BLOCKS_ON_CPU", True)  # as accelerators load large tensors
  monkeypatch.setattr(loader, "BLOCK_BYTES", 256)  # the embedding, LM head and MLP: 4 blocks
  model, _ = stream_gcs("single", mesh_of("explicit"))
  assert np.abs(logits(model) - local_logits("single", "explicit")).max() <= MAX_ABS
  # Each block's rows are fetched on their own: more ranges than one per tensor, and
  # still every byte once.
  with CheckpointFiles(folders["single"]) as ckpt:
    tensors, total = len(ckpt.keys()), ckpt.total_bytes
  assert data_requests(gcs_stream, ".safetensors?") > 2 + tensors
  assert total <= gcs_stream.bytes_sent(".safetensors?") <= safetensors_bytes(folders["single"])


def test_read_of_a_column_slice_fetches_its_covering_rows(gcs_stream, folders):
  with open_stream(None, source="gcs", model_path=url("single"), token="anon") as remote, \
      CheckpointFiles(folders["single"]) as local:
    key = "model.layers.0.mlp.gate_proj.weight"
    for index in [(slice(3, 9), slice(2, 6)), (slice(None, None, -2),), (slice(5, 5),), ()]:
      np.testing.assert_array_equal(remote.read(key, index), local.read(key, index))
    assert remote.read("model.norm.weight").dtype == np.float32


def test_dropped_connection_mid_range_is_retried(gcs_stream, local_logits):
  mesh = mesh_of("explicit")
  # The first two requests of the file are its header; the drop hits a tensor's range.
  gcs_stream.faults.drop(match="single%2Fmodel.safetensors", skip=2, times=2)
  model, _ = stream_gcs("single", mesh)
  assert np.abs(logits(model) - local_logits("single", "explicit")).max() <= MAX_ABS
  assert gcs_stream.faults.count("single%2Fmodel.safetensors") >= 2 + 12 + 2


def test_a_stalled_range_times_out_and_is_retried(gcs_stream, local_logits, monkeypatch):
  monkeypatch.setenv("TUNIX_ZOO_READ_TIMEOUT_S", "1")
  mesh = mesh_of("explicit")
  gcs_stream.faults.stall(match="single%2Fmodel.safetensors", skip=4, times=1)
  try:
    model, _ = stream_gcs("single", mesh)
  finally:
    gcs_stream.faults.release.set()
  assert gcs_stream.faults.stalled.is_set()
  assert np.abs(logits(model) - local_logits("single", "explicit")).max() <= MAX_ABS


def test_a_500_burst_is_retried(gcs_stream, local_logits):
  mesh = mesh_of("auto")
  gcs_stream.faults.status(500, match="single%2Fmodel.safetensors", skip=3, times=3)
  model, _ = stream_gcs("single", mesh)
  assert gcs_stream.faults.count("single%2Fmodel.safetensors") >= 2 + 12 + 3
  assert np.abs(logits(model) - local_logits("single", "auto")).max() <= MAX_ABS


def test_an_object_overwritten_during_the_load_is_a_source_error(gcs_stream, checkpoint,
                                                                 tmp_path):
  upload_to_gcs(gcs_stream, checkpoint, "stream/overwritten")
  reader = open_stream(None, source="gcs", model_path=url("overwritten"), token="anon")
  other = servers.make_checkpoint(tmp_path / "other", seed=1)
  upload_to_gcs(gcs_stream, other, "stream/overwritten")  # same shapes, new generation
  # config.json is read first: its response already carries the new generation.
  with pytest.raises(SourceError, match=r"overwritten/(config\.json|model\.safetensors): the "
                     r"object changed while"):
    load_stream(reader, mesh_of("explicit"))
  assert not (tmp_path / "zoo-cache").exists()


@pytest.mark.parametrize("fault", ["missing bucket", "access denied"])
def test_missing_bucket_or_denied_access_is_a_source_error(gcs_stream, tmp_path, fault):
  path = url("single")
  if fault == "missing bucket":
    path = "gs://no-such-bucket-zoo/stream/single"
    match = "does not exist"
  else:
    gcs_stream.faults.status(403, times=1000)
    match = "denied access"
  with pytest.raises(SourceError, match=match):
    AutoModel.from_pretrained(None, mesh_of("explicit"), model_source="gcs", model_path=path,
                              stream=True, token="anon")
  assert not (tmp_path / "zoo-cache").exists()


def test_stream_refuses_arguments_that_do_not_apply(gcs_stream, tmp_path):
  for kwargs, match in [({"model_download_path": str(tmp_path)}, "reads the checkpoint in place"),
                        ({"local_files_only": True}, "reads the checkpoint in place"),
                        ({"stream_concurrency": 0}, "positive int")]:
    with pytest.raises(SourceError, match=match):
      stream_gcs("single", mesh_of("explicit"), **kwargs)
  with pytest.raises(SourceError, match="GCS and the HF Hub only"):
    AutoModel.from_pretrained(None, model_source="local", model_path=str(tmp_path), stream=True)


@pytest.fixture
def hub_stream(hf_hub):
  hf_hub.faults.reset()
  return hf_hub


def test_hub_stream_equals_the_local_folder_with_range_requests(hub_stream, checkpoint,
                                                                local_logits, tmp_path,
                                                                monkeypatch):
  monkeypatch.setenv("TUNIX_ZOO_RETRY_BASE_DELAY_S", "0.05")
  mesh = mesh_of("explicit")
  hub_stream.faults.drop(match="/model.safetensors", skip=2, times=1)
  model, path = AutoModel.from_pretrained(HF_REPO, mesh, stream=True, stream_concurrency=4)
  assert path.endswith(HF_REPO)
  # The module's "single" folder is this checkpoint.
  assert np.abs(logits(model) - local_logits("single", "explicit")).max() <= MAX_ABS
  with CheckpointFiles(checkpoint) as ckpt:
    tensors = len(ckpt.keys())
  # Header (2), one range per tensor, one retried after the drop; at the pinned commit.
  ranges = [p for p, _ in hub_stream.faults.ranges if p.endswith("/model.safetensors")]
  assert len(ranges) == 2 + tensors + 1
  assert all(f"/resolve/{hub_stream.repos[HF_REPO].sha}/" in p for p in ranges)
  for name in ("hf-cache", "zoo-cache"):
    assert not (tmp_path / name).exists()


# ------------------------------------------------------------------ two processes

NUM_PROCESSES = 2
WORKER_TIMEOUT_S = 240
MP_HUB_REPO = "acme/stream-mp"
# (name, source, layout, axis type): both axis types, both layouts, both fetchers.
MP_RUNS = [("gcs_single", "gcs", "single", "explicit"),
           ("gcs_sharded", "gcs", "sharded", "auto"),
           ("hub_single", "huggingface", "single", "explicit")]


# The tests reading the two-process runs share one pytest-xdist worker, so that the runs
# (most of this file's time) happen once, not once per worker.
TWO_PROCESSES_GROUP = pytest.mark.xdist_group("stream_two_processes")


@pytest.fixture(scope="module")
def two_processes(gcs_emulator, tmp_path_factory):
  """Runs the two workers once, each behind its own counting GCS proxy and Hub server."""
  root = tmp_path_factory.mktemp("stream-mp")
  local = {"single": root / "single", "sharded": root / "sharded"}
  reference.make_checkpoint("qwen3", local["single"])
  reference.make_checkpoint("qwen3", local["sharded"], max_shard_size="300KB")
  assert len(list(local["sharded"].glob("*.safetensors"))) == 2
  tokens, mask, _ = reference.left_padded_batch(seed=3, batch=2)
  np.savez(root / "inputs.npz", tokens=tokens, mask=mask)
  proxies = [CountingGcsProxy(gcs_emulator) for _ in range(NUM_PROCESSES)]
  hubs = [CountingHubServer() for _ in range(NUM_PROCESSES)]
  for server in proxies + hubs:
    server.__enter__()
  try:
    for layout, folder in local.items():
      upload_to_gcs(proxies[0], folder, f"stream-mp/{layout}")
    for hub in hubs:
      hub.add_repo(MP_HUB_REPO, local["single"])
    runs = [{"name": name, "source": source, "layout": layout, "axis_type": axis_type,
             "local": str(local[layout]),
             "ref": f"gs://{GCS_BUCKET}/stream-mp/{layout}" if source == "gcs" else MP_HUB_REPO}
            for name, source, layout, axis_type in MP_RUNS]
    caches = run_workers(root, runs, proxies, hubs, WORKER_TIMEOUT_S)
    yield {"root": root, "local": local, "runs": runs, "mask": mask, "caches": caches,
           "proxies": proxies, "hubs": hubs,
           "results": [json.loads((root / f"result_{i}.json").read_text())
                       for i in range(NUM_PROCESSES)]}
  finally:
    for server in proxies + hubs:
      server.__exit__(None, None, None)


def run_workers(root: pathlib.Path, runs: list[dict], proxies: list, hubs: list,
                timeout_s: float, env: dict[str, str] | None = None) -> list[pathlib.Path]:
  """Runs the two workers (root holds inputs.npz) to the end, each against its own
  servers; fails the test if one exits non-zero or they run past ``timeout_s``. Returns
  their cache folders."""
  port = servers.free_port()
  logs = [root / f"worker_{i}.log" for i in range(NUM_PROCESSES)]
  caches = [root / f"cache_{i}" for i in range(NUM_PROCESSES)]
  with running_workers(logs, timeout_s) as workers:
    for i, log in enumerate(logs):
      worker_env = {
          **os.environ, **(env or {}),
          # 4 devices each; the session's other XLA flags (its compile settings) too.
          "XLA_FLAGS": re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                              os.environ.get("XLA_FLAGS", ""))
                       + " --xla_force_host_platform_device_count=4",
          "JAX_PLATFORMS": "cpu",
          "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
          "STORAGE_EMULATOR_HOST": proxies[i].url, "HF_ENDPOINT": hubs[i].url,
          "HF_HOME": str(caches[i] / "hf-home"), "HF_HUB_CACHE": str(caches[i] / "hf"),
          "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
          "HF_HUB_OFFLINE": "0", "TUNIX_ZOO_CACHE": str(caches[i] / "zoo"),
          "TUNIX_ZOO_QUIET": "1", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
      worker_env.pop("HF_TOKEN", None)
      with open(log, "w") as log_file:
        workers.append(subprocess.Popen(
            [sys.executable, "-m", "tests.stream_worker", "--process-id", str(i),
             "--port", str(port), "--runs", json.dumps(runs),
             "--inputs", str(root / "inputs.npz"), "--out", str(root)],
            cwd=REPO_ROOT, env=worker_env, stdout=log_file, stderr=subprocess.STDOUT))
  return caches


def server_counts(two_processes, run: dict, process: int) -> tuple[int, int, int]:
  """(safetensors body bytes, all body bytes, ranged safetensors requests) of a run's
  files that process ``process`` cost the server."""
  if run["source"] == "gcs":
    server, match = two_processes["proxies"][process], f"stream-mp/{run['layout']}/"
    ranges = [p for p, _ in server.faults.ranges if match.replace("/", "%2F") in p]
    is_weights = lambda path: ".safetensors?" in path  # noqa: E731
  else:
    server, match = two_processes["hubs"][process], MP_HUB_REPO
    ranges = [p for p, _ in server.faults.ranges]
    is_weights = lambda path: path.endswith(".safetensors")  # noqa: E731
  sent = {path: n for path, n in server.sent.items() if match in path}
  return (sum(n for path, n in sent.items() if is_weights(path)), sum(sent.values()),
          sum(1 for path in ranges if is_weights(path)))


@pytest.mark.slow
@TWO_PROCESSES_GROUP
@pytest.mark.parametrize("name", [name for name, *_ in MP_RUNS])
def test_each_process_fetches_about_half_in_few_requests(two_processes, name):
  run = next(r for r in two_processes["runs"] if r["name"] == name)
  folder = pathlib.Path(run["local"])
  size = safetensors_bytes(folder)
  with CheckpointFiles(folder) as ckpt:
    tensors = len(ckpt.keys())
  files = len(list(folder.glob("*.safetensors")))
  sent = []
  for process in range(NUM_PROCESSES):
    process_sent, all_sent, requests = server_counts(two_processes, run, process)
    assert process_sent <= 0.575 * size, (process, process_sent, size)
    # Per file its header (2 requests), then at most one range per tensor: no row reads.
    assert requests <= 2 * files + tensors, (process, requests)
    fetched = two_processes["results"][process][name]["bytes_fetched"]
    assert process_sent < fetched <= all_sent  # the client saw what the server sent
    sent.append(process_sent)
  assert sum(sent) <= 1.15 * size
  assert sum(sent) >= size - 8 * files  # between them, every tensor byte was fetched


@pytest.mark.slow
@TWO_PROCESSES_GROUP
@pytest.mark.parametrize("name", [name for name, *_ in MP_RUNS])
def test_streamed_logits_equal_the_local_folder_load(two_processes, name):
  real = two_processes["mask"].astype(bool)
  root = two_processes["root"]
  for process in range(NUM_PROCESSES):
    streamed = np.load(root / f"logits_{name}_stream_{process}.npy")
    local = np.load(root / f"logits_{name}_local_{process}.npy")
    assert np.abs(streamed - local)[real].max() <= MAX_ABS


@pytest.mark.slow
@TWO_PROCESSES_GROUP
def test_streaming_processes_write_nothing_to_disk(two_processes):
  for cache in two_processes["caches"]:
    assert not cache.exists() or not any(p.is_file() for p in cache.rglob("*"))


FAULT_TIMEOUT_S = 150  # the workers' start and one small load


@pytest.mark.slow
def test_a_read_failing_on_one_process_fails_the_load_on_both(gcs_emulator, tmp_path):
  """Process 1's bucket denies a tensor's range mid-load; process 0 reads fine. Both must
  raise, promptly: process 0 must not sit in the reshard collective waiting for 1."""
  folder = tmp_path / "fault"
  reference.make_checkpoint("qwen3", folder)
  tokens, mask, _ = reference.left_padded_batch(seed=3, batch=2)
  np.savez(tmp_path / "inputs.npz", tokens=tokens, mask=mask)
  proxies = [CountingGcsProxy(gcs_emulator) for _ in range(NUM_PROCESSES)]
  hubs = [CountingHubServer() for _ in range(NUM_PROCESSES)]
  for server in proxies + hubs:
    server.__enter__()
  try:
    upload_to_gcs(proxies[0], folder, "stream-fault/single")
    # The file's first two requests are its header; then a few tensors load first.
    proxies[1].faults.status(403, match="stream-fault%2Fsingle%2Fmodel.safetensors", skip=6,
                             times=1000)
    runs = [{"name": "fault", "source": "gcs", "layout": "single", "axis_type": "explicit",
             "local": str(folder), "ref": f"gs://{GCS_BUCKET}/stream-fault/single",
             "expect_error": True}]
    # A peer that never reported would fail its wait after 60 s with another message.
    run_workers(tmp_path, runs, proxies, hubs, FAULT_TIMEOUT_S,
                env={"TUNIX_ZOO_PEER_TIMEOUT_S": "60"})
  finally:
    for server in proxies + hubs:
      server.__exit__(None, None, None)
  results = [json.loads((tmp_path / f"result_{i}.json").read_text())["fault"]
             for i in range(NUM_PROCESSES)]
  assert results[1]["error"] == "SourceError" and "denied access" in results[1]["message"]
  assert results[0]["error"] == "CheckpointError", results[0]
  assert "Process 1 failed" in results[0]["message"] and "denied" in results[0]["message"]


def test_cli_stream_loads_and_trains(gcs_stream, tmp_path, capsys):
  from tunix_zoo import cli  # pylint: disable=import-outside-toplevel
  common = ["--source", "gcs", "--model-path", url("single"), "--stream", "--mesh", "2x4"]
  assert cli.main(["test", "tiny", *common, "--load", "--steps", "3", "--seq-len", "8",
                   "--stream-concurrency", "4"]) == 0
  assert "loss fell" in capsys.readouterr().out
  assert data_requests(gcs_stream, ".safetensors?") > 2
  assert not (tmp_path / "zoo-cache").exists()
  assert cli.main(["run", "tiny", *common]) == 2
  assert "needs the tokenizer files too" in capsys.readouterr().err
  assert cli.main(["export", "tiny", str(tmp_path / "out"), *common]) == 2
  assert "export --stream: only the weights are streamed" in capsys.readouterr().err


def test_hub_stream_of_a_missing_repo_is_a_source_error(hub_stream, tmp_path):
  with pytest.raises(SourceError, match="does not exist"):
    AutoModel.from_pretrained("acme/no-such-repo", mesh_of("explicit"), stream=True)
  assert not (tmp_path / "hf-cache").exists()


def test_staging_layout_only_where_a_direct_read_would_fetch_more(gcs_stream, folders):
  from jax.sharding import NamedSharding, PartitionSpec  # pylint: disable=import-outside-toplevel

  from tunix_zoo.checkpoint import row_blocks  # pylint: disable=import-outside-toplevel
  mesh = mesh_of("explicit")
  one_device = jax.make_mesh((1, 1), ("fsdp", "tp"), devices=jax.devices()[:1])
  with open_stream(None, source="gcs", model_path=url("single"), token="anon") as remote, \
      CheckpointFiles(folders["single"]) as local:
    shape = (32, 8)
    columns = NamedSharding(mesh, PartitionSpec(None, "tp"))
    staging = row_blocks.staging_sharding(remote, shape, columns)
    assert staging.spec == PartitionSpec(("fsdp", "tp"))
    assert row_blocks.padded_rows(31, staging) == 32
    # The local reader maps the file: its slices are read directly, whatever the layout.
    assert row_blocks.staging_sharding(local, shape, columns) is None
    # One block on one process: a single contiguous read already.
    whole = NamedSharding(one_device, PartitionSpec())
    assert row_blocks.staging_sharding(remote, shape, whole) is None
    # Two row blocks on this one process: staged, so that they merge into one read.
    rows = NamedSharding(mesh, PartitionSpec("fsdp"))
    assert row_blocks.staging_sharding(remote, shape, rows) is not None
