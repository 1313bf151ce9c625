"""The quantized GEMV kernel against XLA's path (``Quantization.matmul``): values in
Pallas's interpreter, the gradient with respect to ``x``, the policy's choice, and the
lowering to Triton for every kind (which catches lowering errors without a GPU)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests import reference
from tunix_zoo.errors import KernelError
from tunix_zoo.kernels import KernelPolicy, quantized_matmul, set_kernel_policy
from tunix_zoo.layers.basic import Linear
from tunix_zoo.layers.quantized import NF4_LEVELS, Quantization

OUT, IN = 64, 512
SCHEMES = [("int8", None), ("int8", 64), ("int4", 64), ("int4", 128), ("nf4", 64),
           ("nf4", 128), ("fp8", None)]
# float32 inputs and scales: the kernel and XLA differ only in the order of the float32
# sums (512 terms of size ~1): relative to the output's largest entry.
TOLERANCE = 1e-5


def stored(kind, group_size, out=OUT, inputs=IN, seed=0):
  scheme = Quantization(kind, group_size=group_size)
  w = np.random.default_rng(seed).normal(size=(out, inputs)).astype(np.float32)
  values, scales = scheme.quantize(w, np, np.float32)
  return scheme, jnp.asarray(values), jnp.asarray(scales)


def levels(kind):
  return tuple(NF4_LEVELS.tolist()) if kind == "nf4" else None


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("kind,group_size", SCHEMES)
def test_the_kernel_matches_xla(kind, group_size, batch):
  scheme, values, scales = stored(kind, group_size)
  x = jax.random.normal(jax.random.key(batch), (batch, IN), jnp.float32)
  want = scheme.matmul(x, values, scales, jnp.float32)
  got = quantized_matmul.quantized_matmul(x, values, scales, kind, levels(kind),
                                          interpret=True)
  assert got.shape == (batch, OUT) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, atol=TOLERANCE * float(jnp.abs(want).max()), rtol=0)


@pytest.mark.parametrize("kind,group_size", [("int8", None), ("int4", 64), ("nf4", 64)])
def test_every_stored_code_becomes_its_exact_weight(kind, group_size):
  """One-hot rows of x pick single weights, so each output is one code's float times its
  scale, which must equal the dequantized weight bit for bit, for every code (int8's
  -128 and 127, both nibbles' 0 and 15, every nf4 level)."""
  scheme = Quantization(kind, group_size=group_size)
  rows, codes = quantized_matmul.MAX_ROWS, 256 if kind == "int8" else 16
  out_codes = (np.arange(OUT)[:, None] + np.arange(IN)[None, :]) % codes
  if kind == "int8":
    values = (out_codes - 128).astype(np.int8)
  else:  # each byte: a code in its low nibble and a different one in its high nibble
    halves = out_codes.reshape(OUT, IN // group_size, 2, group_size // 2)
    values = (halves[:, :, 0] | ((15 - halves[:, :, 1]) << 4)).reshape(OUT, IN // 2)
    values = values.astype(np.uint8)
  groups = 1 if group_size is None else IN // group_size
  scales = jnp.asarray(np.random.default_rng(1).uniform(0.5, 2, (OUT, groups)), jnp.float32)
  values = jnp.asarray(values)
  weight = np.asarray(scheme.dequantize(values, scales, jnp.float32))
  picked = np.arange(rows) * (IN // rows)  # their codes cover every code
  x = jnp.asarray(np.eye(IN, dtype=np.float32)[picked])
  got = quantized_matmul.quantized_matmul(x, values, scales, kind, levels(kind),
                                          interpret=True)
  np.testing.assert_array_equal(np.asarray(got), weight[:, picked].T)
  assert len(np.unique(out_codes[:, picked])) == codes


@pytest.mark.parametrize("kind,group_size", SCHEMES)
def test_the_tensor_core_tiling_matches_xla(kind, group_size):
  """bf16 inputs (Triton's dot takes 16-bit floats): the dequantized group is rounded to
  bf16 as XLA's weight is, products are exact in float32; both round the output to bf16
  (2^-8 relative), so 1% of the largest output."""
  scheme, values, scales = stored(kind, group_size)
  scales = scales.astype(jnp.bfloat16)
  x = jax.random.normal(jax.random.key(4), (8, IN), jnp.bfloat16)
  assert quantized_matmul.default_blocks(kind, 8, OUT, 32, x.dtype).mma
  want = scheme.matmul(x, values, scales, jnp.bfloat16).astype(jnp.float32)
  got = quantized_matmul.quantized_matmul(x, values, scales, kind, levels(kind),
                                          interpret=True)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(got.astype(jnp.float32), want,
                             atol=1e-2 * float(jnp.abs(want).max()), rtol=0)


def test_leading_axes_and_bf16_inputs():
  scheme, values, scales = stored("int4", 64)
  x = jax.random.normal(jax.random.key(0), (2, 3, IN), jnp.bfloat16)
  want = scheme.matmul(x, values, scales, jnp.bfloat16).astype(jnp.float32)
  got = scheme.matmul(x, values, scales, jnp.bfloat16, kernel="interpret")
  assert got.shape == (2, 3, OUT) and got.dtype == jnp.bfloat16
  # XLA rounds the dequantized weight to bf16, the kernel accumulates exact products in
  # float32: both round the output to bf16 (2^-8 relative).
  np.testing.assert_allclose(got.astype(jnp.float32), want,
                             atol=2e-2 * float(jnp.abs(want).max()), rtol=0)


@pytest.mark.parametrize("kind,group_size", [("int8", None), ("int4", 128), ("nf4", 64)])
def test_the_gradient_wrt_x_is_xlas(kind, group_size):
  scheme, values, scales = stored(kind, group_size)
  x = jax.random.normal(jax.random.key(1), (4, IN), jnp.float32)
  probe = jax.random.normal(jax.random.key(2), (4, OUT), jnp.float32)

  def loss(x, kernel):
    return (scheme.matmul(x, values, scales, jnp.float32, kernel=kernel) * probe).sum()

  want = jax.jit(jax.grad(functools.partial(loss, kernel="xla")))(x)
  got = jax.jit(jax.grad(functools.partial(loss, kernel="interpret")))(x)
  np.testing.assert_allclose(got, want, atol=1e-5 * float(jnp.abs(want).max()), rtol=0)
  # The scales are differentiable inputs of the product: the kernel's backward gives
  # them no gradient (they are frozen), as training never asks for one.
  grad_scales = jax.grad(lambda s: (scheme.matmul(x, values, s, jnp.float32,
                                                  kernel="interpret") * probe).sum())(scales)
  assert not np.any(grad_scales)


def test_the_policy_chooses():
  scheme, values, scales = stored("int4", 128)
  x = jnp.ones((1, IN), jnp.float32)
  # On this CPU auto is XLA's path; interpret forces the kernel.
  assert not quantized_matmul.takes(x, values, scales, "int4", setting="auto")
  assert "the cpu backend" in quantized_matmul.why_unsupported(x, values, scales, "int4")
  assert quantized_matmul.takes(x, values, scales, "int4", setting="interpret")
  assert not quantized_matmul.takes(x, values, scales, "int4", setting="xla")
  # More rows than a decode step: XLA's under every setting (a prefill).
  many = jnp.ones((quantized_matmul.MAX_ROWS + 1, IN), jnp.float32)
  assert not quantized_matmul.takes(many, values, scales, "int4", setting="pallas")
  # A forced kernel that cannot serve refuses, naming why.
  with pytest.raises(KernelError, match="quantized_matmul='pallas'.*cpu backend"):
    quantized_matmul.takes(x, values, scales, "int4", setting="pallas")
  odd_scheme, odd_values, odd_scales = stored("int8", 24, out=OUT, inputs=96)
  why = quantized_matmul.why_unsupported(jnp.ones((1, 96)), odd_values, odd_scales, "int8",
                                         interpret=True)
  assert "24 stored bytes per group" in why
  with pytest.raises(KernelError, match="quantized_matmul='interpret'.*24 stored bytes"):
    odd_scheme.matmul(jnp.ones((1, 96)), odd_values, odd_scales, jnp.float32,
                      kernel="interpret")
  assert odd_scheme.matmul(jnp.ones((1, 96)), odd_values, odd_scales, jnp.float32,
                           kernel="auto").shape == (1, OUT)


def test_a_quantized_linear_follows_the_model_policy():
  linear = Linear(IN, OUT, (None, None), rngs=nnx.Rngs(0))
  scheme, values, scales = stored("int4", 64)
  linear.quantization = scheme
  linear.weight, linear.weight_scale = nnx.Param(values), nnx.Param(scales)
  x = jax.random.normal(jax.random.key(3), (1, IN), jnp.float32)
  want = linear(x)
  set_kernel_policy(linear, KernelPolicy(quantized_matmul="interpret"))
  assert linear.kernel_policy.quantized_matmul == "interpret"
  got = nnx.jit(lambda m, x: m(x))(linear, x)
  np.testing.assert_allclose(got, want, atol=TOLERANCE * float(jnp.abs(want).max()), rtol=0)


def _lowers_to_triton(fn, *args) -> str:
  exported = jax.export.export(
      jax.jit(fn), platforms=["cuda"],
      disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
  )(*args)
  return exported.mlir_module()


@pytest.mark.parametrize("batch,mma", [(1, None), (8, None), (3, True), (8, False)])
@pytest.mark.parametrize("kind,group_size", SCHEMES)
def test_the_kernel_lowers_to_triton(kind, group_size, batch, mma):
  """The Pallas -> Triton lowering at a Qwen3-8B down projection's shape ([4096, 12288]:
  96 groups of 128, not a power of two), at the default tilings (multiply-adds at batch
  1, tensor-core dots at 8) and the other one; only Triton -> PTX is left for a GPU."""
  scheme = Quantization(kind, group_size=group_size)
  values_shape, scales_shape = scheme.shapes(4096, 12288)
  blocks = None if mma is None else quantized_matmul.Blocks(block_out=16, mma=mma)
  fn = functools.partial(quantized_matmul.quantized_matmul, kind=kind, levels=levels(kind),
                         blocks=blocks)
  module = _lowers_to_triton(
      fn, jax.ShapeDtypeStruct((batch, 12288), jnp.bfloat16),
      jax.ShapeDtypeStruct(values_shape, scheme.storage_dtype),
      jax.ShapeDtypeStruct(scales_shape, jnp.bfloat16))
  assert "__gpu$xla.gpu.triton" in module and f"quantized_matmul_{kind}" in module


def test_a_tiling_triton_refuses_is_caught_by_the_lowering():
  """So the lowering test above can fail: a block of 3 rows is not a power of two."""
  fn = functools.partial(quantized_matmul.quantized_matmul, kind="int4",
                         blocks=quantized_matmul.Blocks(block_out=3))
  with pytest.raises(Exception, match="power of 2"):
    _lowers_to_triton(fn, jax.ShapeDtypeStruct((1, 4096), jnp.bfloat16),
                      jax.ShapeDtypeStruct((1023, 2048), jnp.uint8),
                      jax.ShapeDtypeStruct((1023, 32), jnp.bfloat16))


def tiny_int4():
  """A two-layer Qwen3 of width 64 (MLP 128), int4 in groups of 32 (16 bytes per group)."""
  from tunix_zoo import registry
  from tunix_zoo.automodel import AutoModel

  config = registry.get_config("qwen3_8b").replace(
      vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
      num_kv_heads=2, head_dim=16)
  config = config.replace(layer_types=config.layer_types[:2])
  return AutoModel.from_config(config, reference.one_device_mesh(),
                               quantization=Quantization("int4", group_size=32))


@pytest.fixture(scope="module")
def tiny_int4_model():
  return tiny_int4()


def test_qlora_gradients_through_the_kernel_are_xlas():
  """LoRA adapters over the frozen int4 weights, 8 tokens (rows the kernel takes): the
  adapters' gradients equal those of XLA's path."""
  from tunix_zoo.lora import apply_lora

  model = apply_lora(tiny_int4(), rank=4, alpha=8.0)
  tokens = jnp.arange(3, 11)[None]
  loss = lambda m: (m(tokens)[0].astype(jnp.float32) ** 2).mean()
  grad = nnx.jit(nnx.grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam)))
  want = grad(model)
  set_kernel_policy(model, KernelPolicy(quantized_matmul="interpret"))
  assert str(jax.make_jaxpr(lambda: loss(model))()).count("pallas_call") == 14
  got = grad(model)
  leaves = jax.tree.leaves(got)
  assert len(leaves) == 2 * 14 and any(np.any(leaf) for leaf in leaves)
  for g, w in zip(leaves, jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, atol=1e-5 * float(jnp.abs(w).max()) + 1e-12, rtol=0)


def test_a_decode_step_runs_the_kernel_in_every_quantized_linear(tiny_int4_model):
  model = tiny_int4_model
  tokens = jnp.asarray([[5]])
  step = lambda m, t: m(t)[0]
  want = nnx.jit(step)(model, tokens)
  set_kernel_policy(model, KernelPolicy(quantized_matmul="interpret"))
  try:
    program = str(jax.make_jaxpr(lambda t: step(model, t))(tokens))
    got = nnx.jit(step)(model, tokens)
    # The LM head stays in float (Quantization's default skip): 2 layers x 7 projections.
    assert program.count("pallas_call") == 14
    np.testing.assert_allclose(got, want, atol=TOLERANCE * float(jnp.abs(want).max()), rtol=0)
    # A prefill's rows are XLA's, also under a forced kernel.
    assert "pallas_call" not in str(jax.make_jaxpr(lambda t: step(model, t))(
        jnp.ones((1, quantized_matmul.MAX_ROWS + 1), jnp.int32)))
  finally:
    set_kernel_policy(model, KernelPolicy())


def test_a_weight_on_a_mesh_needs_its_axes_and_whole_blocks():
  mesh = jax.make_mesh((2, 4), ("fsdp", "tp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  scheme, values, scales = stored("int4", 64)  # [64, 256] bytes, [64, 8] scales
  x = jnp.ones((1, IN), jnp.float32)
  why = quantized_matmul.why_unsupported(x, values, scales, "int4", mesh=mesh, interpret=True)
  assert "mesh of 8 devices without its mesh axes" in why
  with pytest.raises(KernelError, match="quantized_matmul='interpret'.*mesh of 8 devices"):
    quantized_matmul.takes(x, values, scales, "int4", setting="interpret", mesh=mesh)
  assert not quantized_matmul.takes(x, values, scales, "int4", setting="auto", mesh=mesh)
  split = (("tp", "fsdp"), ("tp", "fsdp"))
  assert quantized_matmul.supports(x, values, scales, "int4", mesh=mesh, axes=split,
                                   interpret=True)
  why = quantized_matmul.why_unsupported(x, values, scales, "int4", mesh=mesh, interpret=True,
                                         axes=(("tp", "fsdp"), ("tp", None)))
  assert "scales split over ('tp', None) but their values over ('tp', 'fsdp')" in why
  why = quantized_matmul.why_unsupported(x, values, scales, "int4", mesh=mesh, interpret=True,
                                         axes=(("model", None), ("model", None)))
  assert "of which the mesh ('fsdp', 'tp') lacks some" in why
  # Each device's block must tile: 64 / 8 = 8 outputs, not a multiple of block_out 16.
  why = quantized_matmul.why_unsupported(
      x, values, scales, "int4", quantized_matmul.Blocks(block_out=16), mesh=mesh,
      interpret=True, axes=((("fsdp", "tp"), None), (("fsdp", "tp"), None)))
  assert "8 outputs, not a multiple of block_out=16" in why


@pytest.mark.parametrize("axis_type", [jax.sharding.AxisType.Auto, jax.sharding.AxisType.Explicit])
def test_a_decode_step_on_a_2x4_mesh_runs_the_kernel_per_device(axis_type):
  """Every projection's values and scales split over fsdp x tp (inputs over one, outputs
  over the other): each device's block is a whole int4 weight, partial sums summed."""
  from tunix_zoo import registry
  from tunix_zoo.automodel import AutoModel

  config = registry.get_config("qwen3_8b").replace(
      vocab_size=256, hidden_size=256, intermediate_size=512, num_layers=1, num_heads=4,
      num_kv_heads=4, head_dim=64)
  config = config.replace(layer_types=config.layer_types[:1])
  model = AutoModel.from_config(config, reference.mesh_2x4(axis_type),
                                quantization=Quantization("int4", group_size=32))
  tokens = jnp.asarray([[5], [7]])
  step = lambda m, t: m(t)[0]
  want = nnx.jit(step)(model, tokens)
  set_kernel_policy(model, KernelPolicy(quantized_matmul="interpret"))
  program = str(jax.make_jaxpr(lambda t: step(model, t))(tokens))
  assert program.count("pallas_call") == 7 and "shard_map" in program
  got = nnx.jit(step)(model, tokens)
  np.testing.assert_allclose(got, want, atol=TOLERANCE * float(jnp.abs(want).max()), rtol=0)


def test_auto_gives_the_kernel_the_4bit_kinds_only(monkeypatch):
  """Where the kernel could run (a GPU backend, here pretended: takes() compiles nothing),
  "auto" takes it for int4 / nf4 and leaves int8 / fp8 to XLA's faster fused product."""
  monkeypatch.setattr(quantized_matmul.jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(quantized_matmul, "_has_fp8", lambda: True)
  x = jnp.ones((1, IN), jnp.float32)
  chosen = {}
  for kind, group in (("int4", 128), ("nf4", 64), ("int8", None), ("fp8", None)):
    _, values, scales = stored(kind, group)
    assert quantized_matmul.why_unsupported(x, values, scales, kind) is None, kind
    chosen[kind] = quantized_matmul.takes(x, values, scales, kind, setting="auto")
    assert quantized_matmul.takes(x, values, scales, kind, setting="pallas")
  assert chosen == {"int4": True, "nf4": True, "int8": False, "fp8": False}
