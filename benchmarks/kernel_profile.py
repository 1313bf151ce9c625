"""Kernel profile: which GPU kernels a decode step or a prefill runs, and how long each takes.

Traces a warm run with ``jax.profiler``, reads the Perfetto trace it writes and groups
the device's kernel events by name. Reports kernels per step, summed kernel time per
step and the step's span (the gap between them is launch and idle time). ``decode``
traces a second ``generate`` call (steps = new tokens); ``prefill`` traces three
prefills of batch x prompt tokens (as benchmarks/prefill.py runs them). Prints JSON;
``--out D`` keeps the traced program's optimised HLO in ``D``.

    python benchmarks/kernel_profile.py --phase decode --model qwen3_0p6b --batch 1
    python benchmarks/kernel_profile.py --phase prefill --model qwen3_0p6b --batch 8 --prompt 2048
    python benchmarks/kernel_profile.py --model qwen3_8b --layers 4 --scan-layers
"""

from __future__ import annotations

import argparse
import collections
import gzip
import importlib
import json
import pathlib
import re
import sys
import tempfile
import time


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
  parser.add_argument("--phase", choices=("decode", "prefill"), default="decode")
  parser.add_argument("--model", default="qwen3_0p6b")
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--prompt", type=int, default=128)
  parser.add_argument("--new-tokens", type=int, default=64)
  parser.add_argument("--top", type=int, default=25)
  parser.add_argument("--layers", type=int, help="override the depth")
  parser.add_argument("--scan-layers", action="store_true", help="the scanned layer stack")
  parser.add_argument("--out", default=None)
  args = parser.parse_args()

  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  # By module path: the package re-exports a function of the same name.
  generate_module = importlib.import_module("tunix_zoo.generation")
  from tunix_zoo import registry
  from tunix_zoo.automodel import AutoModel

  config = registry.get_config(args.model)
  if args.layers is not None:
    config = config.replace(num_layers=args.layers, layer_types=config.layer_types[:args.layers])
  mesh = jax.make_mesh((1, len(jax.devices())), ("fsdp", "tp"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  model = AutoModel.from_config(config, mesh, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                               scan_layers=args.scan_layers)
  tokens = np.random.default_rng(0).integers(3, config.vocab_size, (args.batch, args.prompt))
  out_dir = pathlib.Path(args.out or tempfile.mkdtemp())
  out_dir.mkdir(parents=True, exist_ok=True)
  trace_dir = pathlib.Path(tempfile.mkdtemp())
  if args.phase == "decode":
    generate_module.generate(model, tokens, args.new_tokens)  # Compile.
    with jax.profiler.trace(str(trace_dir), create_perfetto_trace=True):
      out = generate_module.generate(model, tokens, args.new_tokens)
    program = next(v for k, v in generate_module._compiled.items() if k[0] == "_decode")
    # Decode steps dominate the trace; the prefill's kernels are a few percent of it.
    steps, step_ms = args.new_tokens, 1e3 * out.decode_seconds / (args.new_tokens - 1)
  else:
    graphdef, state = nnx.split(model)

    @jax.jit
    def prefill(state, tokens):
      model = nnx.merge(graphdef, state)
      hidden, _ = model.hidden_states(tokens)
      return model.logits(hidden[:, -1:])

    tokens = jnp.asarray(tokens)
    program = prefill.lower(state, tokens).compile()
    program(state, tokens).block_until_ready()
    steps = 3
    start = time.perf_counter()
    with jax.profiler.trace(str(trace_dir), create_perfetto_trace=True):
      for _ in range(steps):
        program(state, tokens).block_until_ready()
    step_ms = 1e3 * (time.perf_counter() - start) / steps
  (out_dir / f"{args.phase}_hlo.txt").write_text(program.as_text())
  events = kernel_events(trace_dir)
  report = dict(model=args.model, phase=args.phase, batch=args.batch, traced_step_ms=step_ms,
                device=jax.devices()[0].device_kind, jax=jax.__version__,
                **summarise(events, steps, args.top))
  print(json.dumps(report, indent=1))


if __name__ == "__main__":
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
  main()
