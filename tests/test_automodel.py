"""AutoModel on local folders: config.json decides, presets are cross-checked, bad
checkpoints give typed errors, from_config creates sharded random models."""

from __future__ import annotations

import json
import logging
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, PartitionSpec

from tests import reference
from tests.reference import MAX_ABS
from tunix_zoo import registry
from tunix_zoo.automodel import AutoModel, ModelSource, load_folder
from tunix_zoo.checkpoint.reader import CheckpointFiles
from tunix_zoo.checkpoint.writer import write_safetensors
from tunix_zoo.errors import (
    CheckpointError, ConfigMismatchError, SourceError, UnknownModelError,
)
from tunix_zoo.models.qwen3.config import Qwen3Config



@pytest.fixture(scope="module")
def qwen3_dir(reference_checkpoints):
  """(folder, transformers model) of the session's qwen3 checkpoint: copy before changing."""
  return reference_checkpoints["qwen3"]


def copy_of(folder, tmp_path):
  target = tmp_path / "ckpt"
  shutil.copytree(folder, target)
  return target


def mesh_1x1():
  return jax.make_mesh((1, 1), ("fsdp", "tp"), devices=jax.devices()[:1])


# Compiled once per model structure: eagerly, each of the model's operations compiles alone.
_forward = nnx.jit(lambda model, tokens, mask: model(tokens, attention_mask=mask)[0])
_forward_unpadded = nnx.jit(lambda model, tokens: model(tokens)[0])


def logits_of(model, seed=0):
  tokens, mask, _ = reference.left_padded_batch(seed)
  logits = _forward(model, jnp.asarray(tokens), jnp.asarray(mask))
  return np.asarray(logits), mask.astype(bool)


def test_folder_as_model_id_and_local_source_give_the_reference_logits(qwen3_dir):
  folder, torch_model = qwen3_dir
  tokens, mask, positions = reference.left_padded_batch()
  expected = reference.reference_logits(torch_model, tokens, mask, positions)
  by_id, path = AutoModel.from_pretrained(str(folder), mesh_1x1())
  assert path == str(folder)
  by_source, _ = AutoModel.from_pretrained(
      None, mesh_1x1(), model_source=ModelSource.LOCAL, model_path=str(folder)
  )
  for model in (by_id, by_source):
    got, real = logits_of(model)
    assert np.abs(got - expected)[real].max() <= MAX_ABS


def test_fine_tune_id_naming_no_preset_loads_by_config_json(qwen3_dir):
  folder, _ = qwen3_dir
  model, _ = AutoModel.from_pretrained(
      "acme/sft-run-42", mesh_1x1(), model_source="local", model_path=str(folder)
  )
  assert type(model).__name__ == "Qwen3ForCausalLM"
  config_json = json.loads((folder / "config.json").read_text())
  assert model.config.num_layers == config_json["num_hidden_layers"]


def test_preset_that_disagrees_with_config_json_is_an_error(qwen3_dir):
  folder, _ = qwen3_dir
  with pytest.raises(ConfigMismatchError, match="qwen3_0p6b.*hidden_size"):
    AutoModel.from_pretrained(
        "Qwen/Qwen3-0.6B", mesh_1x1(), model_source=ModelSource.LOCAL, model_path=str(folder)
    )


def test_default_dtype_is_the_checkpoints_and_can_be_cast(reference_checkpoints):
  import torch

  folder, _ = reference_checkpoints["llama3"]
  model, _ = AutoModel.from_pretrained(str(folder), mesh_1x1())
  assert model.layers[0].attn.q_proj.weight[...].dtype == jnp.float32
  bf16, _ = AutoModel.from_pretrained(str(folder), mesh_1x1(), param_dtype=jnp.bfloat16)
  weight = bf16.layers[0].attn.q_proj.weight[...]
  assert weight.dtype == jnp.bfloat16
  with CheckpointFiles(folder) as ckpt:
    stored = ckpt.read("model.layers.0.self_attn.q_proj.weight")
  expected = torch.tensor(stored).to(torch.bfloat16).float().numpy()
  np.testing.assert_array_equal(np.asarray(weight, np.float32), expected)
  logits = _forward_unpadded(bf16, jnp.ones((1, 4), jnp.int32))
  assert logits.dtype == jnp.bfloat16


def test_missing_config_json(qwen3_dir, tmp_path):
  folder = copy_of(qwen3_dir[0], tmp_path)
  (folder / "config.json").unlink()
  with pytest.raises(SourceError, match="no config.json"):
    AutoModel.from_pretrained(str(folder), mesh_1x1())
  with pytest.raises(CheckpointError, match="no config.json"):
    load_folder(folder, mesh_1x1())


