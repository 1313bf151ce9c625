"""The ``tunix-zoo`` command.

Example::

    tunix-zoo list
    tunix-zoo info qwen3_8b --mesh 1x8 --dtype bfloat16
    tunix-zoo info Qwen/Qwen3-0.6B
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

from tunix_zoo import registry
from tunix_zoo.config import DecoderConfig
from tunix_zoo.errors import ZooError
from tunix_zoo.naming import ModelNaming

EXIT_USER_ERROR = 2


def human_count(n: int) -> str:
  for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
    if n >= size:
      return f"{n / size:.2f}{unit}"
  return str(n)


def human_bytes(n: int) -> str:
  for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
    if n >= size:
      return f"{n / size:.2f} {unit}"
  return f"{n} B"


def resolve_config(model: str) -> tuple[str, DecoderConfig]:
  """A preset id, an HF id naming one, or a local checkpoint folder -> (label, config)."""
  if os.path.isdir(model):
    from tunix_zoo.automodel import read_hf_config

    hf = read_hf_config(model)
    return model, registry.family_for_hf_config(hf).config_class.from_hf_config(hf)
  config_id = registry.resolve_config_id(ModelNaming(model_id=model).model_config_id)
  return config_id, registry.get_config(config_id)


def cmd_list(args: argparse.Namespace) -> int:
  from tunix_zoo.planning import count_parameters

  rows = []
  for config_id in registry.config_ids():
    family = registry.family_of_config(config_id)
    rows.append((family.category, config_id, count_parameters(registry.get_config(config_id))))
  if args.json:
    print(json.dumps([dict(family=f, config_id=c, parameters=p) for f, c, p in rows], indent=1))
    return 0
  width = max(len(c) for _, c, _ in rows)
  print(f"{'family':<8} {'config id':<{width}} parameters")
  for family, config_id, params in rows:
    print(f"{family:<8} {config_id:<{width}} {human_count(params):>10}")
  return 0


def cmd_info(args: argparse.Namespace) -> int:
  from tunix_zoo.planning import parse_mesh, plan_model

  label, config = resolve_config(args.model)
  plan = plan_model(config, parse_mesh(args.mesh), args.dtype)
  info = {
      "model": label,
      "family": registry.family_for_config_class(type(config)).category,
      "parameters": plan.parameters,
      "dtype": plan.dtype,
      "bytes_total": plan.bytes_total,
      "mesh": args.mesh,
      "bytes_per_device": plan.bytes_per_device,
      "replicated_parameters": len(plan.replicated),
      "config": {k: v for k, v in vars(config).items()},
  }
  if args.json:
    print(json.dumps(info, indent=1, default=str))
    return 0
  print(f"model        {label} ({info['family']}, {type(config).__name__})")
  print(f"parameters   {plan.parameters:,} ({human_count(plan.parameters)})")
  print(f"weights      {human_bytes(plan.bytes_total)} in {plan.dtype}")
  print(f"mesh         {args.mesh} (fsdp x tp): {human_bytes(plan.bytes_per_device)} per device")
  if plan.replicated:
    print(f"replicated   {len(plan.replicated)} small tensors (norms) on every device")
  print("config")
  for key, value in vars(config).items():
    print(f"  {key:<32} {value}")
  return 0


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="tunix-zoo", description="HF checkpoints as sharded Flax NNX models."
  )
  sub = parser.add_subparsers(dest="command", required=True)
  p = sub.add_parser("list", help="registered families and config ids with parameter counts")
  p.add_argument("--json", action="store_true")
  p.set_defaults(run=cmd_list)
  p = sub.add_parser("info", help="config, parameter count and bytes per device (no allocation)")
  p.add_argument("model", help="config id (qwen3_8b), HF id (Qwen/Qwen3-8B) or checkpoint folder")
  p.add_argument("--mesh", default="1x1", help="FSDPxTP, e.g. 2x4 (default 1x1)")
  p.add_argument("--dtype", default="bfloat16", help="parameter dtype (default bfloat16)")
  p.add_argument("--json", action="store_true")
  p.set_defaults(run=cmd_info)
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  try:
    return args.run(args)
  except ZooError as e:
    print(f"tunix-zoo: error: {e}", file=sys.stderr)
    return EXIT_USER_ERROR


if __name__ == "__main__":
  sys.exit(main())
