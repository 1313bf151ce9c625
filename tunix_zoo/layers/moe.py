"""Token-choice mixture of experts: a router picks ``top_k`` gated MLPs for every token.

The experts are held stacked (``gate_proj``/``up_proj`` ``[experts, expert_mlp, embed]``,
``down_proj`` ``[experts, embed, expert_mlp]``, each expert laid out as HF's Linear) and
applied without a dense ``[tokens, experts, ffn]`` tensor: the ``tokens * top_k`` copies
are sorted by expert and multiplied group by group (:func:`grouped_matmul`).
:func:`experts_dense` is the plain reference (every expert on every token).

The grouped matmul is ``jax.lax.ragged_dot``, native on TPU. XLA lowers it on CPU and
(jax 0.11) on GPU as a masked dense product over all experts, ``[rows, experts, in]``
(64 GiB for one 30B-A3B layer at 16k tokens); on a single Hopper GPU the Mosaic GPU
grouped-matmul kernels of ``jax.experimental.pallas`` run instead (forward and gradients).

Example::

    moe = MoE(2048, 768, num_experts=128, top_k=8, act="silu", norm_topk_prob=True,
              rngs=nnx.Rngs(0))
    with collect_router_logits() as router_logits:
      y = moe(x)                                   # x: [B, T, 2048]
    aux = load_balancing_loss(router_logits, num_experts=128, top_k=8)
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from tunix_zoo.layers.basic import Linear, init_value
from tunix_zoo.layers.mlp import activation

_RAGGED = jax.lax.RaggedDotDimensionNumbers(
    # lhs [tokens, in] against one expert's [out, in]: contract the last dims.
    dot_dimension_numbers=(([1], [2]), ([], [])),
    lhs_ragged_dimensions=[0],
    rhs_group_dimensions=[0],
)

# Mosaic GPU tile sizes (block_m, block_n, block_k, max_concurrent_steps): the fastest of
# a sweep on an H100 at 30B-A3B shapes (413 TFLOP/s forward, 449 for the weights' gradient).
_MOSAIC_TILES = (128, 128, 64, 6)
_MOSAIC_TRANSPOSED_TILES = (128, 128, 64, 4)

# Experts.__call__ gathers expert matrices when (tokens * top_k) / experts is at most this.
GATHER_MAX_COPIES_PER_EXPERT = 0.25

_collector: contextvars.ContextVar[list[jax.Array] | None] = contextvars.ContextVar(
    "tunix_zoo_router_logits", default=None
)


@contextlib.contextmanager
def collect_router_logits() -> Iterator[list[jax.Array]]:
  """Collects the router logits ``[..., experts]`` of every MoE call made in the block.

  The list fills in call order (layer order for a decoder). The logits belong to the
  trace they were computed in: use them inside the same jitted or differentiated
  function, e.g. for :func:`load_balancing_loss`.

  Example::

    with collect_router_logits() as router_logits:
      y = moe(x)
    router_logits[0].shape  # x.shape[:-1] + (num_experts,)
  """
  logits: list[jax.Array] = []
  token = _collector.set(logits)
  try:
    yield logits
  finally:
    _collector.reset(token)


def record_router_logits(logits: jax.Array) -> None:
  """Hands ``logits`` to the innermost :func:`collect_router_logits` block, if any.

  A transform that traces MoE layers in an inner trace (``nnx.remat``) collects their
  logits there, returns them, and records them again outside.
  """
  collector = _collector.get()
  if collector is not None:
    collector.append(logits)


def route(
    router_logits: jax.Array, top_k: int, norm_topk_prob: bool
) -> tuple[jax.Array, jax.Array]:
  """Top-k routing of ``[tokens, experts]`` logits: float32 weights and expert ids ``[tokens, k]``.

  As transformers' Qwen3-MoE: softmax over all experts in float32, the ``top_k`` largest
  probabilities, renormalised to sum to one when ``norm_topk_prob``.
  """
  probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)
  weights, experts = jax.lax.top_k(probs, top_k)
  if norm_topk_prob:
    weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
  return weights, experts


def grouped_matmul_kernel(dtype: Any, weight_shape: tuple[int, ...]) -> str:
  """Which kernel :func:`grouped_matmul` runs: ``"mosaic_gpu"`` or ``"ragged_dot"``.

  Mosaic GPU needs one Hopper GPU in the process (the kernel is a custom call the SPMD
  partitioner cannot split), 16-bit floats, and expert matrices tiling by 128.
  """
  devices = jax.devices()
  usable = (
      len(devices) == 1
      and devices[0].platform == "gpu"
      and getattr(devices[0], "compute_capability", "") == "9.0"
      and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
      and all(d % 128 == 0 for d in weight_shape[1:])
  )
  return "mosaic_gpu" if usable else "ragged_dot"


def grouped_matmul(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array) -> jax.Array:
  """``lhs`` ``[rows, in]``, sorted into consecutive groups, times its group's ``rhs[g]``.

  ``rhs`` is ``[groups, out, in]`` (HF's Linear layout per group); ``group_sizes``
  ``[groups]`` sum to at most ``rows`` (rows past the groups come out zero). Returns
  ``[rows, out]``.
  """
  if grouped_matmul_kernel(lhs.dtype, rhs.shape) == "mosaic_gpu" and lhs.dtype == rhs.dtype:
    return _mosaic_grouped_matmul(lhs, rhs, group_sizes.astype(jnp.int32))
  return jax.lax.ragged_dot_general(lhs, rhs, group_sizes, _RAGGED)


def _mosaic_ragged_dot(lhs, rhs, group_sizes, transpose_rhs: bool):
  from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu

  block_m, block_n, block_k, steps = _MOSAIC_TILES
  n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  # Output tiles are walked in bands of grid_block_n columns: the widest band dividing n.
  band = next(b for b in (4, 2, 1) if (n // block_n) % b == 0)
  return ragged_dot_mgpu.ragged_dot(
      lhs, rhs, group_sizes=group_sizes, block_m=block_m, block_n=block_n, block_k=block_k,
      max_concurrent_steps=steps, grid_block_n=band, transpose_rhs=transpose_rhs,
  )


@jax.custom_vjp
def _mosaic_grouped_matmul(lhs, rhs, group_sizes):
  return _mosaic_ragged_dot(lhs, rhs, group_sizes, transpose_rhs=True)


def _mosaic_grouped_matmul_fwd(lhs, rhs, group_sizes):
  return _mosaic_grouped_matmul(lhs, rhs, group_sizes), (lhs, rhs, group_sizes)


def _mosaic_grouped_matmul_bwd(residuals, grad):
  from jax.experimental.pallas.ops.gpu import transposed_ragged_dot_mgpu

  lhs, rhs, group_sizes = residuals
  # d lhs = grad [rows, out] times each group's rhs [out, in].
  d_lhs = _mosaic_ragged_dot(grad.astype(lhs.dtype), rhs, group_sizes, transpose_rhs=False)
  # d rhs[g] = grad[rows of g].T @ lhs[rows of g]: contraction over the ragged rows.
  block_m, block_n, block_k, steps = _MOSAIC_TRANSPOSED_TILES
  d_rhs = transposed_ragged_dot_mgpu.transposed_ragged_dot(
      grad.astype(lhs.dtype), lhs, group_sizes=group_sizes, block_m=block_m, block_n=block_n,
      block_k=block_k, max_concurrent_steps=steps, grid_block_n=1,
  )
  return d_lhs, d_rhs, None


_mosaic_grouped_matmul.defvjp(_mosaic_grouped_matmul_fwd, _mosaic_grouped_matmul_bwd)


def _combine(outputs: jax.Array, weights: jax.Array) -> jax.Array:
  """``sum_k weights[n, k] * outputs[n, k]`` in float32, cast back to the outputs' dtype."""
  return jnp.einsum(
      "nkh,nk->nh", outputs, weights.astype(outputs.dtype), preferred_element_type=jnp.float32
  ).astype(outputs.dtype)


def experts_ragged(
    x: jax.Array,
    weights: jax.Array,
    experts: jax.Array,
    gate_proj: jax.Array,
    up_proj: jax.Array,
    down_proj: jax.Array,
    act: str,
) -> jax.Array:
  """The routed experts' weighted sum for ``x`` ``[tokens, embed]``, by grouped matmuls.

  ``weights`` and ``experts`` ``[tokens, k]`` come from :func:`route`. Each token is
  copied once per chosen expert, the copies are sorted by expert, and three
  :func:`grouped_matmul` calls run every expert on its contiguous group: with a grouped
  kernel (TPU, Hopper) work and memory grow with ``tokens * k``, not ``tokens * experts``.
  """
  tokens, k = experts.shape
  num_experts = gate_proj.shape[0]
  flat = experts.reshape(-1)
  order = jnp.argsort(flat, stable=True)
  group_sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
  xs = jnp.take(x, order // k, axis=0)
  h = activation(act)(grouped_matmul(xs, gate_proj, group_sizes)) * grouped_matmul(
      xs, up_proj, group_sizes
  )
  ys = grouped_matmul(h, down_proj, group_sizes)
  # Back to token order: a scatter of int32 positions, then one gather of the outputs.
  unsort = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))
  return _combine(jnp.take(ys, unsort, axis=0).reshape(tokens, k, -1), weights)


