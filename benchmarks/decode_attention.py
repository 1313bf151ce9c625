"""The one-kernel decode attention against XLA's path: error and time per call.

For decode shapes of the benchmarked models (one query per row over a bf16 cache with a
random padding mask), fresh random data per check. Error is ||out - ref|| / ||ref||
against float32 attention on the same (upcast) inputs; time is the median of jitted
calls. ``--stack-layers L`` also times a scanned layer stack's case: the kernel reading
a traced layer of an ``[B, L, S, K, H]`` cache in place (``stacked_kernel_us``) against
slicing that layer out first, as XLA's path does (``sliced_kernel_us``). Prints JSON.

    python benchmarks/decode_attention.py
    python benchmarks/decode_attention.py --stack-layers 36
"""

from __future__ import annotations

import json
import pathlib
import statistics
import sys
import time

# (name, batch, heads, kv heads, head dim, cache length, softcap)
SHAPES = [
    ("qwen3_0p6b bs1", 1, 16, 8, 128, 384, None),
    ("qwen3_0p6b bs32", 32, 16, 8, 128, 384, None),
    ("qwen3_8b bs1", 1, 32, 8, 128, 384, None),
    ("qwen3_8b bs32", 32, 32, 8, 128, 384, None),
    ("qwen3_8b bs1 8k", 1, 32, 8, 128, 8192, None),
    ("gemma3_1b bs1", 1, 4, 1, 256, 384, None),
    ("gemma2_2b bs8 softcap", 8, 8, 4, 256, 1024, 50.0),
]


def seconds_per_call(attend, q, k, v, mask, calls: int = 64, repeats: int = 20,
                     layers: int | None = None) -> float:
  """Median over repeats of one jitted loop of ``calls`` dependent calls, per call:
  a host dispatch per call would outweigh a kernel of a few microseconds. With
  ``layers``, ``attend`` also takes the call's layer of the stacked ``k, v`` (traced:
  the loop's counter modulo ``layers``)."""
  import jax

  def step(i, q):
    out = attend(q, k, v, mask) if layers is None else attend(q, k, v, mask, i % layers)
    return out.astype(q.dtype)

  @jax.jit
  def loop(q, k, v, mask):
    return jax.lax.fori_loop(0, calls, step, q)

  loop(q, k, v, mask).block_until_ready()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    loop(q, k, v, mask).block_until_ready()
    times.append(time.perf_counter() - start)
  return statistics.median(times) / calls


# (block_keys, num_warps, num_stages) tried by --sweep; the first is the default.
VARIANTS = [(64, 4, 2), (64, 4, 3), (128, 4, 2), (128, 8, 3), (64, 8, 2), (32, 4, 2)]


def main() -> None:
  import argparse

  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--sweep", action="store_true", help="time every kernel variant too")
  parser.add_argument("--stack-layers", type=int, default=0, metavar="L",
                      help="also time the kernel on a stacked cache of L layers")
  args = parser.parse_args()
  import jax
  import jax.numpy as jnp
  import numpy as np

  from tunix_zoo.kernels import decode_attention
  from tunix_zoo.layers.attention import dot_product_attention

  # Off a GPU, a dry run of the script in Pallas's interpreter; its times mean nothing.
  interpret = jax.default_backend() != "gpu"
  rng = np.random.default_rng(0)
  rows = []
  for name, batch, heads, kv_heads, head_dim, length, softcap in SHAPES:
    scale = head_dim**-0.5
    q, k, v = (
        jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)
        for shape in ((batch, 1, heads, head_dim), (batch, length, kv_heads, head_dim),
                      (batch, length, kv_heads, head_dim))
    )
    starts = rng.integers(0, length // 2, batch)
    mask = jnp.asarray(np.arange(length)[None, None, :] >= starts[:, None, None])
    kernel = lambda q, k, v, m: decode_attention.decode_attention(  # noqa: E731
        q, k, v, m, scale, softcap, interpret=interpret)
    xla = lambda q, k, v, m: dot_product_attention(q, k, v, m, scale, softcap)  # noqa: E731
    up = lambda x: x.astype(jnp.float32)  # noqa: E731
    ref = dot_product_attention(up(q), up(k), up(v), mask, scale, softcap)
    out = kernel(q, k, v, mask)
    error = float(jnp.linalg.norm(up(out) - ref) / jnp.linalg.norm(ref))
    xla_error = float(jnp.linalg.norm(up(xla(q, k, v, mask)) - ref) / jnp.linalg.norm(ref))
    kernel_s = seconds_per_call(kernel, q, k, v, mask)
    xla_s = seconds_per_call(xla, q, k, v, mask)
    cache_bytes = 2 * k.nbytes
    variants = {}
    for block_keys, warps, stages in VARIANTS[1:] if args.sweep else ():
      if length % block_keys:
        continue
      variant = lambda q, k, v, m: decode_attention.decode_attention(  # noqa: E731
          q, k, v, m, scale, softcap, block_keys=block_keys, num_warps=warps, num_stages=stages,
          interpret=interpret)
      variants[f"block{block_keys}_warps{warps}_stages{stages}_us"] = 1e6 * seconds_per_call(
          variant, q, k, v, mask)
    if args.stack_layers:
      variants.update(stacked_times(kernel, q, k, v, mask, ref, args.stack_layers, scale,
                                    softcap, interpret))
    rows.append(dict(**variants,
        shape=name, kernel_us=1e6 * kernel_s, xla_us=1e6 * xla_s, speedup=xla_s / kernel_s,
        kernel_cache_tb_s=cache_bytes / kernel_s / 1e12, rel_error=error,
        xla_rel_error=xla_error, finite=bool(jnp.isfinite(out).all()),
    ))
  print(json.dumps(dict(device=jax.devices()[0].device_kind, jax=jax.__version__,
                        rows=rows), indent=1))


def stacked_times(kernel, q, k, v, mask, ref, layers, scale, softcap, interpret) -> dict:
  """The kernel on a stacked ``[B, layers, S, K, H]`` cache (``k, v`` as its last layer,
  noise elsewhere): reading a traced layer in place against slicing it out first."""
  import jax
  import jax.numpy as jnp

  from tunix_zoo.kernels import decode_attention

  def stack(x):
    noise = jax.random.normal(jax.random.key(layers), (layers - 1, *x.shape), x.dtype)
    return jnp.moveaxis(jnp.concatenate([noise, x[None]]), 0, 1)

  k_stack, v_stack = stack(k), stack(v)
  in_place = lambda q, k, v, m, layer: decode_attention.decode_attention(  # noqa: E731
      q, k, v, m, scale, softcap, layer=layer, interpret=interpret)
  sliced = lambda q, k, v, m, layer: kernel(  # noqa: E731
      q, *(jax.lax.dynamic_index_in_dim(x, layer, 1, keepdims=False) for x in (k, v)), m)
  out = jax.jit(in_place)(q, k_stack, v_stack, mask, jnp.int32(layers - 1))
  up = lambda x: x.astype(jnp.float32)  # noqa: E731
  return dict(
      stacked_kernel_us=1e6 * seconds_per_call(in_place, q, k_stack, v_stack, mask,
                                               layers=layers),
      sliced_kernel_us=1e6 * seconds_per_call(sliced, q, k_stack, v_stack, mask, layers=layers),
      stacked_rel_error=float(jnp.linalg.norm(up(out) - ref) / jnp.linalg.norm(ref)),
  )


if __name__ == "__main__":
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
  main()
