"""The mixture-of-experts layer on its own: routing, the expert paths against the dense
reference (outputs and gradients), router logits as outputs, the load-balancing loss
against transformers' function, and the kernel policy's dispatch."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.reference import tiny_moe_config
from tunix_zoo.automodel import AutoModel
from tunix_zoo.errors import KernelError
from tunix_zoo.kernels import KernelPolicy
from tunix_zoo.layers.moe import (
    MoE,
    experts_dense,
    experts_gathered,
    experts_ragged,
    load_balancing_loss,
    route,
)


def small_moe(**kw) -> MoE:
  return MoE(32, 16, num_experts=16, top_k=3, act="silu", norm_topk_prob=True,
             rngs=nnx.Rngs(0), **kw)


# Jitted: one compiled program is faster than the layer's ops compiled one by one.
call = nnx.jit(lambda layer, x: layer(x))


def test_route_takes_the_top_k_of_the_softmax_and_renormalises():
  logits = jnp.log(jnp.array([[0.1, 0.5, 0.15, 0.25]]))
  weights, experts = route(logits, top_k=2, norm_topk_prob=False)
  np.testing.assert_array_equal(experts, [[1, 3]])
  np.testing.assert_allclose(weights, [[0.5, 0.25]], rtol=1e-6)
  weights, _ = route(logits, top_k=2, norm_topk_prob=True)
  np.testing.assert_allclose(weights, [[2 / 3, 1 / 3]], rtol=1e-6)


def test_load_balancing_loss_equals_transformers_function():
  import torch
  from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

  rng = np.random.RandomState(0)
  logits = [rng.randn(3 * 7, 10).astype(np.float32) for _ in range(3)]
  mask = (rng.rand(3, 7) > 0.3).astype(np.int64)
  for attention_mask in (None, mask):
    expected = load_balancing_loss_func(
        tuple(torch.tensor(x) for x in logits), 10, 4,
        None if attention_mask is None else torch.tensor(attention_mask),
    )
    ours = load_balancing_loss(
        [jnp.asarray(x).reshape(3, 7, 10) for x in logits], 10, 4,
        None if attention_mask is None else jnp.asarray(attention_mask),
    )
    np.testing.assert_allclose(float(ours), float(expected), rtol=1e-6)


def _expert_problem(dtype):
  """Tokens, routing and expert stacks where a few experts take most tokens, several none."""
  num_experts, top_k, hidden, ffn, tokens = 12, 3, 32, 16, 10
  keys = jax.random.split(jax.random.key(0), 5)
  x = jax.random.normal(keys[0], (tokens, hidden), dtype)
  gate, up = (0.3 * jax.random.normal(k, (num_experts, ffn, hidden), dtype) for k in keys[1:3])
  down = 0.3 * jax.random.normal(keys[3], (num_experts, hidden, ffn), dtype)
  bias = jnp.linspace(3.0, -3.0, num_experts)
  weights, experts = route(jax.random.normal(keys[4], (tokens, num_experts)) + bias, top_k,
                           norm_topk_prob=False)
  return (x, weights, gate, up, down), experts


def _squared_sum(fn, experts, x, weights, gate, up, down):
  return jnp.sum(fn(x, weights, experts, gate, up, down, "silu").astype(jnp.float32) ** 2)


def _output_and_grads(fn, experts, x, weights, gate, up, down):
  """``fn``'s output and the gradients of its squared sum, as one compiled program."""

  def both(*args):
    x, weights, gate, up, down = args
    grads = jax.grad(functools.partial(_squared_sum, fn, experts), argnums=range(5))(*args)
    return fn(x, weights, experts, gate, up, down, "silu"), grads

  return jax.jit(both)(x, weights, gate, up, down)


@functools.cache
def _dense_reference(dtype):
  """experts_dense's output and gradients for ``dtype``: both grouped paths compare with
  them, so they are computed (and compiled) once."""
  args, experts = _expert_problem(dtype)
  return _output_and_grads(experts_dense, experts, *args)