def experts_gathered(
    x: jax.Array,
    weights: jax.Array,
    experts: jax.Array,
    gate_proj: jax.Array,
    up_proj: jax.Array,
    down_proj: jax.Array,
    act: str,
) -> jax.Array:
  """:func:`experts_ragged` for a few tokens: each copy gathers its expert's matrices.

  Reads ``tokens * k`` experts' weights instead of all of them, which is what decoding a
  small batch needs; memory grows as ``tokens * k`` expert MLPs.
  """
  gate, up, down = (jnp.take(w, experts, axis=0) for w in (gate_proj, up_proj, down_proj))
  h = activation(act)(jnp.einsum("nh,nkih->nki", x, gate)) * jnp.einsum("nh,nkih->nki", x, up)
  return _combine(jnp.einsum("nki,nkhi->nkh", h, down), weights)


def experts_dense(
    x: jax.Array,
    weights: jax.Array,
    experts: jax.Array,
    gate_proj: jax.Array,
    up_proj: jax.Array,
    down_proj: jax.Array,
    act: str,
) -> jax.Array:
  """Reference for :func:`experts_ragged`: every expert on every token, masked combine.

  Materialises ``[tokens, experts, expert_mlp]``: for tests and tiny models only.
  """
  num_experts = gate_proj.shape[0]
  h = activation(act)(jnp.einsum("nh,eih->nei", x, gate_proj)) * jnp.einsum(
      "nh,eih->nei", x, up_proj
  )
  ys = jnp.einsum("nei,ehi->neh", h, down_proj)
  # [tokens, experts]: a token's weight for each expert it chose, zero elsewhere.
  combine = jnp.sum(jax.nn.one_hot(experts, num_experts) * weights[..., None], axis=1)
  return _combine(ys, combine)


