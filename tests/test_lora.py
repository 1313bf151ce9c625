"""LoRA: adapters on the paths a regex names, sharded like their weights; training moves
only them; merging and PEFT export reproduce the adapted model's logits in transformers."""

from __future__ import annotations

import functools
import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import AxisType

from tests import reference
from tunix_zoo.automodel import AutoModel, load_folder
from tunix_zoo.checkpoint.export import save_pretrained
from tunix_zoo.errors import ExportError, LoraError
from tunix_zoo.layers.basic import Linear
from tunix_zoo.layers.lora import LoRALinear
from tunix_zoo.lora import apply_lora, lora_layers, merge_lora, save_lora_adapter
from tunix_zoo.training import train

USERS_PATHS = ".*q_proj|.*k_proj|.*v_proj|.*o_proj|.*gate_proj|.*up_proj|.*down_proj"


def randomise_adapters(model: nnx.Module, scale: float = 0.05) -> None:
  """Nonzero ``lora_b`` everywhere (fresh adapters are the identity), in place."""
  for n, layer in enumerate(lora_layers(model).values()):
    value = layer.lora_b.get_value()
    noise = scale * jax.random.normal(jax.random.key(n), value.shape, value.dtype)
    layer.lora_b.set_value(jax.device_put(noise, value.sharding))


@functools.partial(jax.jit, static_argnums=0)
def jitted_logits(graphdef, state, tokens, mask):
  return nnx.merge(graphdef, state)(tokens, attention_mask=mask)[0]


def logits_of(model, tokens, mask=None, *, jit=True):
  """The model's logits; jitted by default: one compile of the forward rather than one
  per eager op (a few hundred, again for every mesh). The jitted call reads the model's
  state and gives nothing back, so the variables keep their placement."""
  tokens, mask = jnp.asarray(tokens), None if mask is None else jnp.asarray(mask)
  if jit:
    return np.asarray(jitted_logits(*nnx.split(model), tokens, mask))
  out, _ = model(tokens, attention_mask=mask)
  return np.asarray(out)


@pytest.mark.slow
@pytest.mark.parametrize("axis_type", [AxisType.Explicit, AxisType.Auto], ids=["explicit", "auto"])
def test_fresh_adapters_keep_the_logits_bit_exact_and_shard_like_their_weights(
    reference_checkpoints, axis_type
):
  folder, _ = reference_checkpoints["qwen3"]
  mesh = jax.make_mesh((2, 4), ("fsdp", "tp"), axis_types=(axis_type,) * 2)
  model = load_folder(folder, mesh)
  tokens, mask, _ = reference.left_padded_batch()
  base = logits_of(model, tokens, mask)
  apply_lora(model, rank=8, alpha=16.0, module_path=USERS_PATHS)
  np.testing.assert_array_equal(logits_of(model, tokens, mask), base)

  layers = lora_layers(model)
  assert len(layers) == 7 * 3
  for path, layer in layers.items():
    weight_spec = tuple(layer.weight.get_value().sharding.spec) + (None, None)
    a, b = layer.lora_a.get_value(), layer.lora_b.get_value()
    assert a.shape == (8, layer.weight.shape[1]) and b.shape == (layer.weight.shape[0], 8)
    assert a.sharding.mesh == mesh and b.sharding.mesh == mesh
    # lora_a shares the weight's in-axis sharding, lora_b its out-axis sharding.
    assert tuple(a.sharding.spec) + (None,) * 2 == (None, weight_spec[1], None, None), path
    assert tuple(b.sharding.spec) + (None,) * 2 == (weight_spec[0], None, None, None), path
    assert layer.lora_a.get_metadata()["logical_axes"][0] is None
  assert layers["layers.0.attn.q_proj"].lora_b.get_value().sharding.spec[0] == "tp"
  assert layers["layers.0.mlp.down_proj"].lora_a.get_value().sharding.spec[1] == "tp"


def test_module_path_is_a_full_match_over_dotted_paths(reference_checkpoints):
  folder, _ = reference_checkpoints["qwen3"]
  model = load_folder(folder)
  apply_lora(model, rank=2, alpha=2.0, module_path=r".*\.(q|v)_proj|layers\.0\.mlp\.up_proj")
  assert sorted(lora_layers(model)) == [
      "layers.0.attn.q_proj", "layers.0.attn.v_proj", "layers.0.mlp.up_proj",
      "layers.1.attn.q_proj", "layers.1.attn.v_proj",
      "layers.2.attn.q_proj", "layers.2.attn.v_proj",
  ]