@pytest.mark.parametrize("experts_fn", [experts_ragged, experts_gathered], ids=lambda f: f.__name__)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_grouped_experts_equal_dense_reference(dtype, experts_fn):
  """Outputs and gradients, with some experts chosen by no token."""
  args, experts = _expert_problem(dtype)
  assert len(np.unique(np.asarray(experts))) < args[2].shape[0]

  def assert_close(ours: jax.Array, reference: jax.Array) -> None:
    ours, reference = np.asarray(ours, np.float32), np.asarray(reference, np.float32)
    # bfloat16 keeps 8 bits: compare against the scale of the values.
    tolerance = 1e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(ours, reference, atol=tolerance * np.abs(reference).max())

  dense_out, dense_grads = _dense_reference(dtype)
  ours, grads = _output_and_grads(experts_fn, experts, *args)
  assert ours.dtype == dtype
  assert_close(ours, dense_out)
  for grad, grad_dense in zip(grads, dense_grads, strict=True):
    assert_close(grad, grad_dense)


def test_moe_module_routes_as_the_dense_path_and_returns_its_router_logits():
  moe = small_moe()
  x = jax.random.normal(jax.random.key(1), (2, 10, 32))
  y, router_logits = call(moe, x)
  gate_logits = call(moe.gate, x)
  np.testing.assert_allclose(router_logits, gate_logits, atol=1e-6)
  assert router_logits.shape == (2, 10, 16)

  @nnx.jit
  def dense(moe, x):
    weights, experts = route(moe.gate(x).reshape(20, 16), top_k=3, norm_topk_prob=True)
    return moe.experts.dense(x.reshape(20, 32), weights, experts).reshape(x.shape)

  np.testing.assert_allclose(np.asarray(y), np.asarray(dense(moe, x)), atol=1e-6)


def test_a_forced_grouped_kernel_refuses_experts_it_cannot_run():
  """On this CPU the Mosaic GPU kernels cannot run: "mosaic_gpu" raises where the grouped
  path would take them, "auto" and "xla" give XLA's result; a one-token call gathers its
  experts and takes no grouped matmul at all."""
  x = jax.random.normal(jax.random.key(1), (2, 10, 32))
  expected, _ = call(small_moe(), x)
  for setting in ("auto", "xla"):
    got, _ = call(small_moe(kernel_policy=KernelPolicy(moe=setting)), x)
    np.testing.assert_array_equal(got, expected)
  forced = small_moe(kernel_policy=KernelPolicy(moe="mosaic_gpu"))
  with pytest.raises(KernelError, match="moe='mosaic_gpu'.*float32 experts"):
    call(forced, x)
  one_token = x[:1, :1]
  np.testing.assert_array_equal(call(forced, one_token)[0], call(small_moe(), one_token)[0])


# Module-level: the remat="none" program compiles once for both parametrizations.
_forward_with_router_logits = nnx.jit(lambda m, t: m.forward_with_router_logits(t))


@pytest.fixture(scope="module")
def tiny_moe_model():
  return AutoModel.from_config(tiny_moe_config(), rngs=0)


@pytest.mark.parametrize("remat", ["layer", "attention"])
def test_router_logits_leave_remat_as_outputs(tiny_moe_model, remat):
  model = tiny_moe_model
  tokens = jnp.arange(3, 15).reshape(2, 6)
  forward = _forward_with_router_logits
  model.remat = "none"
  logits, _, router_logits = forward(model, tokens)
  model.remat = remat
  try:
    remat_logits, _, remat_router_logits = forward(model, tokens)
  finally:
    model.remat = "none"
  assert len(router_logits) == len(remat_router_logits) == model.config.num_layers
  np.testing.assert_allclose(remat_logits, logits, atol=1e-6)
  for ours, plain in zip(remat_router_logits, router_logits, strict=True):
    assert ours.shape == (2, 6, model.config.num_experts)
    np.testing.assert_allclose(ours, plain, atol=1e-6)