class Experts(nnx.Module):
  """``num_experts`` stacked SwiGLU MLPs, each laid out as HF's ``gate/up/down_proj``."""

  def __init__(
      self,
      num_experts: int,
      hidden_size: int,
      expert_size: int,
      act: str,
      *,
      rngs: nnx.Rngs | None,
      dtype: Any = jnp.float32,
      param_dtype: Any = jnp.float32,
  ):
    activation(act)  # Fail at construction, not at the first forward.
    self.act = act
    self.dtype = dtype
    in_shape = (num_experts, expert_size, hidden_size)
    in_axes = ("experts", "expert_mlp", "embed")
    self.gate_proj = nnx.Param(init_value(rngs, in_shape, param_dtype), logical_axes=in_axes)
    self.up_proj = nnx.Param(init_value(rngs, in_shape, param_dtype), logical_axes=in_axes)
    self.down_proj = nnx.Param(
        init_value(rngs, (num_experts, hidden_size, expert_size), param_dtype),
        logical_axes=("experts", "embed", "expert_mlp"),
    )

  def _weights(self) -> tuple[jax.Array, jax.Array, jax.Array]:
    return tuple(p[...].astype(self.dtype) for p in (self.gate_proj, self.up_proj, self.down_proj))

  def __call__(self, x: jax.Array, weights: jax.Array, experts: jax.Array) -> jax.Array:
    """``[tokens, embed]`` through the chosen experts.

    :func:`experts_gathered` when the copies number at most a quarter of the experts
    (decoding a few rows), where gathering their matrices reads less than one pass over
    every expert; :func:`experts_ragged` otherwise.
    """
    gathered = experts.size <= GATHER_MAX_COPIES_PER_EXPERT * self.gate_proj.shape[0]
    fn = experts_gathered if gathered else experts_ragged
    return fn(x.astype(self.dtype), weights, experts, *self._weights(), self.act)

  def dense(self, x: jax.Array, weights: jax.Array, experts: jax.Array) -> jax.Array:
    """The same through :func:`experts_dense`, to cross-check the grouped path."""
    return experts_dense(x.astype(self.dtype), weights, experts, *self._weights(), self.act)


