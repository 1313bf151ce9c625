"""Training: remat modes keep the numbers and cut activation memory; the training memory
plan matches compiled train steps; full training moves every parameter."""

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
from tests.reference import tiny_moe_config
from tunix_zoo import registry
from tunix_zoo.automodel import AutoModel
from tunix_zoo.errors import RematError
from tunix_zoo.layers.moe import load_balancing_loss
from tunix_zoo.planning import plan_model, plan_training
from tunix_zoo.training import next_token_loss, train
from tests.train_memory_worker import tiny_config as tiny_memory_config


# Layers enough for every layer kind of a case: Gemma 2 alternates sliding and global
# attention, Gemma 3 has two sliding layers per global one. Fewer layers compile faster.
LAYERS = {"gemma3": 3}


def tiny_config(case: str):
  """Our config of a tests/reference.py case (2 layers, Gemma 3: one sliding-sliding-global
  period), without building the PyTorch model."""
  import transformers

  config_class, _, kwargs = reference.CASES[case]
  layers = LAYERS.get(case, 2)
  kwargs = {**reference.BASE, **kwargs, "num_hidden_layers": layers}
  if "layer_types" in kwargs:
    kwargs["layer_types"] = kwargs["layer_types"][:layers]
  hf = getattr(transformers, config_class)(**kwargs).to_dict()
  return registry.family_for_hf_config(hf).config_class.from_hf_config(hf)


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


@pytest.mark.slow
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


# Train steps compiled once for the memory tests: (mesh, remat, LoRA rank, batch, seq_len).
MEMORY_JOBS = [
    ((1, 1), "none", None, 4, 128),
    ((1, 1), "layer", None, 4, 128),
    ((1, 1), "layer", 8, 4, 128),
    ((4, 1), "layer", 8, 8, 128),
    ((2, 2), "none", 8, 8, 128),
]


# The worker's compiles are the file's most expensive part: its tests run in one
# pytest-xdist worker (`--dist loadgroup`), so that the module fixture runs once, not once
# in each.
memory_group = pytest.mark.xdist_group("train_memory_worker")


@pytest.fixture(scope="module")
def compiled_memory() -> list[dict]:
  """Memory analyses of the MEMORY_JOBS train steps, from tests/train_memory_worker.py."""
  jobs = [
      dict(mesh=mesh, remat=remat, lora_rank=rank, batch=batch, seq=seq)
      for mesh, remat, rank, batch, seq in MEMORY_JOBS
  ]
  result = subprocess.run(
      [sys.executable, "-m", "tests.train_memory_worker", json.dumps(jobs)],
      capture_output=True, text=True, timeout=600,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  return [json.loads(line) for line in result.stdout.splitlines()]


@pytest.mark.slow
@memory_group
def test_layer_remat_lowers_the_train_steps_peak_activation_memory(compiled_memory):
  none, layer = compiled_memory[0], compiled_memory[1]
  # Only each layer's input is kept instead of its attention scores and MLP activations.
  assert layer["temp"] < 0.5 * none["temp"]
  assert layer["argument"] == none["argument"]


@pytest.mark.slow
@memory_group
@pytest.mark.parametrize("job", range(len(MEMORY_JOBS)), ids=lambda n: str(MEMORY_JOBS[n]))
def test_training_plan_is_within_a_quarter_of_the_compiled_step(compiled_memory, job):
  mesh, remat, rank, batch, seq = MEMORY_JOBS[job]
  plan = plan_training(tiny_memory_config(), mesh, "float32", batch_size=batch, seq_len=seq,
                       remat=remat, lora_rank=rank)
  measured = compiled_memory[job]
  # Arguments are the weights, adapters and AdamW moments, counted exactly.
  held = plan.weight_bytes + plan.adapter_bytes + plan.optimizer_bytes
  assert held == pytest.approx(measured["argument"], rel=0.01)
  assert plan.activation_bytes == pytest.approx(measured["temp"], rel=0.25)
  assert plan.total_bytes == pytest.approx(measured["argument"] + measured["temp"], rel=0.25)
  # The step donates the model's and the optimizer's buffers: its outputs alias every
  # argument but the tokens, so arguments + temporaries is its peak, as the plan counts.
  assert measured["alias"] == pytest.approx(measured["argument"], rel=0.01)


def test_training_plan_of_a_large_model_takes_no_memory():
  config = registry.get_config("qwen3_8b")
  full = plan_training(config, (1, 4), "bfloat16", batch_size=8, seq_len=2048)
  lora = plan_training(config, (1, 4), "bfloat16", batch_size=8, seq_len=2048, remat="layer",
                       lora_rank=32)
  assert full.weight_bytes == lora.weight_bytes == plan_model(config, (1, 4)).bytes_per_device
  assert full.adapter_bytes == 0 and full.optimizer_bytes == 2 * full.weight_bytes
  assert full.trained_parameters == 8_190_735_360
  # Rank 32 on 7 projections of 36 layers: 32 * 36 * (in + out summed over them).
  assert lora.trained_parameters == 32 * 36 * (2 * 4096 + 2 * (4096 + 1024) + 2 * 4096
                                               + 3 * (4096 + 12288))
  assert lora.optimizer_bytes < 0.1 * lora.weight_bytes
  assert lora.activation_bytes < 0.2 * full.activation_bytes


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


@pytest.mark.slow
@pytest.mark.parametrize("axis_type", ["Auto", "Explicit"])
def test_training_on_a_mesh_compiles_the_step_once(axis_type, caplog):
  # The optimizer's step count starts on one device and comes back on the mesh; unless it
  # starts there, the second step retraces and recompiles.
  mesh = jax.make_mesh((2, 2), ("fsdp", "tp"),
                       axis_types=(getattr(jax.sharding.AxisType, axis_type),) * 2)
  model = AutoModel.from_config(tiny_config("qwen2p5"), mesh, rngs=0)
  batch = tokens(batch=4)
  with jax.log_compiles(True), caplog.at_level("WARNING"):
    losses = train(model, iter(lambda: batch, None), optax.adamw(1e-2), steps=3)
  compiles = [r for r in caplog.records if "Compiling" in r.getMessage()
              and "train_step" in r.getMessage()]
  assert len(compiles) == 1, [r.getMessage()[:80] for r in compiles]
  assert losses[-1] < losses[0]
