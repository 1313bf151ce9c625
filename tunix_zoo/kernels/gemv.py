"""One-row weight products (a batch-1 decode step) written as a multiply and a sum.

For ``x @ W.T`` with one row of ``x``, XLA's GPU backend runs a GEMM (cuBLAS or a Triton
fusion) above ~10M multiply-adds and rewrites smaller products into a reduction kernel
itself. Written as ``sum(x * W, -1)`` in float32 the large ones become that reduction
kernel too, which streams the weight faster, and for int8 / int4 weights it decodes them
in the same loads. One NVIDIA H200, jax 0.11.2: every product of 12 Qwen3-8B layers at
batch 1 (``benchmarks/quantized_matmul.py``, TB/s of stored bytes) and Qwen3-8B decoding
at batch 1 (``benchmarks/decode.py``, 128 new tokens, same lease):

- bf16: 3.58-3.70 TB/s against the dot's 3.29-3.31; decode 225.9 against 207.4 tok/s
  (scanned layers 215.9 against 190.1);
- int8 (per channel): 2.41-2.48 against 2.04; decode 284.9 against 251.7 tok/s;
- int4 (groups of 128): 1.39 against the GEMV kernel's 1.15, yet decode 228.8 against the
  kernel's 272.5 tok/s, so ``"auto"`` leaves int4 to ``KernelPolicy.quantized_matmul``;
- Qwen3-0.6B and Gemma3-1B: unchanged (984 / 986 and 818 / 806 tok/s): their products but
  the LM head are below :data:`MIN_MULTIPLY_ADDS`.

At 8 rows the same formulation re-reads the weight per row (0.41-0.54 TB/s), so it serves
one row only. The products it serves are plain XLA: float32 products of the stored values
summed in float32, as the dot accumulates; results differ from the dot's only in the
order of the sums.

``KernelPolicy.gemv`` chooses it: ``"reduction"`` forces it, ``"auto"`` takes it on GPUs
for products of at least :data:`MIN_MULTIPLY_ADDS` with float and int8 weights
(:data:`AUTO_KINDS`), ``"xla"`` keeps the dot.

Example::

    y = gemv.product(x, weight)                                   # x: [1, in]
    y = gemv.product(x, values, scales, kind="int4", dtype=jnp.bfloat16)
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from tunix_zoo.errors import KernelError
from tunix_zoo.kernels.policy import KernelPolicy, runs_kernel

KINDS = (None, "int8", "int4")  # None: a float weight
AUTO_KINDS = (None, "int8")
# XLA already compiles smaller one-row dots into a reduction kernel.
MIN_MULTIPLY_ADDS = 8 << 20
INT4_OFFSET = 8  # int4 stores value + 8


def takes(x: jax.Array, out_features: int, in_features: int, kind: str | None,
          policy: KernelPolicy) -> bool:
  """Whether ``policy.gemv`` computes this product as a reduction: ``x`` has one row,
  the weight is float (``kind`` None) or one of :data:`KINDS`, and, under ``"auto"``,
  the backend is a GPU, the product has at least :data:`MIN_MULTIPLY_ADDS`, its kind is
  one of :data:`AUTO_KINDS` and a forced ``quantized_matmul`` kernel does not claim it. A forced ``"reduction"`` on a kind it
  cannot compute raises KernelError.
  """
  setting = policy.gemv
  if setting == "xla" or math.prod(x.shape[:-1]) != 1:
    return False
  if setting == "auto" and (
      jax.default_backend() != "gpu" or out_features * in_features < MIN_MULTIPLY_ADDS
      or kind not in AUTO_KINDS
      or (kind is not None and policy.quantized_matmul in ("pallas", "interpret"))):
    return False
  why_not = None if kind in KINDS else (
      f"{kind} weights (it computes float, int8 and int4 ones)")
  return runs_kernel("gemv", setting, why_not)


def product(x: jax.Array, values: jax.Array, scales: jax.Array | None = None, *,
            kind: str | None = None, dtype: Any = None) -> jax.Array:
  """``x @ W.T`` as a float32 multiply and sum, in ``dtype`` (default ``x``'s).

  ``values``: the ``[out, in]`` float weight (``kind`` None), or a quantized Linear's
  stored values with its ``[out, groups]`` ``scales``: int8 ``[out, in]``, int4
  ``[out, in / 2]`` packed as :mod:`tunix_zoo.layers.quantized` packs it (in each group
  the first half of the inputs in the low nibbles, the second half in the high ones).
  """
  dtype = dtype or x.dtype
  lead, inputs = x.shape[:-1], x.shape[-1]
  x = x.reshape(-1, inputs).astype(jnp.float32)
  if kind is None:
    y = jnp.sum(x[:, None, :] * values.astype(jnp.float32)[None], -1)
    return y.astype(dtype).reshape(*lead, values.shape[0])
  out_features, groups = scales.shape
  grouped = x.reshape(x.shape[0], 1, groups, -1)  # [rows, 1, groups, group]
  if kind == "int8":
    codes = values.reshape(out_features, groups, -1).astype(jnp.float32)
    per_group = jnp.sum(grouped * codes[None], -1)
  elif kind == "int4":
    packed = values.reshape(out_features, groups, -1)
    halves = grouped.reshape(*grouped.shape[:-1], 2, packed.shape[-1])
    low, high = (packed & 15).astype(jnp.float32), (packed >> 4).astype(jnp.float32)
    # sum(x * (code - 8)) as sum(x * code) - 8 * sum(x): one subtraction per group.
    per_group = (jnp.sum(halves[..., 0, :] * low[None] + halves[..., 1, :] * high[None], -1)
                 - INT4_OFFSET * jnp.sum(grouped, -1))
  else:
    raise KernelError(f"gemv.product: {kind!r} weights are not one of {KINDS}")
  y = jnp.sum(per_group * scales.astype(jnp.float32)[None], -1)
  return y.astype(dtype).reshape(*lead, out_features)