def test_unregistered_model_type_is_refused_without_running_remote_code(qwen3_dir, tmp_path):
  folder = copy_of(qwen3_dir[0], tmp_path)
  cfg = json.loads((folder / "config.json").read_text())
  cfg.update(model_type="mistral", architectures=["MistralForCausalLM"], auto_map={"x": "y"})
  (folder / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(UnknownModelError, match="mistral.*no remote code"):
    AutoModel.from_pretrained(str(folder), mesh_1x1())


def rewrite_weights(folder, change):
  """Rewrites model.safetensors with ``change(dict_of_arrays)`` applied."""
  with CheckpointFiles(folder) as ckpt:
    tensors = {k: ckpt.read(k) for k in ckpt.keys()}
  change(tensors)
  write_safetensors(folder / "model.safetensors", tensors)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda t: t.pop("model.layers.1.mlp.up_proj.weight"), "no tensor for model parameter"),
        (lambda t: t.update({"model.layers.9.mlp.up_proj.weight": np.zeros(3, np.float32)}),
         "does not use"),
        (lambda t: t.update({"model.norm.weight": np.zeros(7, np.float32)}), "has shape"),
    ],
    ids=["missing", "unexpected", "misshaped"],
)
def test_tensor_errors_name_the_tensor(qwen3_dir, tmp_path, change, message):
  folder = copy_of(qwen3_dir[0], tmp_path)
  rewrite_weights(folder, change)
  with pytest.raises(CheckpointError, match=message):
    AutoModel.from_pretrained(str(folder), mesh_1x1())


def test_truncated_file_is_a_checkpoint_error(qwen3_dir, tmp_path):
  folder = copy_of(qwen3_dir[0], tmp_path)
  path = folder / "model.safetensors"
  path.write_bytes(path.read_bytes()[:-1000])
  with pytest.raises(CheckpointError, match="model.safetensors"):
    AutoModel.from_pretrained(str(folder), mesh_1x1())


def test_pickle_only_folder_is_refused(qwen3_dir, tmp_path):
  folder = copy_of(qwen3_dir[0], tmp_path)
  (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
  with pytest.raises(SourceError, match="only pickle weights"):
    AutoModel.from_pretrained(str(folder), mesh_1x1())
  with pytest.raises(CheckpointError, match="never reads pickle weights"):
    load_folder(folder, mesh_1x1())


def test_multimodal_gemma3_loads_its_language_model(tmp_path, caplog):
  import torch
  import transformers

  text = {**reference.BASE, **reference.CASES["gemma3"][2]}
  config = transformers.Gemma3Config(
      text_config=text,
      vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, image_size=28, patch_size=14),
      mm_tokens_per_image=4,
  )
  torch.manual_seed(0)
  full = transformers.Gemma3ForConditionalGeneration(config).eval()
  full.save_pretrained(tmp_path)
  text_only = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**text)).eval()
  missing, unexpected = text_only.model.load_state_dict(
      full.model.language_model.state_dict(), strict=True
  )
  tokens, mask, positions = reference.left_padded_batch()
  expected = reference.reference_logits(text_only, tokens, mask, positions)
  with caplog.at_level(logging.WARNING):
    model, _ = AutoModel.from_pretrained(str(tmp_path), mesh_1x1())
  assert "vision weights are skipped" in caplog.text
  got, real = logits_of(model)
  assert np.abs(got - expected)[real].max() <= MAX_ABS


@pytest.mark.slow
@pytest.mark.parametrize("axis_type", [AxisType.Explicit, AxisType.Auto], ids=["explicit", "auto"])
def test_from_config_creates_parameters_in_their_sharding(axis_type):
  config = Qwen3Config(
      vocab_size=128, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=4, head_dim=16,
      intermediate_size=128,
  )
  mesh = jax.make_mesh((2, 4), ("fsdp", "tp"), axis_types=(axis_type,) * 2)
  model = AutoModel.from_config(config, mesh, rngs=nnx.Rngs(3))
  weight = model.layers[1].mlp.down_proj.weight[...]
  assert weight.sharding.mesh == mesh and weight.sharding.spec == PartitionSpec("fsdp", "tp")
  assert 0.01 < float(jnp.std(weight)) < 0.03
  again = AutoModel.from_config(config, mesh, rngs=nnx.Rngs(3))
  np.testing.assert_array_equal(np.asarray(again.embed_tokens.weight[...]),
                                np.asarray(model.embed_tokens.weight[...]))
  logits = _forward_unpadded(model, jnp.ones((2, 5), jnp.int32))
  assert logits.shape == (2, 5, 128) and bool(jnp.isfinite(logits).all())


def test_from_config_by_id():
  model = AutoModel.from_config("google/gemma-3-270m", param_dtype=jnp.bfloat16,
                                dtype=jnp.bfloat16)
  assert model.config == registry.get_config("gemma3_270m")
  assert model.embed_tokens.weight[...].shape == (262_144, 640)
