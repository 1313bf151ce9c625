"""The attention layer on its own: masks, XLA's attention against a plain NumPy softmax
(grouped-query, windows, soft-capping), cached decoding against the full forward, and
the kernel policy it dispatches by."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tunix_zoo.config import DecoderConfig
from tunix_zoo.kernels import KernelPolicy
from tunix_zoo.layers.attention import Attention, attention_masks, dot_product_attention

TOLERANCE = 1e-5  # float32 max-abs


def test_masks_hide_padding_the_future_and_keys_beyond_the_window():
  key_valid = jnp.array([[False, True, True, True, True]])
  masks = attention_masks(jnp.arange(5), key_valid, {None, 2})
  causal = np.tril(np.ones((5, 5), bool))
  np.testing.assert_array_equal(masks[None][0], causal & [False, True, True, True, True])
  # Window 2: the query's own slot and the one before.
  np.testing.assert_array_equal(masks[2][0], masks[None][0] & np.triu(np.ones((5, 5), bool), -1))
  full = jnp.ones((1, 5, 5), bool).at[0, 0, 4].set(False)
  # A full [B, T, S] mask replaces causality and padding; the window still applies.
  replaced = attention_masks(jnp.arange(5), key_valid, {None, 2}, full_mask=full)
  np.testing.assert_array_equal(replaced[None], full)
  assert not bool(replaced[2][0, 0, 4]) and bool(replaced[2][0, 4, 3])


def numpy_attention(q, k, v, mask, scale, softcap=None):
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  groups = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, groups, axis=2), np.repeat(v, groups, axis=2)
  logits = np.einsum("btnh,bsnh->bnts", q, k) * scale
  if softcap is not None:
    logits = np.tanh(logits / softcap) * softcap
  logits = np.where(np.asarray(mask)[:, None], logits, -np.inf)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  return np.einsum("bnts,bsnh->btnh", probs, v)


@pytest.mark.parametrize("softcap", [None, 20.0], ids=["plain", "softcap"])
@pytest.mark.parametrize("window", [None, 3], ids=["full", "window3"])
def test_xla_attention_equals_a_numpy_softmax(softcap, window):
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.standard_normal((2, 6, 4, 8)), jnp.float32)
  k, v = (jnp.asarray(rng.standard_normal((2, 6, 2, 8)), jnp.float32) for _ in range(2))
  distance = np.arange(6)[:, None] - np.arange(6)[None, :]
  causal = (distance >= 0) & (distance < (window or 6))
  mask = np.broadcast_to(causal, (2, 6, 6)).copy()
  mask[1, :, :2] = False  # Row 1 is left-padded by two.
  mask[1, :2, :2] = np.eye(2, dtype=bool)  # Padding queries see themselves only.
  expected = numpy_attention(q, k, v, mask, 0.3, softcap)
  ours = dot_product_attention(q, k, v, jnp.asarray(mask), 0.3, softcap, window)
  np.testing.assert_allclose(ours, expected, atol=TOLERANCE)
  # No mask array: plain causal attention (within the window).
  ours = dot_product_attention(q, k, v, None, 0.3, softcap, window)
  np.testing.assert_allclose(ours, numpy_attention(q, k, v, np.broadcast_to(causal, (2, 6, 6)),
                                                   0.3, softcap), atol=TOLERANCE)


def tiny_config(**changes) -> DecoderConfig:
  return DecoderConfig(vocab_size=32, hidden_size=32, num_layers=1, num_heads=4,
                       num_kv_heads=2, head_dim=16, intermediate_size=64, qk_norm=True,
                       **changes)


@pytest.fixture(scope="module")
def layers():
  """name -> Attention: Qwen3-like (QK-norm), and Gemma 2-like (window 4, soft-cap)."""
  gemma2 = tiny_config(attn_logit_softcap=30.0, sliding_window=4,
                       layer_types=("sliding_attention",))
  return {name: Attention(config, 0, rngs=nnx.Rngs(0))
          for name, config in (("qwen3", tiny_config()), ("gemma2", gemma2))}


def run(layer, x, positions, masks, cache, index):
  return nnx.jit(lambda layer, *a: layer(*a))(layer, x, positions, masks, cache, index)


@pytest.mark.parametrize("name", ["qwen3", "gemma2"])
def test_decoding_through_the_cache_equals_the_full_forward(layers, name):
  layer = layers[name]
  length, slots = 7, 64
  x = jax.random.normal(jax.random.key(1), (2, length, 32))
  positions = jnp.broadcast_to(jnp.arange(length), (2, length))
  full, _ = run(layer, x, positions, {layer.window: None}, None, 0)

  cache = {n: jnp.zeros((2, slots, 2, 16)) for n in ("k", "v")}
  valid = jnp.zeros((2, slots), bool)
  steps = [(0, 4), (4, 5), (5, 6), (6, 7)]  # A prefill of four, then one token at a time.
  outputs = []
  for start, end in steps:
    valid = valid.at[:, start:end].set(True)
    masks = attention_masks(jnp.arange(start, end), valid, {layer.window})
    out, cache = run(layer, x[:, start:end], positions[:, start:end], masks, cache, start)
    outputs.append(out)
  np.testing.assert_allclose(jnp.concatenate(outputs, axis=1), full, atol=TOLERANCE)


def test_a_decode_step_runs_the_kernel_the_policy_names(layers):
  """The same step with the decode kernel in Pallas's interpreter and with XLA's path."""
  config = tiny_config()
  x = jax.random.normal(jax.random.key(2), (2, 1, 32))
  cache = {n: jax.random.normal(jax.random.key(3), (2, 64, 2, 16)) for n in ("k", "v")}
  masks = attention_masks(jnp.array([9]), jnp.arange(64)[None].repeat(2, 0) < 10, {None})
  outputs = {}
  for setting in ("interpret", "xla"):
    layer = Attention(config, 0, rngs=nnx.Rngs(0),
                      kernel_policy=KernelPolicy(decode_attention=setting))
    step = lambda x, cache: layer(x, jnp.full((2, 1), 9), masks, cache, 9)  # noqa: E731
    assert ("pallas_call" in str(jax.make_jaxpr(step)(x, cache))) is (setting == "interpret")
    outputs[setting], _ = step(x, cache)
  np.testing.assert_allclose(outputs["interpret"], outputs["xla"], atol=TOLERANCE)
