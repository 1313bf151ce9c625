"""Qwen3-MoE against transformers on tiny random checkpoints.

Every case is a ``Qwen3MoeForCausalLM`` saved with ``save_pretrained`` (one tensor per
expert; tests/moe_reference.py) and loaded with ``load_folder``. Tolerances as
tests/models/test_parity.py: float32 logits within 1e-4 over real tokens of a left-padded
batch, greedy decoding token-identical to ``generate``; the auxiliary load-balancing loss
equals transformers' ``aux_loss``. The MoE layer on its own: tests/layers/test_moe.py.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, PartitionSpec

from tests import reference
from tests.moe_reference import CASES, make_checkpoint
from tests.reference import MAX_ABS, greedy, mesh_2x4, one_device_mesh
from tunix_zoo.automodel import load_folder
from tunix_zoo.checkpoint.reader import CheckpointFiles
from tunix_zoo.errors import CheckpointError
from tunix_zoo.layers.moe import GATHER_MAX_COPIES_PER_EXPERT, MoE, load_balancing_loss
from tunix_zoo.models.qwen3.params import QWEN3_PARAMS

NEW_TOKENS = 24


@pytest.fixture(scope="module")
def models(moe_checkpoints):
  """case -> our model of the case's checkpoint on one device, loaded once."""
  return {case: load_folder(moe_checkpoints[case][0], one_device_mesh()) for case in CASES}


_jitted_forward = nnx.jit(lambda m, t, k: m.forward_with_router_logits(t, attention_mask=k))


def forward_with_router_logits(model, tokens: np.ndarray, mask: np.ndarray):
  """Jitted: compiling the whole forward is faster than running it op by op."""
  return _jitted_forward(model, jnp.asarray(tokens), jnp.asarray(mask))


def real(mask: np.ndarray) -> np.ndarray:
  return mask.astype(bool)


def sparse_layers(model) -> list[int]:
  return [i for i, layer in enumerate(model.layers) if isinstance(layer.mlp, MoE)]


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_and_aux_loss_match_transformers(moe_checkpoints, models, case):
  import torch

  _, torch_model = moe_checkpoints[case]
  model = models[case]
  cfg = model.config
  assert sparse_layers(model) == [i for i in range(cfg.num_layers) if cfg.is_sparse_layer(i)]
  assert 0 < len(sparse_layers(model)) <= cfg.num_layers
  tokens, mask, positions = reference.left_padded_batch()
  with torch.no_grad():
    expected = torch_model(
        input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask),
        position_ids=torch.tensor(positions), output_router_logits=True,
    )
  logits, cache, router_logits = forward_with_router_logits(model, tokens, mask)
  assert cache is None
  diff = np.abs(np.asarray(logits) - expected.logits.numpy())[real(mask)].max()
  assert diff <= MAX_ABS, f"{case}: max abs logit diff {diff}"
  plain, _ = nnx.jit(lambda m, t, k: m(t, attention_mask=k))(
      model, jnp.asarray(tokens), jnp.asarray(mask)
  )
  np.testing.assert_allclose(np.asarray(plain), np.asarray(logits), atol=1e-6)

  assert len(router_logits) == len(expected.router_logits)
  for ours, theirs in zip(router_logits, expected.router_logits):
    assert ours.shape == tokens.shape + (cfg.num_experts,)
    # Padding rows' hidden states mean nothing (and differ); the loss masks them.
    theirs = theirs.numpy().reshape(ours.shape)
    np.testing.assert_allclose(np.asarray(ours)[real(mask)], theirs[real(mask)], atol=MAX_ABS)
  aux = load_balancing_loss(
      router_logits, cfg.num_experts, cfg.num_experts_per_tok, jnp.asarray(mask)
  )
  np.testing.assert_allclose(float(aux), float(expected.aux_loss), rtol=1e-5)


