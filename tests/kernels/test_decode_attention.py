"""The one-kernel decode attention, run in Pallas's interpreter on the CPU: it must equal
the XLA attention it replaces (float32, 1e-5 max-abs), and decoding through it must stay
token-identical to transformers. The kernel is chosen by the layers' KernelPolicy."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType

from tests import reference
from tunix_zoo.automodel import load_folder
from tunix_zoo.errors import KernelError
from tunix_zoo.generation import generate
from tunix_zoo.kernels import KernelPolicy, decode_attention, set_kernel_policy
from tunix_zoo.layers.attention import dot_product_attention

TOLERANCE = 1e-5  # float32 max-abs, kernel against the XLA path
INTERPRET = KernelPolicy(decode_attention="interpret")
XLA = KernelPolicy(decode_attention="xla")
# Jitted once each: eagerly, every one of the wrappers' operations would compile alone.
# (scale, softcap) are static, as the layers pass them.
kernel_attention = jax.jit(functools.partial(decode_attention.decode_attention, interpret=True),
                           static_argnums=(4, 5))
xla_attention = jax.jit(dot_product_attention, static_argnums=(4, 5))


@functools.partial(jax.jit, static_argnums=0)
def forward(graphdef, state, tokens, cache, attention_mask=None):
  """The model's call, compiled once per graph definition (its kernel policy included)."""
  return nnx.merge(graphdef, state)(tokens, cache=cache, attention_mask=attention_mask)


def random_inputs(seed, batch, heads, kv_heads, head_dim, length, keep=0.5):
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.standard_normal((batch, 1, heads, head_dim)), jnp.float32)
  k, v = (jnp.asarray(rng.standard_normal((batch, length, kv_heads, head_dim)), jnp.float32)
          for _ in range(2))
  mask = rng.random((batch, 1, length)) < keep
  mask[:, :, rng.integers(0, length, batch)] = True  # Every row sees at least one key.
  return q, k, v, jnp.asarray(mask)


