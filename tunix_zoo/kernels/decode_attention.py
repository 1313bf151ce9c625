"""Attention of one new token per row over the KV cache, as one GPU kernel.

A decoding step attends from a single query per row over the whole cache buffer. XLA
runs that as three kernels per layer (QK^T, masked softmax, PV) of about 2 µs each,
which is a sixth of a 0.6B model's step at batch 1. This Pallas (Triton) kernel does
the three in one pass with an online softmax (as flash attention does), split over the
cache length so that short batches still fill the GPU; a small XLA reduction merges
the splits.

The mask is any boolean ``[B, 1, S]`` (padding, causality, sliding windows), so every
cache layout the model accepts works; only the cache length must be a multiple of
:data:`BLOCK_KEYS` (``generate`` rounds its cache up to one).

A scanned layer stack keeps one ``[B, L, S, K, H]`` cache for all its layers. Given
``layer`` (a traced int32 scalar), the kernel reads that layer's keys and values from
the stacked cache in place: each program's block spans every layer and the kernel loads
the layer number from a one-element input and indexes by it. Slicing the layer out first
(``cache[:, layer]``, a strided slice) makes XLA copy the layer's whole K and V on every
step.

:func:`attend` is what ``Attention`` calls: the kernel as the policy's
``decode_attention`` setting says (``tunix_zoo.kernels.KernelPolicy``), per device
under ``shard_map`` on a mesh, or None where XLA's path serves.

Example::

    if decode_attention.supports(q, k, interpret=True):
      out = decode_attention.decode_attention(q, k, v, mask, scale=0.125, interpret=True)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from jax.sharding import AbstractMesh, Mesh, PartitionSpec

from tunix_zoo import sharding
from tunix_zoo.kernels.policy import runs_kernel

BLOCK_KEYS = 64
# Triton's dot needs at least 16 rows: the query heads sharing a KV head are padded to it.
_MIN_ROWS = 16
# Enough programs to keep every SM of an H100 (132) busy twice over.
_TARGET_PROGRAMS = 264
_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)


def why_unsupported(
    q: jax.Array,
    k: jax.Array,
    mesh: Mesh | AbstractMesh | None = None,
    rules: sharding.Rules | None = None,
    *,
    interpret: bool = False,
) -> str | None:
  """Why :func:`decode_attention` cannot serve queries ``q`` ``[B, T, N, H]`` over the
  cache keys ``k`` ``[B, S, K, H]`` (or a layer stack's ``[B, L, S, K, H]``) on ``mesh``;
  None when it can. ``interpret``: in Pallas's interpreter, which runs anywhere; the
  compiled kernel needs a GPU."""
  k = _one_layer(k)
  if q.shape[1] != 1:
    return f"{q.shape[1]} query tokens per row (the kernel serves one, a decode step)"
  if k.shape[1] % BLOCK_KEYS:
    return f"a cache of {k.shape[1]} slots, not a multiple of {BLOCK_KEYS}"
  head_dim = q.shape[-1]
  if head_dim < 16 or head_dim & (head_dim - 1):  # Triton tiles are powers of two.
    return f"head size {head_dim} (Triton needs a power of two of at least 16)"
  if not interpret and jax.default_backend() != "gpu":
    return f"the {jax.default_backend()} backend (the compiled kernel needs a GPU)"
  if mesh is not None and mesh.size > 1:
    q_spec, kv_spec = _specs(q, k, mesh, rules)
    if q_spec[2] != kv_spec[2]:
      # A query head would need another device's KV head.
      return f"query heads split over {q_spec[2]} but KV heads over {kv_spec[2]}"
  return None


def supports(
    q: jax.Array,
    k: jax.Array,
    mesh: Mesh | AbstractMesh | None = None,
    rules: sharding.Rules | None = None,
    *,
    interpret: bool = False,
) -> bool:
  """Whether :func:`decode_attention` serves these shapes (see :func:`why_unsupported`)."""
  return why_unsupported(q, k, mesh, rules, interpret=interpret) is None


def _one_layer(k: jax.Array) -> jax.ShapeDtypeStruct | jax.Array:
  """The shape of one layer's ``[B, S, K, H]`` keys of a stacked ``[B, L, S, K, H]`` cache."""
  if k.ndim == 5:
    return jax.ShapeDtypeStruct(k.shape[:1] + k.shape[2:], k.dtype)
  return k


def _specs(q, k, mesh, rules) -> tuple[PartitionSpec, PartitionSpec]:
  """``q``'s and the cache's partition specs; a stacked cache's layer axis is unsplit."""
  q_spec = sharding.partition_spec(("batch", None, "heads", None), q.shape, mesh, rules)
  kv_spec = sharding.partition_spec(("batch", None, "kv_heads", None), _one_layer(k).shape,
                                    mesh, rules)
  if k.ndim == 5:
    kv_spec = PartitionSpec(kv_spec[0], None, *kv_spec[1:])
  return q_spec, kv_spec


def attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array,
    scale: float,
    softcap: float | None,
    *,
    setting: str,
    mesh: Mesh | AbstractMesh | None,
    rules: sharding.Rules | None = None,
    layer: jax.Array | int | None = None,
) -> jax.Array | None:
  """:func:`decode_attention` where the policy's ``setting`` runs it (per device under
  ``shard_map`` on a mesh of several devices); None where XLA's path should serve.

  With ``layer``, ``k`` and ``v`` are a layer stack's ``[B, L, S, K, H]`` caches and the
  kernel reads layer ``layer`` of them in place (a caller taking None slices the layer
  out for XLA's path). Only one-token calls are the kernel's; for them ``"auto"`` takes
  it on GPUs for 16-bit floats, and a forced ``"pallas"`` / ``"interpret"`` that cannot
  serve raises KernelError.
  """
  if q.shape[1] != 1:
    return None
  interpret = setting == "interpret"
  why_not = why_unsupported(q, k, mesh, rules, interpret=interpret)
  if not runs_kernel("decode_attention", setting, why_not,
                     preferred=q.dtype in (jnp.bfloat16, jnp.float16)):
    return None

  def kernel(q, k, v, mask, layer=None):
    return decode_attention(q, k, v, mask, scale, softcap, layer=layer, interpret=interpret)

  operands = (q, k, v, mask) + (() if layer is None else (jnp.asarray(layer, jnp.int32),))
  if mesh is None or mesh.size == 1:
    return kernel(*operands)
  q_spec, kv_spec = _specs(q, k, mesh, rules)
  in_specs = (q_spec, kv_spec, kv_spec, PartitionSpec(q_spec[0], None, None))
  context = jax.sharding.get_abstract_mesh()
  return jax.shard_map(
      kernel,
      mesh=mesh if context.empty else context,
      in_specs=in_specs + ((PartitionSpec(),) if layer is not None else ()),
      out_specs=q_spec,
      check_vma=False,
  )(*operands)