@pytest.mark.parametrize("case", sorted(CASES))
def test_greedy_decode_matches_generate(moe_checkpoints, models, case):
  _, torch_model = moe_checkpoints[case]
  tokens, mask, _ = reference.left_padded_batch(seed=1)
  expected = reference.reference_greedy(torch_model, tokens, mask, NEW_TOKENS)
  np.testing.assert_array_equal(greedy(models[case], tokens, mask, NEW_TOKENS), expected)


def test_one_row_decode_gathers_experts_and_matches_generate(moe_checkpoints, models):
  _, torch_model = moe_checkpoints["e16_k3_step2_norm"]
  model = models["e16_k3_step2_norm"]
  cfg = model.config
  # One token's copies are few enough for Experts to gather their matrices.
  assert cfg.num_experts_per_tok <= GATHER_MAX_COPIES_PER_EXPERT * cfg.num_experts
  tokens, mask, _ = reference.left_padded_batch(seed=5, batch=1)
  expected = reference.reference_greedy(torch_model, tokens, mask, NEW_TOKENS)
  np.testing.assert_array_equal(greedy(model, tokens, mask, NEW_TOKENS), expected)


def test_expert_stacks_hold_the_checkpoint_tensors_bit_exactly(moe_checkpoints, models):
  """Each stack's slice ``e`` is the tensor that ``stacked_keys`` names, so export splits it."""
  folder, _ = moe_checkpoints["e6_k2_mlp_only"]
  model = models["e6_k2_mlp_only"]
  with CheckpointFiles(folder) as ckpt:
    for i in sparse_layers(model):
      for proj in ("gate_proj", "up_proj", "down_proj"):
        path = f"layers.{i}.mlp.experts.{proj}"
        stack = np.asarray(getattr(model.layers[i].mlp.experts, proj)[...])
        keys = QWEN3_PARAMS.stacked_keys(path, stack.shape[0])
        assert keys == [f"model.layers.{i}.mlp.experts.{e}.{proj}.weight" for e in range(6)]
        for e, key in enumerate(keys):
          assert QWEN3_PARAMS.module_path(key) == path
          assert QWEN3_PARAMS.stack_index(key) == e
          np.testing.assert_array_equal(stack[e], ckpt.read(key))
    assert QWEN3_PARAMS.stacked_keys("layers.0.mlp.gate.weight", 6) is None
    np.testing.assert_array_equal(
        np.asarray(model.layers[0].mlp.gate.weight[...]),
        ckpt.read(QWEN3_PARAMS.checkpoint_key("layers.0.mlp.gate.weight")),
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "case, axis_type",
    [
        ("e6_k2_mlp_only", AxisType.Explicit),
        ("e6_k2_mlp_only", AxisType.Auto),
        ("e5_k4_tied", AxisType.Explicit),
    ],
    ids=["e6_explicit", "e6_auto", "e5_explicit"],
)
def test_mesh_2x4_equals_one_device(moe_checkpoints, case, axis_type):
  # Against transformers directly, which the one-device model matches (the tests above):
  # a second, unsharded run here would only add compiles.
  import torch

  folder, torch_model = moe_checkpoints[case]
  mesh = mesh_2x4(axis_type)
  sharded = load_folder(folder, mesh)
  moe = sharded.layers[sparse_layers(sharded)[0]].mlp
  # Expert stacks shard over fsdp when it divides the expert count, else fsdp moves on
  # to the embedding axis.
  if sharded.config.num_experts % 2 == 0:
    gate_spec, down_spec = PartitionSpec("fsdp", "tp", None), PartitionSpec("fsdp", None, "tp")
  else:
    gate_spec, down_spec = PartitionSpec(None, "tp", "fsdp"), PartitionSpec(None, "fsdp", "tp")
  assert moe.experts.gate_proj[...].sharding.spec == gate_spec
  assert moe.experts.down_proj[...].sharding.spec == down_spec
  assert moe.experts.up_proj[...].sharding.mesh == mesh

  tokens, mask, positions = reference.left_padded_batch(seed=3, batch=2)
  with torch.no_grad():
    expected = torch_model(
        input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask),
        position_ids=torch.tensor(positions), output_router_logits=True,
    )
  got, _, router = forward_with_router_logits(sharded, tokens, mask)
  assert np.abs(np.asarray(got) - expected.logits.numpy())[real(mask)].max() <= MAX_ABS
  for ours, theirs in zip(router, expected.router_logits, strict=True):
    # Padding rows' hidden states mean nothing (and differ from transformers').
    theirs = theirs.numpy().reshape(ours.shape)
    np.testing.assert_allclose(np.asarray(ours)[real(mask)], theirs[real(mask)], atol=MAX_ABS)
  np.testing.assert_array_equal(
      greedy(sharded, tokens, mask, 8), reference.reference_greedy(torch_model, tokens, mask, 8)
  )


