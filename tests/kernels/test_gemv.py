"""One-row products as a multiply and a sum (``KernelPolicy.gemv``) against the dot:
values for float, int8 and int4 weights, which calls the policy gives it, and whole
models decoding with it against transformers on Auto and Explicit 2x4 meshes.

Tolerances: float32 throughout, so the reduction and the dot differ only in the order of
their float32 sums: 1e-5 relative to the output's largest entry for a product; models
against transformers use the parity suite's 1e-4 max-abs on logits and identical greedy
tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests import reference
from tunix_zoo.errors import KernelError
from tunix_zoo.kernels import KernelPolicy, gemv, set_kernel_policy
from tunix_zoo.layers.basic import Embedding, Linear
from tunix_zoo.layers.quantized import Quantization

OUT, IN = 48, 256
TOLERANCE = 1e-5
NEW_TOKENS = 12
REDUCTION = KernelPolicy(gemv="reduction")


def dense_weight(seed=0, out=OUT, inputs=IN):
  return np.random.default_rng(seed).normal(size=(out, inputs)).astype(np.float32)


def close(got, want):
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=0,
                             atol=TOLERANCE * float(jnp.abs(want).max()))


@pytest.mark.parametrize("lead", [(1,), (1, 1)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_a_float_product_matches_the_dot(dtype, lead):
  w = jnp.asarray(dense_weight(), dtype)
  x = jax.random.normal(jax.random.key(1), (*lead, IN)).astype(dtype)
  got = jax.jit(gemv.product)(x, w)
  want = jnp.einsum("...i,oi->...o", x, w, preferred_element_type=jnp.float32).astype(dtype)
  assert got.shape == (*lead, OUT) and got.dtype == dtype
  close(got, want)


@pytest.mark.parametrize("kind,group_size", [("int8", None), ("int8", 64), ("int4", 64),
                                             ("int4", 128), ("int4", 32)])
def test_a_quantized_product_matches_the_dequantized_dot(kind, group_size):
  """int4's codes are offset by 8 and packed in halves of each group; the reduction's
  ``sum(x * code) - 8 * sum(x)`` must still give the dequantized weight's product."""
  scheme = Quantization(kind, group_size=group_size)
  values, scales = map(jnp.asarray, scheme.quantize(dense_weight(2), np, np.float32))
  x = jax.random.normal(jax.random.key(3), (1, 1, IN), jnp.float32)
  want = jnp.einsum("...i,oi->...o", x, scheme.dequantize(values, scales, jnp.float32))
  got = jax.jit(lambda x, v, s: gemv.product(x, v, s, kind=kind))(x, values, scales)
  assert got.shape == (1, 1, OUT)
  close(got, want)


def test_every_int4_code_reaches_the_output_exactly():
  """One-hot inputs pick single weights: every output is one code's ``(code - 8) *
  scale``, bit for bit, for both nibbles and all 16 codes."""
  scheme = Quantization("int4", group_size=64)
  codes = (np.arange(OUT)[:, None] + np.arange(IN)[None, :]) % 16
  w = (codes.astype(np.float32) - 8) * 0.25
  values, scales = map(jnp.asarray, scheme.quantize(w, np, np.float32))
  dense = scheme.dequantize(values, scales, jnp.float32)
  for column in (0, 1, 31, 32, 33, 63, 64, 200):
    x = jnp.zeros((1, IN), jnp.float32).at[0, column].set(1.0)
    got = gemv.product(x, values, scales, kind="int4")
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(dense[:, column]))


def test_the_policy_gives_it_one_row_products_only(monkeypatch):
  one, two = jnp.ones((1, 1, IN)), jnp.ones((1, 2, IN))
  assert gemv.takes(one, OUT, IN, None, REDUCTION)
  assert gemv.takes(one, OUT, IN, "int4", REDUCTION)
  assert not gemv.takes(two, OUT, IN, None, REDUCTION)  # a prefill's rows: the dot
  assert not gemv.takes(one, OUT, IN, None, KernelPolicy(gemv="xla"))
  # "auto": never on this CPU; on a GPU (pretended) from MIN_MULTIPLY_ADDS on.
  big = gemv.MIN_MULTIPLY_ADDS // IN
  assert not gemv.takes(one, big, IN, None, KernelPolicy())
  monkeypatch.setattr(gemv.jax, "default_backend", lambda: "gpu")
  assert gemv.takes(one, big, IN, None, KernelPolicy())
  assert gemv.takes(one, big, IN, "int8", KernelPolicy())
  assert not gemv.takes(one, big - 1, IN, None, KernelPolicy())
  assert not gemv.takes(one, big - 1, IN, "int8", KernelPolicy())
  # int4 decodes faster in the GEMV kernel (measured): "auto" leaves it to that.
  assert not gemv.takes(one, big, IN, "int4", KernelPolicy())
  assert not gemv.takes(one, big, IN, "nf4", KernelPolicy())
  # A forced quantized kernel keeps its products; a float weight is still the reduction's.
  forced = KernelPolicy(quantized_matmul="pallas")
  assert not gemv.takes(one, big, IN, "int8", forced)
  assert gemv.takes(one, big, IN, None, forced)