def test_a_regex_matching_nothing_names_the_available_paths(reference_checkpoints):
  folder, _ = reference_checkpoints["qwen3"]
  model = load_folder(folder)
  # A search would find q_proj; a full match needs the path's start too.
  with pytest.raises(LoraError, match=r"matches none of .* layers\.\{i\}\.attn\.q_proj, .*lm_head"):
    apply_lora(model, rank=2, alpha=2.0, module_path="attn.q_proj")
  assert not lora_layers(model)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(rank=0, alpha=1.0), "rank must be a positive integer"),
        (dict(rank=2, alpha=0.0), "alpha must be a positive number"),
        (dict(rank=2, alpha=1.0, dropout=1.0), r"dropout must be in \[0, 1\)"),
        (dict(rank=2, alpha=1.0, module_path="(q_proj"), "is not a regular expression"),
    ],
)
def test_unusable_settings_are_lora_errors(reference_checkpoints, kwargs, message):
  model = load_folder(reference_checkpoints["qwen3"][0])
  with pytest.raises(LoraError, match=message):
    apply_lora(model, **kwargs)


def test_adapting_a_layer_twice_or_merging_without_adapters_is_a_lora_error(reference_checkpoints):
  model = load_folder(reference_checkpoints["qwen3"][0])
  with pytest.raises(LoraError, match="has no LoRA adapters"):
    merge_lora(model)
  apply_lora(model, rank=2, alpha=2.0, module_path=".*q_proj")
  with pytest.raises(LoraError, match="already have LoRA adapters; merge_lora"):
    apply_lora(model, rank=2, alpha=2.0, module_path=".*_proj")
  # Disjoint layers may get adapters of their own.
  apply_lora(model, rank=4, alpha=2.0, module_path=".*v_proj")
  assert len(lora_layers(model)) == 6


def test_adamw_trains_only_the_adapters(reference_checkpoints):
  model = load_folder(reference_checkpoints["llama3"][0])
  apply_lora(model, rank=4, alpha=8.0, module_path=USERS_PATHS)
  frozen = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))
  frozen_before = jax.tree.map(np.array, nnx.state(model, frozen))
  adapters_before = jax.tree.map(np.array, nnx.state(model, nnx.LoRAParam))
  batch = jax.random.randint(jax.random.key(0), (2, 17), 0, reference.VOCAB)
  losses = train(model, iter(lambda: batch, None), optax.adamw(1e-2), steps=4, wrt=nnx.LoRAParam)
  assert losses[-1] < losses[0]
  frozen_after = jax.tree.map(np.array, nnx.state(model, frozen))
  for (path, before), (_, after) in zip(
      nnx.to_flat_state(frozen_before), nnx.to_flat_state(frozen_after)
  ):
    np.testing.assert_array_equal(after.get_value(), before.get_value(), err_msg=str(path))
  adapters_after = nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))
  moved = [
      not np.array_equal(after.get_value(), before.get_value())
      for (_, before), (_, after) in zip(nnx.to_flat_state(adapters_before), adapters_after)
  ]
  # Two adapter matrices for each of a layer's seven projections, in every layer.
  assert all(moved) and len(moved) == 2 * 7 * model.config.num_layers


@pytest.mark.slow
@pytest.mark.parametrize("axis_type", [AxisType.Explicit, AxisType.Auto], ids=["explicit", "auto"])
def test_merge_folds_the_adapters_into_the_weights(reference_checkpoints, axis_type):
  mesh = jax.make_mesh((2, 4), ("fsdp", "tp"), axis_types=(axis_type,) * 2)
  model = load_folder(reference_checkpoints["qwen2p5"][0], mesh)
  shardings = {
      path: module.weight.get_value().sharding
      for path, module in nnx.iter_modules(model) if isinstance(module, Linear)
  }
  apply_lora(model, rank=4, alpha=8.0, module_path=".*")
  randomise_adapters(model)
  tokens, mask, _ = reference.left_padded_batch()
  adapted = logits_of(model, tokens, mask)
  assert merge_lora(model) is model
  assert not lora_layers(model) and not nnx.state(model, nnx.LoRAParam)
  assert not any(isinstance(m, LoRALinear) for _, m in nnx.iter_modules(model))
  np.testing.assert_allclose(logits_of(model, tokens, mask), adapted, atol=2e-5)
  for path, module in nnx.iter_modules(model):
    if isinstance(module, Linear):
      assert module.weight.get_value().sharding == shardings[path]


