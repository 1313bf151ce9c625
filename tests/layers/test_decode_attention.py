"""The one-kernel decode attention, run in Pallas's interpreter on the CPU: it must equal
the XLA attention it replaces (float32, 1e-5 max-abs), and decoding through it must stay
token-identical to transformers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType

from tests import reference
from tunix_zoo.automodel import load_folder
from tunix_zoo.generate import generate
from tunix_zoo.layers import decode_attention
from tunix_zoo.layers.attention import dot_product_attention

TOLERANCE = 1e-5  # float32 max-abs, kernel against the XLA path


@pytest.fixture
def interpret(monkeypatch):
  monkeypatch.setattr(decode_attention, "MODE", "interpret")


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
def test_kernel_equals_xla_attention(interpret, batch, heads, kv_heads, head_dim, length,
                                     softcap):
  q, k, v, mask = random_inputs(0, batch, heads, kv_heads, head_dim, length)
  out = decode_attention.decode_attention(q, k, v, mask, head_dim**-0.5, softcap)
  expected = dot_product_attention(q, k, v, mask, head_dim**-0.5, softcap)
  assert out.shape == expected.shape and out.dtype == q.dtype
  np.testing.assert_allclose(out, expected, atol=TOLERANCE, rtol=0)


def test_splits_whose_keys_are_all_masked_add_nothing(interpret):
  # Only the last 3 keys of 384 are visible: five of the six splits see none.
  q, k, v, _ = random_inputs(1, 1, 16, 8, 128, 384)
  mask = jnp.zeros((1, 1, 384), bool).at[:, :, -3:].set(True)
  out = decode_attention.decode_attention(q, k, v, mask, 0.1)
  np.testing.assert_allclose(out, dot_product_attention(q, k, v, mask, 0.1), atol=TOLERANCE)


def test_a_row_with_no_visible_key_gives_zeros(interpret):
  q, k, v, mask = random_inputs(2, 2, 4, 2, 32, 64)
  mask = mask.at[1].set(False)
  out = decode_attention.decode_attention(q, k, v, mask, 0.2)
  np.testing.assert_array_equal(out[1], 0.0)
  assert np.isfinite(np.asarray(out)).all()


@pytest.mark.parametrize(
    "mode, q_shape, k_shape, dtype, expected",
    [
        ("interpret", (1, 1, 4, 64), (1, 128, 2, 64), jnp.float32, True),
        ("interpret", (1, 2, 4, 64), (1, 128, 2, 64), jnp.float32, False),  # not one token
        ("interpret", (1, 1, 4, 64), (1, 100, 2, 64), jnp.float32, False),  # partial block
        ("interpret", (1, 1, 4, 48), (1, 128, 2, 48), jnp.float32, False),  # head size
        ("off", (1, 1, 4, 64), (1, 128, 2, 64), jnp.bfloat16, False),
        ("auto", (1, 1, 4, 64), (1, 128, 2, 64), jnp.bfloat16, False),  # no GPU here
    ],
)
def test_applies_only_where_the_kernel_can_serve(monkeypatch, mode, q_shape, k_shape, dtype,
                                                 expected):
  monkeypatch.setattr(decode_attention, "MODE", mode)
  q, k = jnp.zeros(q_shape, dtype), jnp.zeros(k_shape, dtype)
  assert decode_attention.applies(q, k) is expected


@pytest.mark.parametrize("case", ["gemma2", "gemma3", "qwen3", "llama3_tied_mha"])
def test_greedy_decoding_through_the_kernel_matches_transformers(reference_checkpoints, interpret, case):
  folder, torch_model = reference_checkpoints[case]
  tokens, mask, _ = reference.left_padded_batch(seed=4)
  expected = reference.reference_greedy(torch_model, tokens, mask, 16)
  model = load_folder(folder, jax.make_mesh((1, 1), ("fsdp", "tp"), devices=jax.devices()[:1]))
  out = generate(model, tokens, 16, attention_mask=mask)
  np.testing.assert_array_equal(out.tokens, expected)


@pytest.mark.slow
@pytest.mark.parametrize("axis_type", [AxisType.Explicit, AxisType.Auto], ids=["explicit", "auto"])
@pytest.mark.parametrize("shape, kernel_runs", [((4, 2), True), ((2, 4), False)])
def test_decode_step_logits_on_a_mesh_equal_the_xla_path(reference_checkpoints, monkeypatch, axis_type,
                                                         shape, kernel_runs):
  """With heads and KV heads split alike over tp (8 and 2 heads, tp=2) the kernel runs per
  device under shard_map; with tp=4 the 2 KV heads are replicated and the XLA path serves."""
  folder, _ = reference_checkpoints["qwen3"]
  mesh = jax.make_mesh(shape, ("fsdp", "tp"), axis_types=(axis_type,) * 2)
  model = load_folder(folder, mesh)
  tokens, mask, _ = reference.left_padded_batch(seed=5, batch=2)
  cache = model.init_cache(2, 64)
  _, cache = model(jnp.asarray(tokens), cache=cache, attention_mask=jnp.asarray(mask))
  step = jnp.asarray([[7], [9]])
  calls = []
  kernel = decode_attention.decode_attention
  monkeypatch.setattr(decode_attention, "decode_attention",
                      lambda *a, **kw: calls.append(1) or kernel(*a, **kw))
  logits = {}
  for mode in ("off", "interpret"):
    monkeypatch.setattr(decode_attention, "MODE", mode)
    logits[mode], _ = model(step, cache=cache)
  assert bool(calls) is kernel_runs
  np.testing.assert_allclose(logits["interpret"], logits["off"], atol=TOLERANCE, rtol=0)


def test_generate_compiles_again_when_the_mode_changes(reference_checkpoints, monkeypatch):
  folder, _ = reference_checkpoints["llama3_tied_mha"]
  model = load_folder(folder, jax.make_mesh((1, 1), ("fsdp", "tp"), devices=jax.devices()[:1]))
  prompt = [[5, 6, 7]]
  monkeypatch.setattr(decode_attention, "MODE", "off")
  generate(model, prompt, 4)
  assert generate(model, prompt, 4).compile_seconds == 0  # Cached for this mode...
  monkeypatch.setattr(decode_attention, "MODE", "interpret")
  assert generate(model, prompt, 4).compile_seconds > 0  # ...but not for another.
