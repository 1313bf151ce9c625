"""One process of the two-process streaming test (tests/sources/test_stream.py starts two).

It joins a ``jax.distributed`` cluster on 127.0.0.1 and, for each run named in
``--runs`` (JSON: name, source, model id or gs:// path, local folder, axis type), streams
the checkpoint onto the global ``(2, 4)`` ``("fsdp", "tp")`` mesh with
:func:`tunix_zoo.sources.open_stream` (STORAGE_EMULATOR_HOST and HF_ENDPOINT point at this
process's own counting servers), loads the local folder onto the same mesh (once per
folder and axis type), and writes both global logits and the reader's own byte and
request counts into ``--out``. A run with ``expect_error`` records the load's exception
(type and message) instead.

Run as ``python -m tests.stream_worker --process-id 0 --port 12345 ...`` with
``XLA_FLAGS=--xla_force_host_platform_device_count=4`` in the environment.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import traceback

import jax
import numpy as np
from jax.sharding import AxisType

from tests.multiprocess_worker import global_logits
from tunix_zoo.automodel import load_folder, load_stream
from tunix_zoo.sources import open_stream


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--process-id", type=int, required=True)
  parser.add_argument("--port", type=int, required=True)
  parser.add_argument("--runs", required=True, help="JSON list of runs")
  parser.add_argument("--inputs", required=True, help="npz with tokens and mask")
  parser.add_argument("--out", required=True)
  args = parser.parse_args()

  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.config.update("jax_default_matmul_precision", "highest")
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{args.port}", num_processes=2,
                             process_id=args.process_id, initialization_timeout=60)
  inputs = np.load(args.inputs)
  out = pathlib.Path(args.out)
  result = {}
  local_logits = {}  # (folder, axis type) -> the local load's logits, shared by runs
  for run in json.loads(args.runs):
    kind = AxisType.Explicit if run["axis_type"] == "explicit" else AxisType.Auto
    mesh = jax.make_mesh((2, 4), ("fsdp", "tp"), axis_types=(kind, kind))
    if run["source"] == "gcs":
      reader = open_stream(None, source="gcs", model_path=run["ref"], token="anon")
    else:
      reader = open_stream(run["ref"], source="huggingface")
    if run.get("expect_error"):
      try:
        load_stream(reader, mesh)
      except Exception as e:  # pylint: disable=broad-except  (the test reads what it was)
        result[run["name"]] = {"error": type(e).__name__, "message": str(e)}
      else:
        result[run["name"]] = {"error": None}
      continue
    model = load_stream(reader, mesh)
    result[run["name"]] = {"bytes_fetched": reader.bytes_fetched, "requests": reader.requests,
                           "total_bytes": reader.total_bytes}
    np.save(out / f"logits_{run['name']}_stream_{args.process_id}.npy",
            global_logits(model, mesh, inputs["tokens"], inputs["mask"]))
    key = (run["local"], run["axis_type"])
    if key not in local_logits:
      local_logits[key] = global_logits(load_folder(run["local"], mesh), mesh,
                                        inputs["tokens"], inputs["mask"])
    np.save(out / f"logits_{run['name']}_local_{args.process_id}.npy", local_logits[key])
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