def _splits(programs: int, blocks: int) -> int:
  """The most cache splits up to the target program count, dividing the blocks evenly."""
  wanted = max(1, -(-_TARGET_PROGRAMS // programs))
  return max(d for d in range(1, min(wanted, blocks) + 1) if blocks % d == 0)


def _kernel(*refs, scale, softcap, block_keys, stacked):
  """One (row, KV head, cache split): unnormalised output, running max and sum.

  ``stacked``: the cache blocks are ``[L, keys, H]``, every layer of a stack, and a
  leading one-element input holds the layer to read; else they are ``[keys, H]``."""
  if stacked:
    layer_ref, *refs = refs
    layer = (layer_ref[0],)
  else:
    layer = ()
  q_ref, k_ref, v_ref, mask_ref, length_ref, o_ref, max_ref, sum_ref = refs
  keys, head_dim = k_ref.shape[-2:]
  q = q_ref[...]
  rows = q.shape[0]

  def block(i, carry):
    out, running_max, running_sum = carry
    keys_here = pl.ds(pl.multiple_of(i * block_keys, block_keys), block_keys)
    scores = plgpu.dot(q, k_ref[(*layer, keys_here, slice(None))].astype(q.dtype),
                       trans_b=True).astype(jnp.float32) * scale
    if softcap is not None:
      scores = jnp.tanh(scores / softcap) * softcap
    allowed = (mask_ref[keys_here] != 0)[None, :]
    scores = jnp.where(allowed, scores, _MASKED)
    new_max = jnp.maximum(running_max, scores.max(axis=1))
    # Masked keys weigh exactly zero, also in a split where every key is masked.
    weights = jnp.where(allowed, jnp.exp(scores - new_max[:, None]), 0.0)
    correction = jnp.exp(running_max - new_max)
    running_sum = running_sum * correction + weights.sum(axis=1)
    values = v_ref[(*layer, keys_here, slice(None))].astype(q.dtype)
    out = out * correction[:, None] + plgpu.dot(
        weights.astype(values.dtype), values
    ).astype(jnp.float32)
    return out, new_max, running_sum

  init = (
      jnp.zeros((rows, head_dim), jnp.float32),
      jnp.full((rows,), _MASKED, jnp.float32),
      jnp.zeros((rows,), jnp.float32),
  )
  # Blocks after the row's last visible key are never read: a decoding step reads the cache
  # only up to its position (a quarter less of the cache than a whole-buffer pass over a
  # rollout's 512 + 512 tokens on average).
  visible = length_ref[...] - pl.program_id(2) * keys
  blocks = jnp.clip((visible + block_keys - 1) // block_keys, 0, keys // block_keys)
  out, running_max, running_sum = jax.lax.fori_loop(0, blocks, block, init)
  o_ref[...] = out
  max_ref[...] = running_max
  sum_ref[...] = running_sum


def decode_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array,
    scale: float,
    softcap: float | None = None,
    *,
    layer: jax.Array | int | None = None,
    block_keys: int = BLOCK_KEYS,
    num_warps: int = 4,
    num_stages: int = 2,
    interpret: bool = False,
) -> jax.Array:
  """Attention of ``q`` ``[B, 1, N, H]`` over ``k, v`` ``[B, S, K, H]`` where ``mask``
  ``[B, 1, S]`` allows; ``N % K == 0`` (grouped-query). Returns ``[B, 1, N, H]``.

  With ``layer`` (an int32 scalar, traced or not), ``k`` and ``v`` are a layer stack's
  ``[B, L, S, K, H]`` caches and layer ``layer`` of them is read in place, without
  slicing it out. Scores and softmax are float32, the products in ``q``'s dtype (cache
  blocks are converted as they load); ``softcap`` caps the scores as ``tanh(s/c) * c``.
  Rows whose keys are all masked give zeros. ``block_keys`` (dividing ``S``),
  ``num_warps`` and ``num_stages`` tune the kernel; ``interpret`` runs it in Pallas's
  interpreter (any device, slowly).
  """
  batch, _, num_heads, head_dim = q.shape
  dtype = q.dtype
  stacked = layer is not None
  cache_len, num_kv_heads = k.shape[-3], k.shape[-2]
  groups = num_heads // num_kv_heads
  rows = max(_MIN_ROWS, 1 << (groups - 1).bit_length())
  splits = _splits(batch * num_kv_heads, cache_len // block_keys)
  keys_per_split = cache_len // splits
  q = q.reshape(batch, num_kv_heads, groups, head_dim)
  q = jnp.pad(q, ((0, 0), (0, 0), (0, rows - groups), (0, 0)))
  mask = mask.reshape(batch, cache_len).astype(jnp.int32)
  # Per row, one past its last visible key.
  lengths = jnp.max(mask * jnp.arange(1, cache_len + 1, dtype=jnp.int32), axis=1)
  kernel = functools.partial(_kernel, scale=scale, softcap=softcap, block_keys=block_keys,
                             stacked=stacked)
  if stacked:
    # Every layer in the block; the kernel picks one by the number it loads.
    layers = k.shape[1]
    cache_block = pl.BlockSpec((None, layers, keys_per_split, None, head_dim),
                               lambda b, h, s: (b, 0, s, h, 0))
    layer_inputs = [jnp.asarray(layer, jnp.int32).reshape(1)]
    layer_specs = [pl.BlockSpec((1,), lambda b, h, s: (0,))]
  else:
    cache_block = pl.BlockSpec((None, keys_per_split, None, head_dim),
                               lambda b, h, s: (b, s, h, 0))
    layer_inputs, layer_specs = [], []
  out, split_max, split_sum = pl.pallas_call(
      kernel,
      grid=(batch, num_kv_heads, splits),
      in_specs=layer_specs + [
          pl.BlockSpec((None, None, rows, head_dim), lambda b, h, s: (b, h, 0, 0)),
          cache_block,
          cache_block,
          pl.BlockSpec((None, keys_per_split), lambda b, h, s: (b, s)),
          pl.BlockSpec((None,), lambda b, h, s: (b,)),
      ],
      out_specs=[
          pl.BlockSpec((None, None, None, rows, head_dim), lambda b, h, s: (b, h, s, 0, 0)),
          pl.BlockSpec((None, None, None, rows), lambda b, h, s: (b, h, s, 0)),
          pl.BlockSpec((None, None, None, rows), lambda b, h, s: (b, h, s, 0)),
      ],
      out_shape=[
          jax.ShapeDtypeStruct((batch, num_kv_heads, splits, rows, head_dim), jnp.float32),
          jax.ShapeDtypeStruct((batch, num_kv_heads, splits, rows), jnp.float32),
          jax.ShapeDtypeStruct((batch, num_kv_heads, splits, rows), jnp.float32),
      ],
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret,
      name="decode_attention",
  )(*layer_inputs, q, k, v, mask, lengths)
  # Merge the splits' partial softmaxes.
  weight = jnp.exp(split_max - split_max.max(axis=2, keepdims=True))
  total = (split_sum * weight).sum(axis=2)
  out = (out * weight[..., None]).sum(axis=2) / jnp.where(total == 0, 1.0, total)[..., None]
  return out[:, :, :groups].reshape(batch, 1, num_heads, head_dim).astype(dtype)
