"""Load benchmark: tunix_zoo vs transformers on the same random real-size checkpoint.

Prints one JSON object: per library, seconds, bytes, GB/s and peak RSS growth, plus the
warm read throughput of the files themselves (the ceiling for any loader).

    python benchmarks/load.py --model qwen3_0p6b --dir /tmp/qwen3_0p6b_bf16
    python benchmarks/load.py --model llama3p2_1b --dir /tmp/llama1b --libraries tunix_zoo

Each library loads in its own subprocess so peak RSS is its own. On a CPU host the loaded
weights themselves live in host memory, so "rss_overhead_bytes" (peak growth minus the
weights' size) is what the loader costs beyond the model.

``--stream`` instead uploads the checkpoint to a local GCS emulator (gcp-storage-emulator,
as the tests use) and compares, each in its own subprocess, streaming it
(``stream=True``: range reads, nothing on disk) with downloading the folder then loading
it; it also times one whole-file read of the emulator, the ceiling for both::

    python benchmarks/load.py --stream --model qwen3_0p6b --num-layers 4 --dir /tmp/q06b4
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import subprocess
import sys
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]


def make_random_checkpoint(config_id: str, folder: pathlib.Path, dtype: str = "bfloat16",
                           max_shard_size: str = "2GB", seed: int = 0,
                           num_layers: int | None = None,
                           overrides: dict[str, str] | None = None) -> int:
  """Writes random weights of a preset's shapes (``num_layers`` of them, if given; config
  fields changed by ``overrides``, as ``--set``), one tensor at a time; returns bytes.
  Each tensor is a slice, from a random offset, of one pool of 16M normal values: drawing
  a 0.6B model's values one by one took three times the CPU of loading them, and no
  loader looks at them."""
  import ml_dtypes
  from flax import nnx

  from tunix_zoo import registry
  from tunix_zoo.build import abstract_model, module_path
  from tunix_zoo.checkpoint.writer import ShardedWriter
  from tunix_zoo.config_overrides import config_with_overrides

  overrides = dict(overrides or {})
  if num_layers is not None:
    overrides["num_layers"] = num_layers
  config = config_with_overrides(registry.get_config(config_id), overrides)
  spec = registry.family_for_config_class(type(config))
  np_dtype = np.dtype(ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype)
  rng = np.random.default_rng(seed)
  pool = (rng.standard_normal(1 << 24, np.float32) * 0.02).astype(np_dtype)
  folder.mkdir(parents=True, exist_ok=True)
  total = 0
  params = [(module_path(path), var)
            for path, var in nnx.to_flat_state(nnx.state(abstract_model(config), nnx.Param))]
  plan = [(spec.param_table.checkpoint_key(name), var.shape, np_dtype) for name, var in params]
  with ShardedWriter(folder, max_shard_size=max_shard_size, plan=plan) as writer:
    for name, var in params:
      # np.resize repeats the slice where a tensor outgrows it.
      values = np.resize(pool[rng.integers(pool.size):], var.shape)
      if name.endswith("norm.weight"):
        values = np.ones(var.shape, np_dtype)
      writer.add(spec.param_table.checkpoint_key(name), values)
      total += values.nbytes
  hf = config.to_hf_config()
  hf["torch_dtype"] = dtype
  (folder / "config.json").write_text(json.dumps(hf, indent=1))
  return total


def read_throughput(folder: pathlib.Path) -> float:
  """GB/s of reading the safetensors files sequentially (after one warm-up read)."""
  files = sorted(folder.glob("*.safetensors"))
  buffer = bytearray(64 << 20)
  for _ in range(2):
    start, total = time.perf_counter(), 0
    for path in files:
      with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
          total += n
    seconds = time.perf_counter() - start
  return total / seconds / 1e9


def peak_rss_bytes() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss_bytes() -> int:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class AnonymousPeak:
  """Samples the process's anonymous resident memory (``RssAnon``) every millisecond.

  Peak RSS also counts the checkpoint's pages while they are mapped (page cache, given
  back at no cost); the anonymous part is what copies of the weights take.
  """

  def __init__(self):
    import threading

    self.baseline = self.peak = self._read()
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True)
    self._thread.start()

  @staticmethod
  def _read() -> int:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("RssAnon:"):
          return int(line.split()[1]) * 1024
    return 0

  def _run(self):
    while not self._stop.wait(0.001):
      self.peak = max(self.peak, self._read())

  def growth(self) -> int:
    self._stop.set()
    self._thread.join()
    return max(self.peak, self._read()) - self.baseline


def load_tunix_zoo(folder: str, max_in_flight_mb: int | None = None,
                   block_mb: int | None = None, scan_layers: bool = False,
                   quantization: str | None = None) -> dict:
  import jax

  from tunix_zoo.automodel import AutoModel
  from tunix_zoo.checkpoint import loader
  from flax import nnx

  if max_in_flight_mb is not None:
    loader.MAX_BYTES_IN_FLIGHT = max_in_flight_mb << 20
  if block_mb is not None:  # 0: whole slices; on CPU a budget applies to CPU devices too
    loader.BLOCK_BYTES = (block_mb << 20) or None
    loader.BLOCKS_ON_CPU = block_mb > 0
  jax.numpy.zeros(1).block_until_ready()  # Start the backend before the clock.
  baseline = current_rss_bytes()
  anonymous = AnonymousPeak()
  mesh = jax.make_mesh((1, len(jax.devices())), ("fsdp", "tp"))
  start = time.perf_counter()
  model, _ = AutoModel.from_pretrained(folder, mesh, scan_layers=scan_layers,
                                       quantization=quantization)
  state = nnx.state(model, nnx.Param)
  jax.block_until_ready(state)
  seconds = time.perf_counter() - start
  nbytes = sum(x.nbytes for x in jax.tree.leaves(state))
  return dict(seconds=seconds, bytes=nbytes, peak_rss_growth_bytes=peak_rss_bytes() - baseline,
              peak_anonymous_growth_bytes=anonymous.growth(),
              max_bytes_in_flight=loader.MAX_BYTES_IN_FLIGHT, block_bytes=loader.BLOCK_BYTES,
              blocks_on_cpu=loader.BLOCKS_ON_CPU, scan_layers=scan_layers,
              quantization=quantization,
              device=str(jax.devices()[0].device_kind), devices=len(jax.devices()))


def load_transformers(folder: str) -> dict:
  import torch
  import transformers

  device = "cuda" if torch.cuda.is_available() else "cpu"
  baseline = current_rss_bytes()
  anonymous = AnonymousPeak()
  start = time.perf_counter()
  model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
  if device == "cuda":
    # Without accelerate's device_map, transformers loads on the host first.
    model.to(device)
    torch.cuda.synchronize()
  seconds = time.perf_counter() - start
  nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
  return dict(seconds=seconds, bytes=nbytes, peak_rss_growth_bytes=peak_rss_bytes() - baseline,
              peak_anonymous_growth_bytes=anonymous.growth(), device=device)


def run_in_subprocess(library: str, folder: pathlib.Path,
                      max_in_flight_mb: int | None = None, block_mb: int | None = None,
                      scan_layers: bool = False, quantization: str | None = None) -> dict:
  limit = [] if max_in_flight_mb is None else ["--max-in-flight-mb", str(max_in_flight_mb)]
  if block_mb is not None:
    limit += ["--block-mb", str(block_mb)]
  if scan_layers:
    limit.append("--scan-layers")
  if quantization:
    limit += ["--quantization", quantization]
  out = subprocess.run(
      [sys.executable, __file__, "--measure", library, "--dir", str(folder)] + limit,
      check=True, capture_output=True, text=True, cwd=REPO,
  )
  result = json.loads(out.stdout.strip().splitlines()[-1])
  result["gb_per_s"] = result["bytes"] / result["seconds"] / 1e9
  on_host = result.get("device") == "cpu" or result.get("device", "").lower().startswith("cpu")
  if on_host:
    result["rss_overhead_bytes"] = result["peak_rss_growth_bytes"] - result["bytes"]
    result["anonymous_overhead_bytes"] = result["peak_anonymous_growth_bytes"] - result["bytes"]
  return result


def load_streamed(url: str, concurrency: int | None) -> dict:
  """Streams ``url`` onto all local devices; splits the time into opening (config.json,
  index, headers) and loading, and sums the seconds spent inside range requests."""
  import jax
  from flax import nnx

  from tunix_zoo.automodel import load_stream
  from tunix_zoo.sources import open_stream

  jax.numpy.zeros(1).block_until_ready()
  mesh = jax.make_mesh((1, len(jax.devices())), ("fsdp", "tp"))
  start = time.perf_counter()
  reader = open_stream(None, source="gcs", model_path=url, token="anon",
                       concurrency=concurrency)
  opened = time.perf_counter()
  fetch, in_requests = reader.fetcher.fetch, []

  def timed_fetch(name, begin, end):
    began = time.perf_counter()
    try:
      return fetch(name, begin, end)
    finally:
      in_requests.append(time.perf_counter() - began)

  reader.fetcher.fetch = timed_fetch
  model = load_stream(reader, mesh)
  state = nnx.state(model, nnx.Param)
  jax.block_until_ready(state)
  end = time.perf_counter()
  return dict(seconds=end - start, open_seconds=opened - start, load_seconds=end - opened,
              bytes=sum(x.nbytes for x in jax.tree.leaves(state)),
              bytes_fetched=reader.bytes_fetched, requests=reader.requests,
              concurrency=reader._pool._max_workers,  # pylint: disable=protected-access
              seconds_in_requests=sum(in_requests),
              devices=len(jax.devices()))


def load_downloaded(url: str, folder: str) -> dict:
  """Downloads ``url`` into ``folder`` (through the GCS source), then loads the folder."""
  import jax
  from flax import nnx

  from tunix_zoo.automodel import load_folder
  from tunix_zoo.sources import ModelSource, fetch

  jax.numpy.zeros(1).block_until_ready()
  mesh = jax.make_mesh((1, len(jax.devices())), ("fsdp", "tp"))
  start = time.perf_counter()
  local = fetch(None, source=ModelSource.GCS, model_path=url, model_download_path=folder,
                token="anon")
  downloaded = time.perf_counter()
  state = nnx.state(load_folder(local, mesh), nnx.Param)
  jax.block_until_ready(state)
  end = time.perf_counter()
  return dict(seconds=end - start, download_seconds=downloaded - start,
              load_seconds=end - downloaded, bytes=sum(x.nbytes for x in jax.tree.leaves(state)))


def stream_report(folder: pathlib.Path, concurrency: int | None) -> dict:
  """Streamed vs download-then-load of ``folder`` through a local GCS emulator."""
  import tempfile

  os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
  import gcsfs

  from tests.sources import servers

  port = servers.free_port()
  emulator = servers.start_gcs_emulator(port)
  endpoint = f"http://{servers.LOCALHOST}:{port}"
  os.environ["STORAGE_EMULATOR_HOST"] = endpoint
  url = f"gs://bench/{folder.name}"
  try:
    fs = gcsfs.GCSFileSystem(token="anon", endpoint_url=endpoint, skip_instance_cache=True)
    fs.mkdir("bench")
    for path in sorted(folder.iterdir()):
      if path.is_file():
        fs.pipe(f"bench/{folder.name}/{path.name}", path.read_bytes())
    largest = max(folder.glob("*.safetensors"), key=lambda p: p.stat().st_size)
    start = time.perf_counter()
    size = len(fs.cat_file(f"bench/{folder.name}/{largest.name}"))
    report = dict(emulator_one_request_gb_per_s=size / (time.perf_counter() - start) / 1e9)
    flags = ["--url", url] + ([] if concurrency is None else ["--concurrency", str(concurrency)])
    with tempfile.TemporaryDirectory() as scratch:
      for mode in ("stream", "download"):
        out = subprocess.run([sys.executable, __file__, "--measure", mode, "--dir", scratch]
                             + flags, check=True, capture_output=True, text=True, cwd=REPO)
        report[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    report["stream_speedup"] = report["download"]["seconds"] / report["stream"]["seconds"]
    return report
  finally:
    emulator.terminate()
    emulator.wait(timeout=10)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--model", default="qwen3_0p6b")
  parser.add_argument("--dir", required=True, type=pathlib.Path)
  parser.add_argument("--libraries", default="tunix_zoo,transformers")
  parser.add_argument("--max-in-flight-mb", type=int,
                      help="tunix_zoo's bound on host bytes being copied to the devices")
  parser.add_argument("--block-mb", type=int,
                      help="tunix_zoo's host block budget for large tensors (0: whole device "
                           "slices; given on a CPU host, CPU devices take blocks too)")
  parser.add_argument("--scan-layers", action="store_true",
                      help="tunix_zoo loads the layers stacked (scan_layers=True)")
  parser.add_argument("--quantization", choices=["int8", "int4", "nf4", "fp8"],
                      help="tunix_zoo quantizes the Linear weights while loading")
  parser.add_argument("--stream", action="store_true",
                      help="streamed load from a local GCS emulator vs download-then-load")
  parser.add_argument("--concurrency", type=int, help="--stream: ranges fetched at a time")
  parser.add_argument("--num-layers", type=int, help="make the checkpoint with this many layers")
  parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                      help="make the checkpoint in this dtype")
  parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                      help="make the checkpoint with this config field changed (repeatable), "
                           "e.g. --set tie_word_embeddings=false")
  parser.add_argument("--compact", action="store_true", help="print the report on one line")
  parser.add_argument("--url", help=argparse.SUPPRESS)
  parser.add_argument("--measure", choices=["tunix_zoo", "transformers", "stream", "download"],
                      help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.measure == "stream":
    print(json.dumps(load_streamed(args.url, args.concurrency)))
    return
  if args.measure == "download":
    print(json.dumps(load_downloaded(args.url, str(args.dir / "download"))))
    return
  if args.measure == "tunix_zoo":
    print(json.dumps(load_tunix_zoo(str(args.dir), args.max_in_flight_mb, args.block_mb,
                                    args.scan_layers, args.quantization)))
    return
  if args.measure == "transformers":
    print(json.dumps(load_transformers(str(args.dir))))
    return
  made = None
  if not (args.dir / "config.json").exists():
    start = time.perf_counter()
    from tunix_zoo.config_overrides import parse_overrides

    made = make_random_checkpoint(args.model, args.dir, args.dtype, num_layers=args.num_layers,
                                  overrides=parse_overrides(args.set))
    made = dict(bytes=made, seconds=time.perf_counter() - start)
  report = dict(model=args.model, checkpoint=str(args.dir), made=made,
                file_read_gb_per_s=read_throughput(args.dir))
  if args.stream:
    report.update(stream_report(args.dir, args.concurrency))
    print(json.dumps(report, indent=1))
    return
  for library in args.libraries.split(","):
    report[library] = run_in_subprocess(library, args.dir, args.max_in_flight_mb, args.block_mb,
                                        args.scan_layers, args.quantization)
  if "tunix_zoo" in report and "transformers" in report:
    report["speedup_vs_transformers"] = (
        report["transformers"]["seconds"] / report["tunix_zoo"]["seconds"]
    )
  print(json.dumps(report, indent=None if args.compact else 1))


if __name__ == "__main__":
  sys.path.insert(0, str(REPO))
  main()
