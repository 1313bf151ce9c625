"""One Qwen3-30B-A3B mixture-of-experts layer (router + 128 experts, top 8), forward only.

Prints one JSON object: milliseconds per call, tokens/s, and the achieved TFLOP/s
counted on the layer's active FLOPs, ``2 * tokens * active parameters`` (the router plus
``top_k`` experts' gated MLPs per token; sorting and gathers are not counted).

Usage::

    python benchmarks/moe_layer.py                  # 30B-A3B shapes, bf16, 8 x 2048 tokens
    python benchmarks/moe_layer.py --small          # small shapes, a CPU smoke run
    python benchmarks/moe_layer.py --small --dispatch dense   # the dense reference path
    python benchmarks/moe_layer.py --kernel xla     # XLA's ragged_dot instead of Mosaic GPU
    python benchmarks/moe_layer.py --mesh 1x2       # sharded: (fsdp, tp), per device
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx

# name -> (hidden, expert width, experts, top_k, batch, sequence)
SHAPES = {
    "qwen3_30b_a3b": (2048, 768, 128, 8, 8, 2048),
    "small": (256, 128, 16, 4, 4, 256),
}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--small", action="store_true", help="small shapes, for a CPU")
  parser.add_argument("--batch", type=int, help="override the batch size")
  parser.add_argument("--seq", type=int, help="override the sequence length")
  parser.add_argument("--dispatch", choices=("ragged", "dense"), default="ragged")
  parser.add_argument("--kernel", choices=("auto", "mosaic_gpu", "xla"), default="auto",
                      help="KernelPolicy.moe: the grouped matmul of the ragged dispatch")
  parser.add_argument("--mesh", help="FSDPxTP, e.g. 1x2: experts' width over tp, tokens "
                      "over fsdp (default: one device)")
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--steps", type=int, default=20, help="timed calls")
  args = parser.parse_args()
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
  from tunix_zoo import sharding
  from tunix_zoo.kernels import KernelPolicy
  from tunix_zoo.kernels import grouped_matmul as grouped_kernel
  from tunix_zoo.layers.moe import MoE, route

  name = "small" if args.small else "qwen3_30b_a3b"
  hidden, width, experts, top_k, batch, seq = SHAPES[name]
  batch, seq = args.batch or batch, args.seq or seq
  dtype = jnp.dtype(args.dtype)
  moe = MoE(
      hidden, width, num_experts=experts, top_k=top_k, act="silu", norm_topk_prob=True,
      rngs=nnx.Rngs(0), dtype=dtype, param_dtype=dtype,
      kernel_policy=KernelPolicy(moe=args.kernel),
  )
  mesh = None
  if args.mesh:
    shape = tuple(int(n) for n in args.mesh.split("x"))
    mesh = jax.make_mesh(shape, ("fsdp", "tp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    for _, var in nnx.to_flat_state(nnx.state(moe, nnx.Param)):
      logical = var.get_metadata().get("logical_axes") or (None,) * var.ndim
      var.set_value(jax.device_put(var.get_value(), sharding.named_sharding(
          logical, var.shape, mesh)))
  graphdef, state = nnx.split(moe)

  @jax.jit
  def forward(state, x):
    layer = nnx.merge(graphdef, state)
    if args.dispatch == "ragged":
      return layer(x)[0]
    flat = x.reshape(-1, hidden)
    weights, chosen = route(layer.gate(flat), top_k, norm_topk_prob=True)
    return layer.experts.dense(flat, weights, chosen).reshape(x.shape)

  x = jax.random.normal(jax.random.key(1), (batch, seq, hidden), dtype)
  if mesh is not None:
    x = jax.device_put(x, sharding.named_sharding(("batch", None, None), x.shape, mesh))
  start = time.perf_counter()
  forward(state, x).block_until_ready()
  compile_s = time.perf_counter() - start
  forward(state, x).block_until_ready()
  start = time.perf_counter()
  for _ in range(args.steps):
    out = forward(state, x)
  out.block_until_ready()
  seconds = (time.perf_counter() - start) / args.steps

  tokens = batch * seq
  active_params = hidden * experts + top_k * 3 * hidden * width
  flops = 2 * tokens * active_params
  print(json.dumps({
      "benchmark": "moe_layer",
      "shapes": name,
      "dispatch": args.dispatch,
      "grouped_matmul": (
          "mosaic_gpu" if args.kernel != "xla" and grouped_kernel.supports(
              dtype, (experts, width // (mesh.shape["tp"] if mesh else 1), hidden))
          else "ragged_dot"
      ) if args.dispatch == "ragged" else None,
      "device": jax.devices()[0].device_kind,
      "mesh": args.mesh,
      "dtype": dtype.name,
      "hidden": hidden, "expert_width": width, "experts": experts, "top_k": top_k,
      "batch": batch, "seq": seq, "tokens": tokens,
      "active_params_per_token": active_params,
      "compile_s": round(compile_s, 3),
      "ms_per_call": round(seconds * 1e3, 3),
      "tokens_per_s": round(tokens / seconds, 1),
      "active_tflop_per_call": round(flops / 1e12, 4),
      "tflops": round(flops / seconds / 1e12, 3),
  }))


if __name__ == "__main__":
  main()