@pytest.mark.parametrize(
    "case, module_path",
    [("qwen3", USERS_PATHS + "|lm_head"), ("qwen2p5", ".*"), ("gemma3", USERS_PATHS)],
)
def test_peft_loads_the_saved_adapter_with_the_same_logits(reference_checkpoints, tmp_path, case,
                                                            module_path):
  peft = pytest.importorskip("peft")
  folder, hf_model = reference_checkpoints[case]
  model = load_folder(folder)
  apply_lora(model, rank=4, alpha=8.0, module_path=module_path)
  randomise_adapters(model)
  tokens, mask, positions = reference.left_padded_batch()
  ours = logits_of(model, tokens, mask)
  out = save_lora_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(folder))

  config = json.loads((out / "adapter_config.json").read_text())
  assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8.0
  assert "model.layers.0.self_attn.q_proj" in config["target_modules"]
  peft_model = peft.PeftModel.from_pretrained(hf_model, out).eval()
  try:
    reference_logits = reference.reference_logits(peft_model, tokens, mask, positions)
    with peft_model.disable_adapter():
      base_logits = reference.reference_logits(peft_model, tokens, mask, positions)
  finally:
    peft_model.unload()  # The module-scoped transformers model stays the base model.
  real = mask.astype(bool)
  np.testing.assert_allclose(ours[real], reference_logits[real], atol=1e-4)
  # The adapters matter: PEFT loaded every one of them.
  assert np.abs(base_logits[real] - reference_logits[real]).max() > 0.05


def test_adapter_keys_follow_peft_and_the_family_key_map(reference_checkpoints, tmp_path):
  from safetensors.numpy import load_file

  model = load_folder(reference_checkpoints["qwen3"][0])
  apply_lora(model, rank=4, alpha=4.0, module_path=r"layers\.1\.(attn\.o_proj|mlp\.gate_proj)")
  out = save_lora_adapter(model, tmp_path / "adapter")
  tensors = load_file(out / "adapter_model.safetensors")
  assert {k: v.shape for k, v in tensors.items()} == {
      "base_model.model.model.layers.1.self_attn.o_proj.lora_A.weight": (4, 8 * 16),
      "base_model.model.model.layers.1.self_attn.o_proj.lora_B.weight": (64, 4),
      "base_model.model.model.layers.1.mlp.gate_proj.lora_A.weight": (4, 64),
      "base_model.model.model.layers.1.mlp.gate_proj.lora_B.weight": (96, 4),
  }
  with pytest.raises(ExportError, match="already exists and is not empty"):
    save_lora_adapter(model, out)
  save_lora_adapter(model, out, overwrite=True)


def test_merged_export_loads_in_transformers_with_the_adapted_logits(reference_checkpoints, tmp_path):
  import torch
  import transformers

  folder, _ = reference_checkpoints["llama3"]
  mesh = jax.make_mesh((2, 4), ("fsdp", "tp"))
  model = load_folder(folder, mesh)
  apply_lora(model, rank=4, alpha=8.0, module_path=USERS_PATHS)
  randomise_adapters(model)
  tokens, mask, positions = reference.left_padded_batch()
  adapted = logits_of(model, tokens, mask)
  with pytest.raises(ExportError, match="has LoRA adapters.*merge_lora"):
    save_pretrained(model, tmp_path / "unmerged")
  out = save_pretrained(merge_lora(model), tmp_path / "merged")
  hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  real = mask.astype(bool)
  np.testing.assert_allclose(
      reference.reference_logits(hf, tokens, mask, positions)[real], adapted[real], atol=1e-4
  )


@pytest.mark.slow
def test_dropout_acts_in_training_and_not_after_eval(reference_checkpoints):
  model = load_folder(reference_checkpoints["qwen3"][0])
  apply_lora(model, rank=4, alpha=8.0, dropout=0.5, rngs=nnx.Rngs(params=0, dropout=1))
  randomise_adapters(model, scale=0.5)
  tokens = np.arange(3, 15)[None]
  # Eager calls: outside a trace the functional copy's RNG counts must come back too.
  first, second = logits_of(model, tokens, jit=False), logits_of(model, tokens, jit=False)
  # A fresh dropout mask per call, also where the default mesh's Explicit axes make the
  # forward run on a functional copy of the model.
  assert not np.allclose(first, second)
  model.eval()
  evaluated = logits_of(model, tokens, jit=False)
  np.testing.assert_array_equal(logits_of(model, tokens, jit=False), evaluated)


def test_moe_experts_matched_by_the_regex_are_reported(caplog):
  from tests.reference import tiny_moe_config

  model = AutoModel.from_config(tiny_moe_config())
  with caplog.at_level(logging.WARNING, logger="tunix_zoo.lora"):
    apply_lora(model, rank=2, alpha=2.0, module_path=USERS_PATHS)
  assert "not Linear layers and get no adapters" in caplog.text
  assert "layers.{i}.mlp.experts.gate_proj" in caplog.text
  assert "layers.0.attn.q_proj" in lora_layers(model)
