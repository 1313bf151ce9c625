"""Token-choice mixture of experts: a router picks ``top_k`` gated MLPs for every token.

The experts are held stacked (``gate_proj``/``up_proj`` ``[experts, expert_mlp, embed]``,
``down_proj`` ``[experts, embed, expert_mlp]``, each expert laid out as HF's Linear) and
applied without a dense ``[tokens, experts, ffn]`` tensor: the ``tokens * top_k`` copies
are sorted by expert and multiplied group by group (:func:`grouped_matmul`).
:func:`experts_dense` is the plain reference (every expert on every token).

The grouped matmul is ``jax.lax.ragged_dot``, native on TPU. XLA lowers it on CPU and
(jax 0.11) on GPU as a masked dense product over all experts, ``[rows, experts, in]``
(64 GiB for one 30B-A3B layer at 16k tokens); on Hopper GPUs the Mosaic GPU kernels of
:mod:`tunix_zoo.kernels.grouped_matmul` run instead, per device on a mesh, as the
layer's ``kernel_policy`` (``tunix_zoo.kernels.KernelPolicy``) says.

Example::

    moe = MoE(2048, 768, num_experts=128, top_k=8, act="silu", norm_topk_prob=True,
              rngs=nnx.Rngs(0))
    y, router_logits = moe(x)                      # x: [B, T, 2048]
    aux = load_balancing_loss([router_logits], num_experts=128, top_k=8)
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import AbstractMesh, Mesh

from tunix_zoo import sharding
from tunix_zoo.kernels import grouped_matmul as grouped_kernel
from tunix_zoo.kernels.policy import KernelPolicy
from tunix_zoo.layers.basic import Linear, init_value
from tunix_zoo.layers.mlp import activation

_RAGGED = jax.lax.RaggedDotDimensionNumbers(
    # lhs [tokens, in] against one expert's [out, in]: contract the last dims.
    dot_dimension_numbers=(([1], [2]), ([], [])),
    lhs_ragged_dimensions=[0],
    rhs_group_dimensions=[0],
)

# Experts.__call__ gathers expert matrices when (tokens * top_k) / experts is at most this.
GATHER_MAX_COPIES_PER_EXPERT = 0.25

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


def grouped_matmul(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array) -> jax.Array:
  """``lhs`` ``[rows, in]``, sorted into consecutive groups, times its group's ``rhs[g]``.

  ``rhs`` is ``[groups, out, in]`` (HF's Linear layout per group); ``group_sizes``
  ``[groups]`` sum to at most ``rows`` (rows past the groups come out zero). Returns
  ``[rows, out]``. XLA's ``ragged_dot``: the reference the grouped kernels are checked
  against.
  """
  return jax.lax.ragged_dot_general(lhs, rhs, group_sizes, _RAGGED)


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
    matmul: Callable[[jax.Array, jax.Array, jax.Array], jax.Array] = grouped_matmul,
) -> jax.Array:
  """The routed experts' weighted sum for ``x`` ``[tokens, embed]``, by grouped matmuls.

  ``weights`` and ``experts`` ``[tokens, k]`` come from :func:`route`. Each token is
  copied once per chosen expert, the copies are sorted by expert, and three ``matmul``
  calls (:func:`grouped_matmul` or a kernel of the same contract) run every expert on
  its contiguous group: with a grouped kernel (TPU, Hopper) work and memory grow with
  ``tokens * k``, not ``tokens * experts``.
  """
  tokens, k = experts.shape
  num_experts = gate_proj.shape[0]
  flat = experts.reshape(-1)
  order = jnp.argsort(flat, stable=True)
  group_sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
  xs = jnp.take(x, order // k, axis=0)
  h = activation(act)(matmul(xs, gate_proj, group_sizes)) * matmul(xs, up_proj, group_sizes)
  ys = matmul(h, down_proj, group_sizes)
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
      sharding_rules: sharding.Rules | None = None,
      kernel_policy: KernelPolicy | None = None,
  ):
    activation(act)  # Fail at construction, not at the first forward.
    self.act = act
    self.dtype = dtype
    self.sharding_rules = sharding_rules
    self.kernel_policy = kernel_policy or KernelPolicy()
    in_shape = (num_experts, expert_size, hidden_size)
    in_axes = ("experts", "expert_mlp", "embed")
    self.gate_proj = nnx.Param(init_value(rngs, in_shape, param_dtype), logical_axes=in_axes)
    self.up_proj = nnx.Param(init_value(rngs, in_shape, param_dtype), logical_axes=in_axes)
    self.down_proj = nnx.Param(
        init_value(rngs, (num_experts, hidden_size, expert_size), param_dtype),
        logical_axes=("experts", "embed", "expert_mlp"),
    )

  @property
  def mesh(self) -> Mesh | AbstractMesh | None:
    """The mesh the expert stacks are on (abstract inside a trace)."""
    return sharding.mesh_of(self.gate_proj.get_value())

  def _weights(self) -> tuple[jax.Array, jax.Array, jax.Array]:
    return tuple(p[...].astype(self.dtype) for p in (self.gate_proj, self.up_proj, self.down_proj))

  def __call__(self, x: jax.Array, weights: jax.Array, experts: jax.Array) -> jax.Array:
    """``[tokens, embed]`` through the chosen experts.

    :func:`experts_gathered` when the copies number at most a quarter of the experts
    (decoding a few rows), where gathering their matrices reads less than one pass over
    every expert; :func:`experts_ragged` otherwise, with the grouped kernel where the
    ``kernel_policy`` runs it.
    """
    args = (x.astype(self.dtype), weights, experts, *self._weights())
    if experts.size <= GATHER_MAX_COPIES_PER_EXPERT * self.gate_proj.shape[0]:
      return experts_gathered(*args, self.act)
    out = grouped_kernel.experts(
        functools.partial(experts_ragged, act=self.act), *args,
        setting=self.kernel_policy.moe, mesh=self.mesh, rules=self.sharding_rules,
    )
    return experts_ragged(*args, self.act) if out is None else out

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
      sharding_rules: sharding.Rules | None = None,
      kernel_policy: KernelPolicy | None = None,
  ):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.top_k = top_k
    self.norm_topk_prob = norm_topk_prob
    self.gate = Linear(hidden_size, num_experts, (None, "embed"), **kw)
    self.experts = Experts(num_experts, hidden_size, expert_size, act, **kw,
                           sharding_rules=sharding_rules, kernel_policy=kernel_policy)

  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``[..., embed]`` -> ``[..., embed]``, and the router logits ``[..., experts]``
    (for :func:`load_balancing_loss`)."""
    logits = self.gate(x)
    flat = x.reshape(-1, x.shape[-1])
    weights, experts = route(logits.reshape(flat.shape[0], -1), self.top_k, self.norm_topk_prob)
    return self.experts(flat, weights, experts).reshape(x.shape), logits


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
