"""cuDNN flash attention: where it says it can run, what a forced setting does where it
cannot, and on a GPU its result against XLA's causal attention."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tunix_zoo.errors import KernelError
from tunix_zoo.kernels import flash_attention
from tunix_zoo.layers.attention import dot_product_attention

GPU = jax.default_backend() == "gpu"


def qkv(dtype, batch=2, length=128, heads=4, kv_heads=2, head_dim=64):
  keys = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(keys[0], (batch, length, heads, head_dim), dtype)
  k, v = (jax.random.normal(key, (batch, length, kv_heads, head_dim), dtype) for key in keys[1:])
  return q, k, v


def test_why_unsupported_names_the_soft_cap_the_backend_and_the_dtype():
  q = jnp.zeros((1, 8, 4, 64), jnp.float32)
  assert "soft-capped" in flash_attention.why_unsupported(q, softcap=50.0)
  if not GPU:
    assert "cuDNN needs a GPU" in flash_attention.why_unsupported(q)
  else:
    assert "float32 queries" in flash_attention.why_unsupported(q)
  assert not flash_attention.supports(q)


@pytest.mark.skipif(GPU, reason="checks the refusal off a GPU")
def test_a_forced_cudnn_raises_off_a_gpu_and_auto_leaves_it_to_xla():
  q, k, v = qkv(jnp.bfloat16, length=16)
  with pytest.raises(KernelError, match="flash_attention='cudnn'.*cpu backend"):
    flash_attention.attend(q, k, v, 0.125, None, setting="cudnn")
  for setting in ("auto", "xla"):
    assert flash_attention.attend(q, k, v, 0.125, None, setting=setting) is None


@pytest.mark.skipif(not GPU, reason="cuDNN runs on GPUs")
@pytest.mark.parametrize("window", [None, 32])
def test_cudnn_equals_xla_causal_attention(window):
  q, k, v = qkv(jnp.bfloat16)
  ours = flash_attention.attend(q, k, v, 0.125, window, setting="cudnn")
  expected = dot_product_attention(q, k, v, None, 0.125, None, window)
  ours, expected = np.asarray(ours, np.float32), np.asarray(expected, np.float32)
  np.testing.assert_allclose(ours, expected, atol=2e-2 * np.abs(expected).max())
