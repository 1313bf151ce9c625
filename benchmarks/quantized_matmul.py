"""Weight-only quantized products at Qwen3-8B layer shapes: which formulation runs at the
speed of the bytes it stores. Prints one JSON object.

Default: one jitted program computes every projection of ``--layers`` layers (q, k, v,
o, gate, up, down) for a batch of 1 and of 8 and reports milliseconds, TB/s of stored
bytes (values + scales) and the error against the dequantized float weight, per
formulation: ``bf16``; ``int8`` and ``int4`` as XLA computes
:meth:`tunix_zoo.layers.quantized.Quantization.matmul`; ``int8_kernel``, ``int4_kernel``,
``nf4_kernel`` and ``fp8_kernel``: the GEMV kernel of
:mod:`tunix_zoo.kernels.quantized_matmul` at its default tiling; and, for int4, the XLA
alternatives measured in benchmarks/README.md (``int4_halves``: the packed bytes' low and
high nibbles as two products; ``int4_halves_grouped``: per-group products scaled and
summed; ``int4_native`` and ``int4_native_grouped``: XLA's ``int4`` dtype, which the GPU
stores a byte per value) and the one-row reductions of :mod:`tunix_zoo.kernels.gemv`
(``bf16_reduce``, ``int8_reduce``, ``int4_reduce``, ``int4_reduce_offset``: the codes' +8
taken once per group as gemv does; ``*_reduce_bits``: codes decoded through float32
exponent bits; ``int4_native_reduce``).

``--sweep``: per kind, distinct shape and batch (1, 8), the kernel's tilings (block_out,
groups_per_step, num_warps, num_stages, mma) one product at a time over enough copies of the
weight that L2 does not serve it: the best tiling's µs and TB/s of stored bytes, the
default tiling's, and XLA's ``Quantization.matmul`` beside them.

    python benchmarks/quantized_matmul.py [--layers 12] [--small --interpret]
    python benchmarks/quantized_matmul.py --sweep [--kinds int8,int4,nf4,fp8]
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import pathlib
import sys
import time

XLA_FORMATS = ("bf16", "int8", "int4", "int4_halves", "int4_halves_grouped", "int4_native",
               "int4_native_grouped", "bf16_reduce", "int8_reduce", "int4_reduce",
               "int4_reduce_offset", "int4_native_reduce", "int8_reduce_bits",
               "int4_reduce_bits")
KERNEL_FORMATS = ("int8_kernel", "int4_kernel", "nf4_kernel", "fp8_kernel")
QWEN3_8B_SHAPES = [(4096, 4096), (1024, 4096), (1024, 4096), (4096, 4096), (12288, 4096),
                   (12288, 4096), (4096, 12288)]  # [out, in] of q, k, v, o, gate, up, down
SMALL_SHAPES = [(256, 256), (128, 256), (256, 512), (512, 256)]
BATCHES = (1, 8)
GROUP = 128


def scheme_of(fmt: str):
  from tunix_zoo.layers.quantized import Quantization

  return Quantization.of(fmt.split("_")[0])


def r3(value: float) -> float:
  return float(f"{value:.3g}")


def layer_stack(args) -> dict:
  """Every projection of ``--layers`` layers in one program, per formulation."""
  import jax
  import jax.numpy as jnp

  shapes = SMALL_SHAPES if args.small else QWEN3_8B_SHAPES
  bf16 = jnp.bfloat16
  key = jax.random.key(0)
  int4 = scheme_of("int4")
  formats = XLA_FORMATS + KERNEL_FORMATS
  if args.formats:
    formats = tuple(args.formats.split(","))

  def stored(fmt, w):
    if fmt.startswith("bf16"):
      return (w.astype(bf16),)
    values, scales = scheme_of(fmt).quantize(w, jnp)
    if fmt.startswith("int4_native"):  # XLA's int4, elements in order
      halves = values.reshape(values.shape[0], -1, GROUP // 2)
      codes = jnp.concatenate([halves & 15, halves >> 4], -1).astype(jnp.int8) - 8
      return codes.astype(jnp.int4).reshape(w.shape), scales
    return values, scales

  def product(fmt, x, p):
    if "_reduce" in fmt:
      return reduction(fmt, x, p)
    if fmt == "bf16":
      return x @ p[0].T
    if fmt in ("int8", "int4") or fmt in KERNEL_FORMATS:
      kernel = ("interpret" if args.interpret else "pallas") if fmt in KERNEL_FORMATS else "xla"
      return scheme_of(fmt).matmul(x, *p, bf16, kernel=kernel)
    values, scales = p
    out, groups = scales.shape
    batch = x.shape[0]
    if fmt == "int4_native":
      w = values.astype(bf16).reshape(out, groups, GROUP) * scales.astype(bf16)[..., None]
      return x @ w.reshape(out, -1).T
    if fmt == "int4_native_grouped":
      y = jnp.einsum("bgi,ogi->bog", x.reshape(batch, groups, GROUP),
                     values.astype(bf16).reshape(out, groups, GROUP),
                     preferred_element_type=jnp.float32)
      return (y * scales.astype(jnp.float32)[None]).sum(-1).astype(bf16)
    packed = values.reshape(out, groups, GROUP // 2)
    low, high = (packed & 15).astype(bf16) - 8, (packed >> 4).astype(bf16) - 8
    xs = x.reshape(batch, groups, 2, GROUP // 2)
    if fmt == "int4_halves":
      s = scales.astype(bf16)[..., None]
      return (xs[:, :, 0].reshape(batch, -1) @ (low * s).reshape(out, -1).T
              + xs[:, :, 1].reshape(batch, -1) @ (high * s).reshape(out, -1).T)
    y = (jnp.einsum("bgi,ogi->bog", xs[:, :, 0], low, preferred_element_type=jnp.float32)
         + jnp.einsum("bgi,ogi->bog", xs[:, :, 1], high, preferred_element_type=jnp.float32))
    return (y * scales.astype(jnp.float32)[None]).sum(-1).astype(bf16)

  def reduction(fmt, x, p):
    # The product as a multiply and a sum over the inputs, float32 throughout: XLA emits
    # a reduction kernel (what it does itself for small bf16 GEMVs) with the decode fused
    # into its loads, instead of a GEMM fusion.
    f32 = jnp.float32
    x = x.astype(f32)
    batch = x.shape[0]
    if fmt == "bf16_reduce":
      return jnp.sum(x[:, None, :] * p[0].astype(f32)[None], -1).astype(bf16)
    values, scales = p
    out, groups = scales.shape
    s = scales.astype(f32)
    if fmt == "int8_reduce_bits":
      # 0x4B400000 + v read as a float32 is 1.5 * 2**23 + v: integer adds, not conversions.
      v = jax.lax.bitcast_convert_type(values.astype(jnp.int32) + 0x4B400000, f32) - 12582912.0
      return (jnp.sum(x[:, None, :] * v[None], -1) * s[:, 0]).astype(bf16)
    if fmt == "int8_reduce":
      return (jnp.sum(x[:, None, :] * values.astype(f32)[None], -1) * s[:, 0]).astype(bf16)
    if fmt == "int4_native_reduce":
      w = values.astype(f32).reshape(out, groups, GROUP) * s[..., None]
      return jnp.sum(x.reshape(batch, 1, groups, GROUP) * w[None], (-2, -1)).astype(bf16)
    packed = values.reshape(out, groups, GROUP // 2)
    xs = x.reshape(batch, 1, groups, 2, GROUP // 2)
    low, high = (packed & 15).astype(f32), (packed >> 4).astype(f32)
    if fmt == "int4_reduce_bits":
      # code | 0x4B000000 read as a float32 is 2**23 + code.
      nibble = lambda c: jax.lax.bitcast_convert_type(c.astype(jnp.uint32) | 0x4B000000,
                                                      f32) - 8388616.0
      part = jnp.sum(xs[:, :, :, 0] * nibble(packed & 15) + xs[:, :, :, 1] * nibble(packed >> 4), -1)
      return jnp.sum(part * s[None], -1).astype(bf16)
    if fmt == "int4_reduce":
      part = xs[:, :, :, 0] * (low - 8) + xs[:, :, :, 1] * (high - 8)
      return jnp.sum(part * s[None, :, :, None], (-2, -1)).astype(bf16)
    # int4_reduce_offset: the codes' +8 comes off as one per-group term,
    # sum_g s[o, g] * (sum_j x * code - 8 * sum_j x).
    part = jnp.sum(xs[:, :, :, 0] * low + xs[:, :, :, 1] * high, -1)
    offset = 8 * jnp.sum(xs, (-2, -1))
    return jnp.sum((part - offset) * s[None], -1).astype(bf16)

  def every_product(fmt):
    def run(params, inputs):
      total = jnp.zeros((), jnp.float32)
      for layer in params:
        for (_, width), p in zip(shapes, layer):
          # The barrier keeps each product's output whole, as a decode step uses it,
          # rather than letting XLA fold the sum into the product.
          y = jax.lax.optimization_barrier(product(fmt, inputs[width], p))
          total += y.astype(jnp.float32).sum()
      return total
    return jax.jit(run)

  weights = [[jax.random.normal(jax.random.fold_in(key, 100 * l + i), s, jnp.float32) * 0.02
              for i, s in enumerate(shapes)] for l in range(args.layers)]
  report = {}

  def one_format(fmt):
    report = {}
    params = [[stored(fmt, w) for w in layer] for layer in weights]
    nbytes = sum(a.nbytes for layer in params for p in layer for a in p)
    reference = int4 if fmt.startswith("int4") else (None if fmt.startswith("bf16") else scheme_of(fmt))
    for batch in BATCHES:
      inputs = {width: jax.random.normal(jax.random.fold_in(key, width + batch), (batch, width),
                                         jnp.float32).astype(bf16)
                for width in {s[1] for s in shapes}}
      error = 0.0
      for (_, width), p, w in zip(shapes, params[0], weights[0]):
        dense = w if reference is None else reference.dequantize(
            *reference.quantize(w, jnp), jnp.float32)
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
      report[f"{fmt}_b{batch}"] = dict(ms=r3(ms), tb_s=r3(nbytes / ms / 1e9), err=r3(error),
                                       first_s=r3(compile_s))
    report[f"{fmt}_gb"] = r3(nbytes / 1e9)
    return report

  for fmt in formats:
    try:
      report.update(one_format(fmt))
    except Exception as e:  # e.g. a kernel Triton cannot compile: the others still run.
      report[fmt] = dict(error=f"{type(e).__name__}: {str(e)[:300]}")
  return report



def seconds_per_product(product, x, copies, steps: int) -> float:
  """One jitted loop of ``steps`` x every copy's product; a scalar out of each keeps it
  live."""
  import jax
  import jax.numpy as jnp

  @jax.jit
  def run(x, copies):
    def body(_, total):
      for stored in copies:
        total = total + product(x, *stored)[:, :8].astype(jnp.float32).sum()
      return total
    return jax.lax.fori_loop(0, steps, body, jnp.zeros((), jnp.float32))

  run(x, copies).block_until_ready()
  start = time.perf_counter()
  run(x, copies).block_until_ready()
  return (time.perf_counter() - start) / steps / len(copies)


def tilings(default, group_bytes: int, groups: int, small: bool) -> list:
  """The sweep's first tilings, the default first: block_out x bytes per step, as vector
  multiply-adds and as tensor-core dots (``mma``), 4 warps and 3 stages (the best is then
  tried with 8 warps and with 2 and 4 stages)."""
  from tunix_zoo.kernels.quantized_matmul import Blocks

  found = [default]
  shapes = [(False, (2, 4), (512,))] if small else [
      (False, (4, 8, 16), (2048, 4096, 8192)), (True, (16, 32), (4096, 8192))]
  for mma, block_outs, step_bytes in shapes:
    for block_out, size in itertools.product(block_outs, step_bytes):
      per_step = size // (block_out * group_bytes)
      if 1 <= per_step <= groups and groups % per_step == 0:
        found.append(Blocks(block_out=block_out, groups_per_step=per_step, mma=mma))
  return list(dict.fromkeys(found))


def sweep(args) -> dict:
  """Per kind, shape and batch: the best tiling, the default one and XLA's path."""
  import jax
  import jax.numpy as jnp

  from tunix_zoo.kernels import quantized_matmul as qm
  from tunix_zoo.layers.quantized import NF4_LEVELS, Quantization

  shapes = sorted(set(SMALL_SHAPES if args.small else QWEN3_8B_SHAPES))
  key = jax.random.key(0)
  report = {}
  cases = list(itertools.product(args.kinds.split(","), shapes, BATCHES))
  deadline = time.perf_counter() + args.max_seconds
  for number, (kind, (out, inputs), batch) in enumerate(cases):
    # Each case gets an equal share of the time left; tilings beyond it are not tried
    # (XLA's path and the default tiling always are).
    until = time.perf_counter() + (deadline - time.perf_counter()) / (len(cases) - number)
    scheme = Quantization.of(kind)
    w = jax.random.normal(jax.random.fold_in(key, out + inputs), (out, inputs)) * 0.02
    stored = scheme.quantize(w, jnp)
    nbytes = sum(a.nbytes for a in stored)
    # Enough copies (>= 160 MB, at most 64 products per program) that the H200's 60 MB
    # L2 does not serve the weights.
    count = 2 if args.small else min(64, max(2, -(-(160 << 20) // nbytes)))
    copies = [jax.tree.map(jnp.copy, stored) for _ in range(count)]
    x = jax.random.normal(jax.random.fold_in(key, batch), (batch, inputs)).astype(jnp.bfloat16)
    steps = 2 if args.small else 20
    levels = tuple(NF4_LEVELS.tolist()) if kind == "nf4" else None
    # None where no tiling compiled (strict JSON has no infinity).
    rate = lambda s: (dict(us=r3(s * 1e6), tb_s=r3(nbytes / s / 1e12)) if s < float("inf")
                      else dict(us=None, tb_s=None))
    xla = seconds_per_product(
        lambda x, v, s: scheme.matmul(x, v, s, jnp.bfloat16), x, copies, steps)
    groups, group_bytes, _ = qm._layout(*stored, kind)

    failures = []

    def kernel_seconds(blocks):
      """Seconds per product; infinite where the tiling does not compile (noted)."""
      product = lambda x, v, s: qm.quantized_matmul(x, v, s, kind, levels, blocks=blocks,
                                                   interpret=args.interpret)
      try:
        return seconds_per_product(product, x, copies, steps)
      except Exception as e:  # A tiling Triton cannot compile (e.g. shared memory).
        failures.append(f"{blocks}: {type(e).__name__}: {str(e)[:160]}")
        return float("inf")

    default = qm.default_blocks(kind, batch, out, group_bytes, x.dtype)
    results = []
    for blocks in tilings(default, group_bytes, groups, args.small):
      if time.perf_counter() > until and results:
        break
      if qm.supports(x, *stored, kind, blocks, interpret=args.interpret):
        results.append((kernel_seconds(blocks), blocks))
    default_s = results[0][0]
    best_s, best = min(results, key=lambda r: r[0])
    for change in (dict(num_warps=12 - best.num_warps), dict(num_stages=2),
                   dict(num_stages=4)):
      blocks = dataclasses.replace(best, **change)
      if time.perf_counter() < until and qm.supports(x, *stored, kind, blocks,
                                                     interpret=args.interpret):
        results.append((kernel_seconds(blocks), blocks))
      best_s, best = min(results, key=lambda r: r[0])
    row = dict(xla=rate(xla), default=rate(default_s), best=dict(rate(best_s), tiling=[
        best.block_out, best.groups_per_step, best.num_warps, best.num_stages, int(best.mma)]),
        tried=len(results))
    if failures:
      row.update(failed=len(failures), first_failure=failures[0])
    report[f"{kind}_{out}x{inputs}_b{batch}"] = row
  report["tiling"] = "block_out, groups_per_step, num_warps, num_stages, mma"
  return report


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--layers", type=int, default=12)
  parser.add_argument("--small", action="store_true", help="tiny shapes (a CPU smoke test)")
  parser.add_argument("--interpret", action="store_true",
                      help="the kernel in Pallas's interpreter (a CPU smoke test)")
  parser.add_argument("--formats", help="comma-separated subset of the default mode's formats")
  parser.add_argument("--sweep", action="store_true", help="the kernel's tilings per product")
  parser.add_argument("--kinds", default="int8,int4,nf4", help="--sweep's kinds")
  parser.add_argument("--max-seconds", type=float, default=140,
                      help="--sweep's time, shared equally by its cases (kind x shape x batch)")
  args = parser.parse_args()

  import jax

  report = {"device": jax.devices()[0].device_kind, "jax": jax.__version__}
  if args.sweep:
    report.update(sweep(args))
  else:
    report["layers"] = args.layers
    report.update(layer_stack(args))
  print(json.dumps(report, separators=(",", ":")))


if __name__ == "__main__":
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
  main()