def test_a_forced_reduction_refuses_a_kind_it_cannot_compute():
  with pytest.raises(KernelError, match="gemv='reduction'.*nf4 weights"):
    gemv.takes(jnp.ones((1, IN)), OUT, IN, "nf4", REDUCTION)


def test_linear_and_a_tied_head_follow_the_policy():
  linear = Linear(IN, OUT, (None, None), rngs=nnx.Rngs(0))
  embedding = Embedding(OUT, IN, rngs=nnx.Rngs(1))
  x = jax.random.normal(jax.random.key(4), (1, 1, IN))
  want = (linear(x), embedding.attend(x))
  for module in (linear, embedding):
    set_kernel_policy(module, REDUCTION)
  program = str(jax.make_jaxpr(lambda x: (linear(x), embedding.attend(x)))(x))
  assert "dot_general" not in program and program.count("reduce_sum") == 2
  for got, expected in zip((linear(x), embedding.attend(x)), want):
    close(got, expected)


def _step_logits(model, tokens):
  cache = model.init_cache(1, tokens.shape[1] + 1)
  prefill = nnx.jit(lambda m, t, c: m(t, cache=c))
  _, cache = prefill(model, jnp.asarray(tokens[:, :-1]), cache)
  step = lambda m, t, c: m(t, cache=c)[0]
  last = jnp.asarray(tokens[:, -1:])
  return nnx.jit(step)(model, last, cache), str(jax.make_jaxpr(
      lambda t, c: step(model, t, c))(last, cache))


@pytest.mark.parametrize("axis_type", [jax.sharding.AxisType.Auto,
                                       jax.sharding.AxisType.Explicit])
@pytest.mark.parametrize("case", ["qwen3", "gemma3"])
def test_a_model_on_a_2x4_mesh_decodes_as_transformers_with_the_reduction(
    reference_checkpoints, case, axis_type):
  """qwen3's own LM head and gemma3's tied one; batch 1, so every decode step's products
  are one-row reductions (no dot_general but attention's), split over fsdp x tp."""
  from tunix_zoo.automodel import load_folder

  folder, torch_model = reference_checkpoints[case]
  model = set_kernel_policy(load_folder(folder, reference.mesh_2x4(axis_type)), REDUCTION)
  tokens, mask, positions = reference.left_padded_batch(seed=5, batch=1)
  logits, program = _step_logits(model, tokens)
  layers = model.config.num_layers
  assert program.count("reduce_sum") >= 7 * layers + 1
  assert program.count("dot_general") == 2 * layers  # q @ k and the weights @ v
  expected = reference.reference_logits(torch_model, tokens, mask, positions)[:, -1:]
  assert float(np.abs(np.asarray(logits) - expected).max()) <= reference.MAX_ABS
  want = reference.reference_greedy(torch_model, tokens, mask, NEW_TOKENS)
  np.testing.assert_array_equal(reference.greedy(model, tokens, mask, NEW_TOKENS), want)


@pytest.mark.parametrize("kind,group_size", [("int8", None), ("int4", 32)])
def test_a_quantized_decode_step_on_a_2x4_mesh_matches_the_dot(kind, group_size):
  from tunix_zoo import registry
  from tunix_zoo.automodel import AutoModel

  config = registry.get_config("qwen3_8b").replace(
      vocab_size=256, hidden_size=128, intermediate_size=256, num_layers=1, num_heads=4,
      num_kv_heads=4, head_dim=32)
  config = config.replace(layer_types=config.layer_types[:1])
  model = AutoModel.from_config(
      config, reference.mesh_2x4(jax.sharding.AxisType.Explicit),
      quantization=Quantization(kind, group_size=group_size))
  tokens = np.asarray([[5, 9, 3]])
  want, _ = _step_logits(set_kernel_policy(model, KernelPolicy(gemv="xla")), tokens)
  got, program = _step_logits(set_kernel_policy(model, REDUCTION), tokens)
  assert program.count("dot_general") == 2  # attention's; the 7 projections and head reduce
  close(got, want)