@pytest.mark.parametrize(
    "batch, heads, kv_heads, head_dim, length, softcap",
    [
        (1, 16, 8, 128, 384, None),   # Qwen3-0.6B decode: 6 splits of one block
        (3, 4, 1, 256, 128, 50.0),    # multi-query, Gemma's head size, soft-capping
        (2, 8, 2, 64, 640, None),     # groups of 4, 10 splits
        (2, 2, 2, 16, 64, None),      # plain multi-head, one block
    ],
)
def test_kernel_equals_xla_attention(batch, heads, kv_heads, head_dim, length, softcap):
  q, k, v, mask = random_inputs(0, batch, heads, kv_heads, head_dim, length)
  out = kernel_attention(q, k, v, mask, head_dim**-0.5, softcap)
  expected = xla_attention(q, k, v, mask, head_dim**-0.5, softcap)
  assert out.shape == expected.shape and out.dtype == q.dtype
  np.testing.assert_allclose(out, expected, atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("devices", [1, 2], ids=["one_device", "kv_heads_split"])
def test_the_kernel_reads_a_layer_of_a_stacked_cache_equal_to_xla_on_its_slice(devices):
  """A scanned layer stack's [B, L, S, K, H] cache and a traced layer number (one compile
  for every layer): the kernel reads that layer in place; on 2 devices per device under
  shard_map, query and KV heads split over tp. Within TOLERANCE of XLA's path on the
  layer's slice."""
  batch, layers, length, kv_heads, head_dim = 2, 3, 128, 2, 32
  q, k, v, mask = random_inputs(3, batch, 4, kv_heads, head_dim, layers * length)
  # The same random values, laid out as a stack of three layers of 128 slots.
  stack = lambda x: x.reshape(batch, layers, length, kv_heads, head_dim)  # noqa: E731
  k, v, mask = stack(k), stack(v), mask[:, :, :length]
  mesh = jax.make_mesh((1, devices), ("fsdp", "tp"), devices=jax.devices()[:devices],
                       axis_types=(AxisType.Auto,) * 2)
  attend = jax.jit(lambda q, k, v, mask, layer: decode_attention.attend(
      q, k, v, mask, 0.2, 30.0, setting="interpret", mesh=mesh, layer=layer))
  program = attend.trace(q, k, v, mask, jnp.int32(0))
  assert ("shard_map" in str(program.jaxpr)) is (devices > 1)
  program = program.lower().compile()
  for layer in range(layers):
    np.testing.assert_allclose(
        program(q, k, v, mask, jnp.int32(layer)),
        xla_attention(q, k[:, layer], v[:, layer], mask, 0.2, 30.0), atol=TOLERANCE, rtol=0)


def test_splits_whose_keys_are_all_masked_add_nothing():
  # Only the last 3 keys of 384 are visible: five of the six splits see none.
  q, k, v, _ = random_inputs(1, 1, 16, 8, 128, 384)
  mask = jnp.zeros((1, 1, 384), bool).at[:, :, -3:].set(True)
  out = kernel_attention(q, k, v, mask, 0.1, None)
  np.testing.assert_allclose(out, xla_attention(q, k, v, mask, 0.1, None), atol=TOLERANCE)


def test_blocks_after_a_rows_last_visible_key_are_not_read():
  """A decoding step reads the cache only up to each row's position: NaN in the blocks
  after a row's last visible key (which any read would spread: 0 * NaN) leaves the
  output equal to XLA's on a clean cache."""
  q, k, v, _ = random_inputs(3, 2, 8, 2, 64, 640)
  last = [200, 70]  # row 0: blocks 4..9 unread; row 1: blocks 2..9
  mask = jnp.arange(640)[None, None, :] < jnp.asarray(last)[:, None, None]
  unread = jnp.arange(640)[None, :] >= (-(-jnp.asarray(last) // 64) * 64)[:, None]
  poisoned = [jnp.where(unread[..., None, None], jnp.nan, x) for x in (k, v)]
  out = kernel_attention(q, *poisoned, mask, 0.1, None)
  np.testing.assert_allclose(out, xla_attention(q, k, v, mask, 0.1, None), atol=TOLERANCE)


def test_a_row_with_no_visible_key_gives_zeros():
  q, k, v, mask = random_inputs(2, 2, 4, 2, 32, 64)
  mask = mask.at[1].set(False)
  out = kernel_attention(q, k, v, mask, 0.2, None)
  np.testing.assert_array_equal(out[1], 0.0)
  assert np.isfinite(np.asarray(out)).all()


@pytest.mark.parametrize(
    "setting, q_shape, k_shape, dtype, runs",
    [
        ("interpret", (1, 1, 4, 64), (1, 128, 2, 64), jnp.float32, True),
        ("interpret", (1, 2, 4, 64), (1, 128, 2, 64), jnp.float32, False),  # a prefill
        ("interpret", (1, 1, 4, 64), (1, 100, 2, 64), jnp.float32, "not a multiple of 64"),
        ("interpret", (1, 1, 4, 48), (1, 128, 2, 48), jnp.float32, "head size 48"),
        ("pallas", (1, 1, 4, 64), (1, 128, 2, 64), jnp.bfloat16, "needs a GPU"),  # no GPU here
        ("xla", (1, 1, 4, 64), (1, 128, 2, 64), jnp.bfloat16, False),
        ("auto", (1, 1, 4, 64), (1, 128, 2, 64), jnp.bfloat16, False),  # no GPU here
        ("auto", (1, 1, 4, 48), (1, 128, 2, 48), jnp.float32, False),
    ],
)
def test_the_setting_runs_the_kernel_only_where_it_can_serve(setting, q_shape, k_shape, dtype,
                                                             runs):
  """A forced setting that cannot serve a one-token call raises, naming why; "auto"
  falls back to XLA's path (None); calls of several tokens are never the kernel's."""
  q, k = jnp.zeros(q_shape, dtype), jnp.zeros(k_shape, dtype)
  mask = jnp.ones((1, 1, k_shape[1]), bool)
  attend = lambda: decode_attention.attend(  # noqa: E731
      q, k, k, mask, 0.125, None, setting=setting, mesh=None)
  if isinstance(runs, str):
    with pytest.raises(KernelError, match=runs):
      attend()
    assert not decode_attention.supports(q, k, interpret=setting == "interpret")
  else:
    assert (attend() is not None) is runs


def test_the_stacked_cache_kernel_lowers_to_triton_reading_the_whole_stack():
  """The Pallas -> Triton lowering (for CUDA, on this CPU) of the stacked form at Qwen3-8B
  widths, batch 32 and 36 layers: one Triton call takes both whole caches and the layer
  number; nothing slices the layer out before it."""
  cache = jax.ShapeDtypeStruct((32, 36, 384, 8, 128), jnp.bfloat16)
  exported = jax.export.export(
      jax.jit(lambda q, k, v, mask, layer: decode_attention.decode_attention(
          q, k, v, mask, 128**-0.5, layer=layer)),
      platforms=["cuda"],
      disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
  )(jax.ShapeDtypeStruct((32, 1, 32, 128), jnp.bfloat16), cache, cache,
    jax.ShapeDtypeStruct((32, 1, 384), jnp.bool_), jax.ShapeDtypeStruct((), jnp.int32))
  module = exported.mlir_module()
  (call,) = [line for line in module.splitlines() if "__gpu$xla.gpu.triton" in line]
  # The layer number, the queries, both caches (the program's own arguments), the mask.
  assert "%arg1, %arg2" in call, call[:200]
  assert "dynamic_slice" not in module


@pytest.mark.parametrize("case", ["gemma2", "gemma3", "qwen3", "llama3_tied_mha"])
def test_greedy_decoding_through_the_kernel_matches_transformers(reference_checkpoints, case):
  folder, torch_model = reference_checkpoints[case]
  tokens, mask, _ = reference.left_padded_batch(seed=4)
  expected = reference.reference_greedy(torch_model, tokens, mask, 16)
  model = load_folder(folder, jax.make_mesh((1, 1), ("fsdp", "tp"), devices=jax.devices()[:1]))
  set_kernel_policy(model, INTERPRET)
  out = generate(model, tokens, 16, attention_mask=mask)
  np.testing.assert_array_equal(out.tokens, expected)


@pytest.mark.slow
@pytest.mark.parametrize("axis_type", [AxisType.Explicit, AxisType.Auto], ids=["explicit", "auto"])
def test_decode_step_logits_on_a_mesh_equal_the_xla_path(reference_checkpoints, axis_type):
  """With heads and KV heads split alike over tp (8 and 2 heads, tp=2) the kernel runs per
  device under shard_map."""
  folder, _ = reference_checkpoints["qwen3"]
  model = load_folder(folder, jax.make_mesh((4, 2), ("fsdp", "tp"), axis_types=(axis_type,) * 2))
  tokens, mask, _ = reference.left_padded_batch(seed=5, batch=2)
  cache = model.init_cache(2, 64)
  _, cache = forward(*nnx.split(model), jnp.asarray(tokens), cache, jnp.asarray(mask))
  step = jnp.asarray([[7], [9]])
  logits = {}
  for policy in (XLA, INTERPRET):
    set_kernel_policy(model, policy)
    graphdef, state = nnx.split(model)
    traced = forward.trace(graphdef, state, step, cache)
    assert ("pallas_call" in str(traced.jaxpr)) is (policy is INTERPRET)
    logits[policy.decode_attention], _ = traced.lower().compile()(state, step, cache)
  np.testing.assert_allclose(logits["interpret"], logits["xla"], atol=TOLERANCE, rtol=0)


def test_a_forced_kernel_refuses_a_mesh_splitting_heads_and_kv_heads_apart(reference_checkpoints):
  # tp=4 splits the 8 query heads but replicates the 2 KV heads.
  folder, _ = reference_checkpoints["qwen3"]
  model = set_kernel_policy(load_folder(folder, jax.make_mesh((2, 4), ("fsdp", "tp"))), INTERPRET)
  cache = model.init_cache(1, 64)
  with pytest.raises(KernelError, match="query heads split over tp but KV heads over None"):
    forward(*nnx.split(model), jnp.asarray([[7]]), cache)


def test_generate_compiles_again_when_the_policy_changes(reference_checkpoints):
  folder, _ = reference_checkpoints["llama3_tied_mha"]
  model = load_folder(folder, jax.make_mesh((1, 1), ("fsdp", "tp"), devices=jax.devices()[:1]))
  prompt = [[5, 6, 7]]
  set_kernel_policy(model, XLA)
  generate(model, prompt, 4)
  assert generate(model, prompt, 4).compile_seconds == 0  # Cached for this policy...
  set_kernel_policy(model, INTERPRET)
  assert generate(model, prompt, 4).compile_seconds > 0  # ...but not for another.
