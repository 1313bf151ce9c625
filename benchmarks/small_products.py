"""Why batch-1 decode of small models stays far from the HBM roofline: the weight products.

At batch 1 every weight product is a matrix-vector product of a few MB. Prints JSON for
a preset's layer widths (bf16, 28 distinct weights per shape so that L2 does not serve):

- ``products``: µs and TB/s per product, XLA's (``jnp.einsum``) against the best of a
  small sweep of a plain Pallas (Triton) GEMV kernel, and the same for the concatenated
  q|k|v and gate|up shapes a fused layer would use;
- ``layer_stack``: a decode step's products and norms over all layers (no attention),
  with separate q/k/v and gate/up weights and with concatenated ones.

    python benchmarks/small_products.py --model qwen3_0p6b
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

COPIES = 28


def _gemv_kernel(x_ref, w_ref, o_ref, *, block_in):
  rows, inputs = w_ref.shape

  def step(i, acc):
    part = pl.ds(pl.multiple_of(i * block_in, block_in), block_in)
    w, x = w_ref[:, part].astype(jnp.float32), x_ref[:, part].astype(jnp.float32)
    return acc + jnp.sum(x[:, None, :] * w[None, :, :], axis=-1)

  init = jnp.zeros((x_ref.shape[0], rows), jnp.float32)
  o_ref[...] = jax.lax.fori_loop(0, inputs // block_in, step, init).astype(o_ref.dtype)


def pallas_gemv(x, w, block_out: int, block_in: int, num_warps: int):
  """``x @ w.T`` for ``x`` [B, I], ``w`` [O, I]: one program per ``block_out`` rows."""
  (batch, inputs), outputs = x.shape, w.shape[0]
  return pl.pallas_call(
      functools.partial(_gemv_kernel, block_in=block_in), grid=(outputs // block_out,),
      in_specs=[pl.BlockSpec((batch, inputs), lambda n: (0, 0)),
                pl.BlockSpec((block_out, inputs), lambda n: (n, 0))],
      out_specs=pl.BlockSpec((batch, block_out), lambda n: (0, n)),
      out_shape=jax.ShapeDtypeStruct((batch, outputs), x.dtype),
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=2),
  )(x, w)


def xla_gemv(x, w):
  return jnp.einsum("bi,oi->bo", x, w)


def random_weights(shape, count, seed=0):
  key = jax.random.key(seed)
  return [(jax.random.normal(jax.random.fold_in(key, n), shape) * 0.02).astype(jnp.bfloat16)
          for n in range(count)]


def seconds_per_product(product, x, weights, steps: int) -> float:
  @jax.jit
  def run(x, weights):
    def body(_, total):
      for w in weights:  # A scalar out of each keeps every product live.
        total = total + product(x, w)[:, :8].astype(jnp.float32).sum()
      return total
    return jax.lax.fori_loop(0, steps, body, jnp.zeros((), jnp.float32))

  run(x, weights).block_until_ready()
  start = time.perf_counter()
  run(x, weights).block_until_ready()
  return (time.perf_counter() - start) / steps / len(weights)


def product_row(shape) -> dict:
  weights = random_weights(shape, COPIES, seed=sum(shape))
  x = jnp.ones((1, shape[1]), jnp.bfloat16)
  rate = lambda s: dict(us=round(s * 1e6, 2), tb_s=round(weights[0].nbytes / s / 1e12, 3))
  row = dict(shape=list(shape), mbytes=weights[0].nbytes / 1e6,
             xla=rate(seconds_per_product(xla_gemv, x, weights, 100)))
  best = None
  for block_out, block_in, warps in itertools.product((2, 4, 8), (512, 1024), (4, 8)):
    if shape[1] % block_in or shape[0] % block_out:
      continue
    product = functools.partial(pallas_gemv, block_out=block_out, block_in=block_in,
                                num_warps=warps)
    seconds = seconds_per_product(product, x, weights, 30)
    if best is None or seconds < best[0]:
      best = (seconds, dict(block_out=block_out, block_in=block_in, num_warps=warps))
  row["pallas_gemv_best"] = dict(rate(best[0]), **best[1])
  return row


def layer_stack(config, concatenated: bool, steps: int = 200) -> dict:
  d, q = config.hidden_size, config.num_heads * config.head_dim
  kv, inner = config.num_kv_heads * config.head_dim, config.intermediate_size
  if concatenated:
    shapes = dict(qkv=(q + 2 * kv, d), o=(d, q), gate_up=(2 * inner, d), down=(d, inner))
  else:
    shapes = dict(q=(q, d), k=(kv, d), v=(kv, d), o=(d, q), gate=(inner, d), up=(inner, d),
                  down=(d, inner))
  layers = [{name: random_weights(shape, 1, seed=n * 10 + i)[0]
             for i, (name, shape) in enumerate(shapes.items())}
            for n in range(config.num_layers)]

  def norm(x):
    x32 = x.astype(jnp.float32)
    return (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + 1e-6)).astype(x.dtype)

  def layer(x, w):
    h = norm(x)
    if concatenated:
      qkv = xla_gemv(h, w["qkv"])
      mixed = qkv[:, :q] + qkv[:, q:].sum(-1, keepdims=True)  # Stands in for attention.
      h = norm(x + xla_gemv(mixed, w["o"]))
      gate, up = jnp.split(xla_gemv(h, w["gate_up"]), 2, axis=-1)
    else:
      kv_sum = xla_gemv(h, w["k"]).sum(-1, keepdims=True) + xla_gemv(h, w["v"]).sum(
          -1, keepdims=True)
      mixed = xla_gemv(h, w["q"]) + kv_sum
      h = norm(x + xla_gemv(mixed, w["o"]))
      gate, up = xla_gemv(h, w["gate"]), xla_gemv(h, w["up"])
    return x + xla_gemv(jax.nn.silu(gate) * up, w["down"])

  @jax.jit
  def run(x, layers):
    def body(_, x):
      for w in layers:
        x = layer(x, w)
      return x
    return jax.lax.fori_loop(0, steps, body, x)

  x = jnp.ones((1, d), jnp.bfloat16)
  run(x, layers).block_until_ready()
  start = time.perf_counter()
  run(x, layers).block_until_ready()
  seconds = (time.perf_counter() - start) / steps
  nbytes = sum(w.nbytes for ws in layers for w in ws.values())
  return dict(step_us=round(seconds * 1e6, 1), mbytes=nbytes / 1e6,
              tb_s=round(nbytes / seconds / 1e12, 3))


def main() -> None:
  from tunix_zoo import registry

  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--model", default="qwen3_0p6b")
  args = parser.parse_args()
  config = registry.get_config(args.model)
  d, q = config.hidden_size, config.num_heads * config.head_dim
  kv, inner = config.num_kv_heads * config.head_dim, config.intermediate_size
  shapes = dict(q=(q, d), kv=(kv, d), o=(d, q), gate=(inner, d), down=(d, inner),
                qkv=(q + 2 * kv, d), gate_up=(2 * inner, d))
  report = dict(model=args.model, device=jax.devices()[0].device_kind, jax=jax.__version__,
                products={name: product_row(shape) for name, shape in shapes.items()},
                layer_stack=dict(separate=layer_stack(config, False),
                                 concatenated=layer_stack(config, True)))
  print(json.dumps(report, indent=1))


if __name__ == "__main__":
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
  main()
