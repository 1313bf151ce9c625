"""Weight-only quantized products at Qwen3-8B layer shapes: which formulation runs at the
speed of the bytes it stores.

One jitted program computes every projection of ``--layers`` layers (q, k, v, o, gate, up,
down) for a batch of 1 and of 32 and reports milliseconds, TB/s of stored bytes (values +
scales) and the error against the dequantized float weight. Formulations: ``bf16``;
``int8`` and ``int4`` as :class:`tunix_zoo.layers.quantized.Quantization` computes them;
and, for int4, the alternatives measured in benchmarks/README.md (``int4_halves``: the
packed bytes' low and high nibbles as two products; ``int4_halves_grouped``: per-group
products scaled and summed; ``int4_native`` and ``int4_native_grouped``: XLA's ``int4``
dtype instead of packed bytes).

    python benchmarks/quantized_matmul.py [--layers 12] [--small]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

FORMATS = ("bf16", "int8", "int4", "int4_halves", "int4_halves_grouped", "int4_native",
           "int4_native_grouped")
QWEN3_8B_SHAPES = [(4096, 4096), (1024, 4096), (1024, 4096), (4096, 4096), (12288, 4096),
                   (12288, 4096), (4096, 12288)]  # [out, in] of q, k, v, o, gate, up, down
SMALL_SHAPES = [(256, 256), (128, 256), (256, 512), (512, 256)]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--layers", type=int, default=12)
  parser.add_argument("--small", action="store_true", help="tiny shapes (a CPU smoke test)")
  args = parser.parse_args()

  import jax
  import jax.numpy as jnp

  from tunix_zoo.layers.quantized import Quantization

  shapes = SMALL_SHAPES if args.small else QWEN3_8B_SHAPES
  group = 128
  bf16 = jnp.bfloat16
  key = jax.random.key(0)
  int4, int8 = Quantization.of("int4"), Quantization.of("int8")

  def stored(fmt, w):
    if fmt == "bf16":
      return (w.astype(bf16),)
    if fmt == "int8":
      return int8.quantize(w, jnp)
    values, scales = int4.quantize(w, jnp)  # [out, in / 2] packed bytes, [out, in / group]
    if fmt.startswith("int4_native"):
      halves = values.reshape(values.shape[0], -1, group // 2)
      codes = jnp.concatenate([halves & 15, halves >> 4], -1).astype(jnp.int8) - 8
      return codes.astype(jnp.int4).reshape(w.shape), scales
    return values, scales

  def product(fmt, x, p):
    if fmt == "bf16":
      return x @ p[0].T
    if fmt in ("int8", "int4"):
      return (int8 if fmt == "int8" else int4).matmul(x, *p, bf16)
    values, scales = p
    out, groups = scales.shape
    batch = x.shape[0]
    if fmt == "int4_native":
      w = values.astype(bf16).reshape(out, groups, group) * scales.astype(bf16)[..., None]
      return x @ w.reshape(out, -1).T
    if fmt == "int4_native_grouped":
      y = jnp.einsum("bgi,ogi->bog", x.reshape(batch, groups, group),
                     values.astype(bf16).reshape(out, groups, group),
                     preferred_element_type=jnp.float32)
      return (y * scales.astype(jnp.float32)[None]).sum(-1).astype(bf16)
    packed = values.reshape(out, groups, group // 2)
    low, high = (packed & 15).astype(bf16) - 8, (packed >> 4).astype(bf16) - 8
    xs = x.reshape(batch, groups, 2, group // 2)
    if fmt == "int4_halves":
      s = scales.astype(bf16)[..., None]
      return (xs[:, :, 0].reshape(batch, -1) @ (low * s).reshape(out, -1).T
              + xs[:, :, 1].reshape(batch, -1) @ (high * s).reshape(out, -1).T)
    y = (jnp.einsum("bgi,ogi->bog", xs[:, :, 0], low, preferred_element_type=jnp.float32)
         + jnp.einsum("bgi,ogi->bog", xs[:, :, 1], high, preferred_element_type=jnp.float32))
    return (y * scales.astype(jnp.float32)[None]).sum(-1).astype(bf16)

  def every_product(fmt):
    def run(params, inputs):
      total = jnp.zeros((), jnp.float32)
      for layer in params:
        for (_, width), p in zip(shapes, layer):
          total += product(fmt, inputs[width], p).astype(jnp.float32).sum()
      return total
    return jax.jit(run)

  weights = [[jax.random.normal(jax.random.fold_in(key, 100 * l + i), s, jnp.float32) * 0.02
              for i, s in enumerate(shapes)] for l in range(args.layers)]
  report = {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
            "layers": args.layers, "shapes": shapes}
  for fmt in FORMATS:
    params = [[stored(fmt, w) for w in layer] for layer in weights]
    nbytes = sum(a.nbytes for layer in params for p in layer for a in p)
    scheme = int8 if fmt == "int8" else int4
    for batch in (1, 32):
      inputs = {width: jax.random.normal(jax.random.fold_in(key, width + batch), (batch, width),
                                         jnp.float32).astype(bf16)
                for width in {s[1] for s in shapes}}
      error = 0.0
      for (_, width), p, w in zip(shapes, params[0], weights[0]):
        dense = w if fmt == "bf16" else scheme.dequantize(
            *(int8 if fmt == "int8" else int4).quantize(w, jnp), jnp.float32)
        want = inputs[width].astype(jnp.float32) @ dense.T
        got = jax.jit(lambda x, p: product(fmt, x, p))(inputs[width], p).astype(jnp.float32)
        error = max(error, float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want))))
      program = every_product(fmt)
      start = time.perf_counter()
      program(params, inputs).block_until_ready()
      compile_s = time.perf_counter() - start
      calls = 3 if args.small else 20
      start = time.perf_counter()
      for _ in range(calls):
        result = program(params, inputs)
      result.block_until_ready()
      ms = 1e3 * (time.perf_counter() - start) / calls
      report[f"{fmt}_batch{batch}"] = dict(
          ms=ms, stored_gb=nbytes / 1e9, tb_s=nbytes / ms / 1e9, rel_error=error,
          first_call_s=compile_s)
    del params
  print(json.dumps(report, indent=1))


if __name__ == "__main__":
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
  main()