def test_sharded_checkpoint_in_hub_spelling(tmp_path):
  torch_model = make_checkpoint("e16_k3_step2_norm", tmp_path, max_shard_size="20KB")
  reference.to_hub_spelling(tmp_path)
  assert (tmp_path / "model.safetensors.index.json").exists()
  tokens, mask, positions = reference.left_padded_batch(seed=4)
  expected = reference.reference_logits(torch_model, tokens, mask, positions)
  model = load_folder(tmp_path, one_device_mesh())
  logits, _, _ = forward_with_router_logits(model, tokens, mask)
  assert np.abs(np.asarray(logits) - expected)[real(mask)].max() <= MAX_ABS


@pytest.mark.parametrize(
    "change, message",
    [
        # transformers 5 writes num_local_experts; published configs num_experts.
        ({"num_local_experts": 5}, r"mlp\.gate\.weight.* has shape \(6, 64\)"),
        ({"num_experts": 7, "num_local_experts": 7}, r"looked for .*experts\.6\.\w+_proj"),
        ({"moe_intermediate_size": 12}, "has shape"),
    ],
    ids=["fewer_experts", "more_experts", "expert_width"],
)
def test_config_disagreeing_with_expert_tensors_is_refused(moe_checkpoints, tmp_path, change,
                                                           message):
  folder, _ = moe_checkpoints["e6_k2_mlp_only"]
  for path in folder.iterdir():
    (tmp_path / path.name).symlink_to(path)
  config = json.loads((folder / "config.json").read_text())
  (tmp_path / "config.json").unlink()
  (tmp_path / "config.json").write_text(json.dumps({**config, **change}))
  with pytest.raises(CheckpointError, match=message):
    load_folder(tmp_path, one_device_mesh())


def test_router_logits_forward_draws_a_fresh_dropout_mask_on_explicit_meshes():
  # forward_with_router_logits runs on a functional copy of the model on Explicit meshes;
  # it must write the advanced dropout RNG back, or every call reuses one mask.
  from tests.reference import tiny_moe_config
  from tunix_zoo.automodel import AutoModel
  from tunix_zoo.lora import apply_lora, lora_layers

  mesh = jax.make_mesh((1, 1), ("fsdp", "tp"), axis_types=(AxisType.Explicit,) * 2,
                       devices=jax.devices()[:1])
  model = AutoModel.from_config(tiny_moe_config(), mesh)
  apply_lora(model, rank=2, alpha=2.0, dropout=0.5, module_path=".*q_proj",
             rngs=nnx.Rngs(params=0, dropout=1))
  for layer in lora_layers(model).values():
    layer.lora_b.set_value(jnp.ones_like(layer.lora_b.get_value()))
  tokens = jnp.arange(3, 15)[None]
  # Jitted (one compile for both calls): nnx.jit hands the model's variables in and the
  # ones the call wrote back out, so a missing write-back still repeats the mask.
  forward = nnx.jit(lambda m, t: m.forward_with_router_logits(t))
  first, _, routers = forward(model, tokens)
  second, _, _ = forward(model, tokens)
  assert len(routers) == model.config.num_layers
  assert not np.allclose(np.asarray(first), np.asarray(second))
