"""Kernel profile of decoding: which GPU kernels one decode step runs and how long each takes.

Traces a second ``generate`` call (the first compiles) with ``jax.profiler``, reads the
Perfetto trace it writes and groups the device's kernel events by name. Reports the
kernels per step, the summed kernel time per step and the step's wall time (the gap
between them is launch and idle time). Prints JSON; ``--out D`` keeps the trace and the
decode program's optimised HLO in ``D``.

    python benchmarks/profile_decode.py --model qwen3_0p6b --batch 1 --out /tmp/prof
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import pathlib
import re
import sys
import tempfile


def kernel_events(trace_dir: pathlib.Path) -> list[dict]:
  """Complete ("X") events on the device's streams, from the Perfetto trace."""
  (path,) = trace_dir.rglob("perfetto_trace.json.gz")
  trace = json.loads(gzip.decompress(path.read_bytes()))
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  device_pids = {
      e["pid"] for e in events
      if e.get("ph") == "M" and e.get("name") == "process_name"
      and re.search(r"/device:GPU", e.get("args", {}).get("name", ""))
  }
  if not device_pids:
    raise SystemExit(f"No GPU device streams in {path}: this profile needs a GPU.")
  return [e for e in events if e.get("ph") == "X" and e.get("pid") in device_pids]


def summarise(events: list[dict], steps: int, top: int) -> dict:
  by_name: dict[str, list[float]] = collections.defaultdict(list)
  for e in events:
    by_name[e["name"]].append(float(e.get("dur", 0)))
  rows = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))
  total_us = sum(sum(d) for d in by_name.values())
  span_us = (max(e["ts"] + e.get("dur", 0) for e in events) - min(e["ts"] for e in events))
  return dict(
      kernels_per_step=len(events) / steps,
      kernel_us_per_step=total_us / steps,
      span_us_per_step=span_us / steps,
      top=[dict(name=name[:120], calls_per_step=len(d) / steps, us_per_step=sum(d) / steps,
                mean_us=sum(d) / len(d)) for name, d in rows[:top]],
  )


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--model", default="qwen3_0p6b")
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--prompt", type=int, default=128)
  parser.add_argument("--new-tokens", type=int, default=64)
  parser.add_argument("--top", type=int, default=25)
  parser.add_argument("--out", default=None)
  args = parser.parse_args()

  import jax
  import jax.numpy as jnp
  import numpy as np

  from tunix_zoo import generate as generate_module
  from tunix_zoo import registry
  from tunix_zoo.automodel import AutoModel

  config = registry.get_config(args.model)
  mesh = jax.make_mesh((1, len(jax.devices())), ("fsdp", "tp"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  model = AutoModel.from_config(config, mesh, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  tokens = np.random.default_rng(0).integers(3, config.vocab_size, (args.batch, args.prompt))
  generate_module.generate(model, tokens, args.new_tokens)  # Compile.
  out_dir = pathlib.Path(args.out or tempfile.mkdtemp())
  out_dir.mkdir(parents=True, exist_ok=True)
  trace_dir = out_dir / "trace"
  with jax.profiler.trace(str(trace_dir), create_perfetto_trace=True):
    out = generate_module.generate(model, tokens, args.new_tokens)
  decode = next(v for k, v in generate_module._compiled.items() if k[0] == "_decode")
  (out_dir / "decode_hlo.txt").write_text(decode.as_text())
  events = kernel_events(trace_dir)
  # Decode steps dominate the trace; the prefill's kernels are a few percent of it.
  steps = args.new_tokens
  report = dict(model=args.model, batch=args.batch, step_ms=1e3 * out.decode_seconds / (steps - 1),
                device=jax.devices()[0].device_kind, jax=jax.__version__,
                **summarise(events, steps, args.top))
  print(json.dumps(report, indent=1))


if __name__ == "__main__":
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
  main()
