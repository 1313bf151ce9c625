"""The MoE grouped matmul kernels: what they say they can run, the per-device split under
shard_map (checked on the CPU mesh with XLA's ragged_dot inside, forward and gradients),
and, on Hopper GPUs, the Mosaic GPU kernels against ragged_dot."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from tunix_zoo.errors import KernelError
from tunix_zoo.kernels import grouped_matmul as kernel
from tunix_zoo.layers import moe

HOPPER = kernel.supports(jnp.bfloat16, (8, 128, 256))


def assert_close(ours, reference, tolerance: float) -> None:
  ours, reference = np.asarray(ours, np.float32), np.asarray(reference, np.float32)
  np.testing.assert_allclose(ours, reference, atol=tolerance * np.abs(reference).max())


def test_why_unsupported_names_the_dtype_the_tiling_and_the_device():
  assert "float32 experts" in kernel.why_unsupported(jnp.float32, (8, 128, 256))
  assert "(96, 256) per device (not tiling by 128)" in kernel.why_unsupported(
      jnp.bfloat16, (8, 96, 256))
  cpu = jax.devices("cpu")[0]
  assert "need a Hopper GPU" in kernel.why_unsupported(jnp.bfloat16, (8, 128, 256), cpu)
  assert not kernel.supports(jnp.bfloat16, (8, 128, 256), cpu)


def random_experts(dtype, tokens=24, num_experts=8, top_k=2, hidden=32, width=16, seed=0):
  keys = jax.random.split(jax.random.key(seed), 5)
  x = jax.random.normal(keys[0], (tokens, hidden), dtype)
  gate, up = (0.3 * jax.random.normal(k, (num_experts, width, hidden), dtype) for k in keys[1:3])
  down = 0.3 * jax.random.normal(keys[3], (num_experts, hidden, width), dtype)
  weights, chosen = moe.route(jax.random.normal(keys[4], (tokens, num_experts)), top_k, True)
  return x, weights, chosen, gate, up, down


@pytest.fixture(scope="module")
def mesh():
  return jax.make_mesh((2, 4), ("fsdp", "tp"), axis_types=(AxisType.Auto,) * 2)


def test_a_forced_kernel_is_refused_for_its_per_device_share(mesh):
  """tp=4 leaves each device 64 of the 256 columns of every expert: not a whole tile."""
  x, weights, chosen, gate, up, down = (
      a.astype(jnp.bfloat16) if a.dtype == jnp.float32 else a
      for a in random_experts(jnp.float32, hidden=128, width=256))
  args = (functools.partial(moe.experts_ragged, act="silu"), x, weights, chosen, gate, up, down)
  with pytest.raises(KernelError, match=r"\(64, 128\) per device"):
    kernel.experts(*args, setting="mosaic_gpu", mesh=mesh)
  assert kernel.experts(*args, setting="auto", mesh=mesh) is None
  assert kernel.experts(*args, setting="xla", mesh=None) is None


def test_per_device_split_equals_one_program_forward_and_gradients(mesh):
  """Tokens over fsdp, each expert's width over tp, summed back: with XLA's ragged_dot per
  device it must give what one program over the whole arrays gives."""
  x, weights, chosen, gate, up, down = random_experts(jnp.float32)
  def place(array, *spec):
    return jax.device_put(array, NamedSharding(mesh, PartitionSpec(*spec)))

  x, weights, chosen = (place(a, "fsdp", None) for a in (x, weights, chosen))
  gate, up = (place(a, "fsdp", "tp", None) for a in (gate, up))
  down = place(down, "fsdp", None, "tp")
  experts_fn = functools.partial(moe.experts_ragged, act="silu")

  def split(x, weights, gate, up, down):
    return kernel.per_device(experts_fn, moe.grouped_matmul, x, weights, chosen, gate, up, down,
                             mesh=mesh)

  def whole(x, weights, gate, up, down):
    return experts_fn(x, weights, chosen, gate, up, down)

  args = (x, weights, gate, up, down)
  lowered = jax.jit(split).lower(*args).as_text()
  assert "shard_map" in lowered or "manual" in lowered  # The split is really per device.
  assert_close(jax.jit(split)(*args), jax.jit(whole)(*args), 1e-5)
  loss = lambda fn: lambda *a: jnp.sum(fn(*a) ** 2)  # noqa: E731
  grads = jax.jit(jax.grad(loss(split), argnums=range(5)))(*args)
  expected = jax.jit(jax.grad(loss(whole), argnums=range(5)))(*args)
  for ours, theirs in zip(grads, expected, strict=True):
    assert_close(ours, theirs, 1e-5)


@pytest.mark.skipif(not HOPPER, reason="the Mosaic GPU grouped matmul runs on Hopper GPUs only")
def test_mosaic_gpu_grouped_matmul_equals_ragged_dot():
  """Forward and both gradients, with empty groups and a group spanning several tiles."""
  rows, groups, out_features, in_features = 1000, 8, 128, 256
  keys = jax.random.split(jax.random.key(0), 3)
  lhs = jax.random.normal(keys[0], (rows, in_features), jnp.bfloat16)
  rhs = (0.1 * jax.random.normal(keys[1], (groups, out_features, in_features))).astype(
      jnp.bfloat16
  )
  sizes = jnp.array([0, 300, 1, 0, 129, 70, 200, 300], jnp.int32)
  cotangent = jax.random.normal(keys[2], (rows, out_features), jnp.bfloat16)

  def reference(lhs, rhs):
    dims = jax.lax.RaggedDotDimensionNumbers((([1], [2]), ([], [])), [0], [0])
    return jax.lax.ragged_dot_general(
        lhs, rhs, sizes, dims, preferred_element_type=jnp.float32
    ).astype(lhs.dtype)

  ours, ours_vjp = jax.vjp(lambda a, b: kernel.grouped_matmul(a, b, sizes), lhs, rhs)
  theirs, theirs_vjp = jax.vjp(reference, lhs, rhs)
  for a, b in zip((ours, *ours_vjp(cotangent)), (theirs, *theirs_vjp(cotangent)), strict=True):
    assert_close(a, b, 2e-2)


@pytest.mark.skipif(not HOPPER or len(jax.devices()) < 2,
                    reason="needs several Hopper GPUs")
def test_mosaic_gpu_experts_per_device_equal_xla():
  n = len(jax.devices())
  gpu_mesh = jax.make_mesh((n // 2, 2) if n % 2 == 0 else (n, 1), ("fsdp", "tp"),
                           axis_types=(AxisType.Auto,) * 2)
  x, weights, chosen, gate, up, down = random_experts(
      jnp.bfloat16, tokens=512 * n, hidden=256, width=512)
  experts_fn = functools.partial(moe.experts_ragged, act="silu")
  args = (x, weights, chosen, gate, up, down)
  ours = jax.jit(lambda *a: kernel.experts(experts_fn, *a, setting="mosaic_gpu", mesh=gpu_mesh))
  assert_close(ours(*args), jax.jit(experts_fn)(*args), 2e-2)
