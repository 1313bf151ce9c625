"""Compiles tunix_zoo's train step for tiny models; prints each step's memory analysis.

The tests run this in a subprocess because XLA flags are read once per process: XLA:CPU
schedules for concurrency by default and then starts every layer's recomputation early,
which keeps as much alive as no remat at all. Its memory-minimising scheduler (what GPU
and TPU compilers do in spirit) shows what remat and the planner are about.

Usage::

    python -m tests.train_memory_worker '[{"config": {"num_layers": 4}, "mesh": [1, 2],
        "remat": "layer", "lora_rank": 8, "batch": 4, "seq": 128}]'

prints one JSON object per job: ``argument``, ``output``, ``temp`` and ``alias`` bytes.
"""

from __future__ import annotations

import os

# LLVM's optimisation level changes no buffer sizes (the same memory analyses at 0 and 2)
# and level 0 compiles the steps in 40% less time; XLA:CPU's legacy fusion emitters
# (the test session's too) change temp sizes by under 100 bytes and save another 25%.
FLAGS = (
    "--xla_force_host_platform_device_count=8 "
    "--xla_cpu_enable_concurrency_optimized_scheduler=false "
    "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true "
    "--xla_cpu_use_fusion_emitters=false"
)
if __name__ == "__main__":  # Importing TINY from here must leave the environment alone.
  os.environ["XLA_FLAGS"] = FLAGS

import dataclasses  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

from tunix_zoo import registry  # noqa: E402
from tunix_zoo.automodel import AutoModel  # noqa: E402
from tunix_zoo.lora import apply_lora  # noqa: E402
from tunix_zoo.training import train_step  # noqa: E402

# A small Qwen3 whose activations outweigh its weights at the tests' sequence lengths; its
# 2 kv heads divide the tp axes the tests use.
TINY = dict(
    vocab_size=512, hidden_size=128, intermediate_size=256, num_layers=4, num_heads=4,
    num_kv_heads=2, head_dim=32,
)


def tiny_config(**overrides: Any):
  return dataclasses.replace(registry.get_config("qwen3_0p6b"), **{**TINY, **overrides})


def measure(job: dict[str, Any]) -> dict[str, int]:
  dtype = job.get("dtype", "float32")
  fsdp, tp = job["mesh"]
  mesh = jax.make_mesh((fsdp, tp), ("fsdp", "tp"), devices=jax.devices()[: fsdp * tp])
  model = AutoModel.from_config(
      tiny_config(**job.get("config", {})), mesh, dtype=dtype, param_dtype=dtype,
      remat=job.get("remat", "none"),
  )
  wrt = nnx.Param
  if job.get("lora_rank"):
    apply_lora(model, rank=job["lora_rank"], alpha=float(job["lora_rank"]))
    wrt = nnx.LoRAParam
  optimizer = nnx.Optimizer(model, optax.adamw(1e-3), wrt=wrt)
  tokens = jnp.zeros(
      (job["batch"], job["seq"] + 1), jnp.int32, device=NamedSharding(mesh, PartitionSpec("fsdp"))
  )
  stats = train_step.lower(model, optimizer, tokens).compile().memory_analysis()
  return dict(
      argument=stats.argument_size_in_bytes, output=stats.output_size_in_bytes,
      temp=stats.temp_size_in_bytes, alias=stats.alias_size_in_bytes,
  )


if __name__ == "__main__":
  for job in json.loads(sys.argv[1]):
    print(json.dumps(measure(job)), flush=True)
