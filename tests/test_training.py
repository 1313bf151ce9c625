"""Training: remat modes keep the numbers and cut activation memory; full training moves
every parameter."""

from __future__ import annotations

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from tests import reference
from tunix_zoo import registry
from tunix_zoo.automodel import AutoModel
from tunix_zoo.errors import RematError
from tunix_zoo.layers.moe import load_balancing_loss
from tunix_zoo.training import next_token_loss, train


def tiny_config(case: str):
  """Our config of a tests/reference.py case, without building the PyTorch model."""
  import transformers

  config_class, _, kwargs = reference.CASES[case]
  hf = getattr(transformers, config_class)(**{**reference.BASE, **kwargs}).to_dict()
  return registry.family_for_hf_config(hf).config_class.from_hf_config(hf)


def tiny_moe_config():
  return registry.get_config("qwen3_30b_a3b").replace(
      vocab_size=reference.VOCAB, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
      num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, num_experts=4, num_experts_per_tok=2,
  )


def tokens(batch: int = 2, length: int = 17, seed: int = 0) -> jax.Array:
  return jax.random.randint(jax.random.key(seed), (batch, length), 0, reference.VOCAB)


def loss_and_grads(model: nnx.Module, batch: jax.Array, router_loss: bool = False):
  def loss_fn(model):
    if not router_loss:
      return next_token_loss(model, batch)
    c = model.config
    logits, _, router_logits = model.forward_with_router_logits(batch)
    aux = load_balancing_loss(router_logits, c.num_experts, c.num_experts_per_tok)
    return jnp.mean(jax.nn.logsumexp(logits, axis=-1)) + aux

  loss, grads = nnx.jit(nnx.value_and_grad(loss_fn))(model)
  return float(loss), jax.tree.map(np.asarray, grads)


@pytest.mark.parametrize("case", ["gemma2", "gemma3", "qwen3_moe"])
def test_remat_modes_give_the_same_loss_and_gradients(case):
  config = tiny_moe_config() if case == "qwen3_moe" else tiny_config(case)
  batch = tokens()
  results = {
      remat: loss_and_grads(
          AutoModel.from_config(config, rngs=0, remat=remat), batch, router_loss=case == "qwen3_moe"
      )
      for remat in ("none", "layer", "attention")
  }
  loss, grads = results["none"]
  for remat in ("layer", "attention"):
    other_loss, other_grads = results[remat]
    np.testing.assert_allclose(other_loss, loss, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 other_grads, grads)


def test_remat_can_be_switched_on_a_built_model():
  config = tiny_config("qwen3")
  model = AutoModel.from_config(config, rngs=0)
  batch = tokens()
  loss, grads = loss_and_grads(model, batch)
  model.remat = "layer"
  remat_loss, remat_grads = loss_and_grads(model, batch)
  assert remat_loss == pytest.approx(loss, rel=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               remat_grads, grads)


def test_unknown_remat_mode_is_a_typed_error():
  with pytest.raises(RematError, match="'full' is not a remat mode; choose one of none, layer"):
    AutoModel.from_config(tiny_config("qwen3"), remat="full")


def compiled_memory(jobs: list[dict]) -> list[dict]:
  """Memory analyses of compiled train steps, from tests/train_memory_worker.py."""
  result = subprocess.run(
      [sys.executable, "-m", "tests.train_memory_worker", json.dumps(jobs)],
      capture_output=True, text=True, timeout=600,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  return [json.loads(line) for line in result.stdout.splitlines()]


@pytest.mark.slow
def test_layer_remat_lowers_the_train_steps_peak_activation_memory():
  job = dict(mesh=[1, 1], batch=4, seq=128)
  none, layer = compiled_memory([{**job, "remat": "none"}, {**job, "remat": "layer"}])
  # Only each layer's input is kept instead of its attention scores and MLP activations.
  assert layer["temp"] < 0.5 * none["temp"]
  assert layer["argument"] == none["argument"]


def test_full_training_moves_every_parameter_and_lowers_the_loss():
  model = AutoModel.from_config(tiny_config("qwen2p5"), rngs=0)
  before = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
  batch = tokens()
  losses = train(model, iter(lambda: batch, None), optax.adamw(1e-2), steps=4)
  assert losses[-1] < losses[0]
  after = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
  unchanged = [
      path for (path, a), (_, b) in zip(nnx.to_flat_state(before), nnx.to_flat_state(after))
      if np.array_equal(a.get_value(), b.get_value())
  ]
  assert not unchanged
