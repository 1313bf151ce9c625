"""Export I/O benchmark: bytes ``save_pretrained`` writes and reads, against the weights' size.

Prints one JSON object. The counts are this process's ``/proc/self/io`` around one export
of a random model of a preset's shapes: ``wchar`` / ``rchar`` (bytes passed to write and
read calls, page cache or not) and ``write_bytes`` / ``read_bytes`` (bytes sent to or
fetched from storage, which lag behind on a machine whose page cache absorbs them)::

    python benchmarks/export_io.py --model gemma3_270m --dir /tmp/export_io

Linux only (``/proc/self/io``).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import time

import numpy as np


def process_io() -> dict[str, int]:
  with open("/proc/self/io") as f:
    return {key: int(value) for key, value in (line.split(": ") for line in f)}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--model", default="gemma3_270m", help="preset id")
  parser.add_argument("--dir", required=True, help="export folder (replaced)")
  parser.add_argument("--max-shard-size", default="200MB")
  args = parser.parse_args()

  import jax.numpy as jnp

  from tunix_zoo import AutoModel, save_pretrained

  model = AutoModel.from_config(args.model, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  out = pathlib.Path(args.dir)
  shutil.rmtree(out, ignore_errors=True)
  before, start = process_io(), time.perf_counter()
  save_pretrained(model, out, max_shard_size=args.max_shard_size)
  seconds, after = time.perf_counter() - start, process_io()
  weights = sum(p.stat().st_size for p in out.glob("*.safetensors"))
  counts = {key: after[key] - before[key]
            for key in ("wchar", "rchar", "write_bytes", "read_bytes")}
  print(json.dumps({
      "model": args.model,
      "safetensors_bytes": weights,
      "shards": len(list(out.glob("*.safetensors"))),
      "seconds": round(seconds, 2),
      **counts,
      **{f"{key}_per_weight_byte": round(float(np.float64(value) / weights), 3)
         for key, value in counts.items()},
  }))


if __name__ == "__main__":
  main()
