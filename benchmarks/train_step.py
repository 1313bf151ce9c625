"""Training-step benchmark: one jitted forward + backward + AdamW step
(``tunix_zoo.training.train_step``), its first-call compile time and its step time.

Random weights of a preset's shapes (``AutoModel.from_config``) on all local devices,
unrolled or with ``--scan-layers``; ``--layers`` overrides the depth and ``--set`` any
config field, for compile time against depth. No persistent compilation cache: every
run compiles. Prints JSON.

    python benchmarks/train_step.py --model qwen3_8b --layers 36 --scan-layers --remat layer
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time


def run(config_id: str, batch: int, length: int, layers: int | None, scan_layers: bool,
        remat: str, overrides: tuple[str, ...], dtype: str, steps: int) -> dict:
  import jax
  import optax
  from flax import nnx

  from tunix_zoo import registry
  from tunix_zoo.automodel import AutoModel
  from tunix_zoo.config_overrides import config_with_overrides, parse_overrides
  from tunix_zoo.training import _place_on_mesh, train_step

  config = config_with_overrides(registry.get_config(config_id), parse_overrides(overrides))
  if layers is not None:
    config = config.replace(num_layers=layers, layer_types=config.layer_types[:layers])
  mesh = jax.make_mesh((1, len(jax.devices())), ("fsdp", "tp"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  model = AutoModel.from_config(config, mesh, dtype=dtype, param_dtype=dtype, remat=remat,
                                scan_layers=scan_layers)
  optimizer = nnx.Optimizer(model, optax.adamw(1e-5), wrt=nnx.Param)
  _place_on_mesh(optimizer, mesh)
  step = nnx.cached_partial(train_step, model, optimizer)
  tokens = jax.random.randint(jax.random.key(0), (batch, length + 1), 0, config.vocab_size)
  start = time.perf_counter()
  step(tokens).block_until_ready()
  first_call = time.perf_counter() - start
  step(tokens).block_until_ready()  # A second program would show here as a slow step.
  start = time.perf_counter()
  for _ in range(steps):
    loss = step(tokens)
  loss.block_until_ready()
  seconds = (time.perf_counter() - start) / steps
  return dict(first_call_seconds=first_call, step_seconds=seconds,
              tokens_per_s=batch * length / seconds, loss=float(loss),
              device=jax.devices()[0].device_kind, jax=jax.__version__)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--model", default="qwen3_0p6b")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--length", type=int, default=1024)
  parser.add_argument("--layers", type=int, help="override the depth")
  parser.add_argument("--scan-layers", action="store_true", help="the scanned layer stack")
  parser.add_argument("--remat", default="layer", choices=("none", "layer", "attention"))
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="override a config field, e.g. --set hidden_size=256")
  parser.add_argument("--dtype", default="bfloat16", help="parameter and compute dtype")
  parser.add_argument("--steps", type=int, default=5, help="timed steps")
  args = parser.parse_args()
  report = dict(model=args.model, batch=args.batch, length=args.length, layers=args.layers,
                scan_layers=args.scan_layers, remat=args.remat, overrides=args.set)
  report["tunix_zoo"] = run(args.model, args.batch, args.length, args.layers,
                            args.scan_layers, args.remat, tuple(args.set), args.dtype,
                            args.steps)
  print(json.dumps(report, indent=1))


if __name__ == "__main__":
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
  main()