class MoE(nnx.Module):
  """A router (``gate``, HF's ``mlp.gate``) and its :class:`Experts` (``mlp.experts``)."""

  def __init__(
      self,
      hidden_size: int,
      expert_size: int,
      *,
      num_experts: int,
      top_k: int,
      act: str,
      norm_topk_prob: bool,
      rngs: nnx.Rngs | None,
      dtype: Any = jnp.float32,
      param_dtype: Any = jnp.float32,
  ):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.top_k = top_k
    self.norm_topk_prob = norm_topk_prob
    self.gate = Linear(hidden_size, num_experts, (None, "embed"), **kw)
    self.experts = Experts(num_experts, hidden_size, expert_size, act, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    """``[..., embed]`` -> ``[..., embed]``; logits go to :func:`collect_router_logits`."""
    logits = self.gate(x)
    record_router_logits(logits)
    flat = x.reshape(-1, x.shape[-1])
    weights, experts = route(logits.reshape(flat.shape[0], -1), self.top_k, self.norm_topk_prob)
    return self.experts(flat, weights, experts).reshape(x.shape)


def load_balancing_loss(
    router_logits: Sequence[jax.Array],
    num_experts: int,
    top_k: int,
    attention_mask: jax.Array | None = None,
) -> jax.Array:
  """Switch Transformer's auxiliary loss, as transformers' ``load_balancing_loss_func``.

  ``router_logits`` are the logits of every MoE layer (``[B, T, experts]`` or
  ``[B * T, experts]``); ``attention_mask`` ``[B, T]`` leaves padding out. The result is
  ``num_experts * sum_e fraction_routed_e * mean_probability_e`` over all layers' tokens;
  a model's loss adds ``router_aux_loss_coef`` times it.

  Example::

    logits, _, router_logits = model.forward_with_router_logits(tokens, attention_mask=mask)
    aux = load_balancing_loss(router_logits, cfg.num_experts, cfg.num_experts_per_tok, mask)
  """
  routed = jnp.zeros((num_experts,), jnp.float32)
  prob_sum = jnp.zeros((num_experts,), jnp.float32)
  rows = jnp.zeros((), jnp.float32)
  for logits in router_logits:
    probs = jax.nn.softmax(logits.reshape(-1, num_experts).astype(jnp.float32), axis=-1)
    _, chosen = jax.lax.top_k(probs, top_k)
    counts = jnp.sum(jax.nn.one_hot(chosen, num_experts, dtype=jnp.float32), axis=1)
    if attention_mask is None:
      mask = jnp.ones((probs.shape[0],), jnp.float32)
    else:
      mask = attention_mask.reshape(-1).astype(jnp.float32)
    routed += jnp.sum(counts * mask[:, None], axis=0)
    prob_sum += jnp.sum(probs * mask[:, None], axis=0)
    rows += jnp.sum(mask)
  return num_experts * jnp.sum((routed / rows) * (prob_sum / rows))
