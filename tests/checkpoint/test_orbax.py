"""Kaggle Flax (orbax) Gemma checkpoints against transformers on the same weights.

The orbax checkpoints are written from the tiny transformers references in gemma's
layout (tests/orbax_reference.py). Tolerance: float32 logits within reference.MAX_ABS = 1e-4 of
transformers on the original safetensors (max absolute difference over real tokens);
greedy decoding token-identical to transformers' ``generate``.
"""

from __future__ import annotations

import logging
import shutil

import jax
import numpy as np
import pytest
from jax.sharding import AxisType

from tests import orbax_reference
from tests.reference import one_device_mesh
from tunix_zoo import AutoModel, ModelSource
from tunix_zoo.automodel import orbax_checkpoint
from tunix_zoo.checkpoint.orbax_io import OrbaxCheckpoint
from tunix_zoo.errors import CheckpointError, ConfigError
from tunix_zoo.models.gemma3.params import GEMMA3_ORBAX

CASES = sorted(orbax_reference.CASES)


@pytest.fixture(scope="module")
def made(tmp_path_factory):
  """case -> (hf folder, orbax download root, torch model)."""
  return {case: orbax_reference.make_case(case, tmp_path_factory.mktemp(case))
          for case in CASES}


def load_local(case, made, mesh):
  _, root, _ = made[case]
  model, _ = AutoModel.from_pretrained(orbax_reference.preset_id(case), mesh,
                                       model_source=ModelSource.LOCAL, model_path=str(root))
  return model


@pytest.mark.parametrize("case", CASES)
def test_local_orbax_folder_matches_transformers(made, case):
  _, _, torch_model = made[case]
  model = load_local(case, made, one_device_mesh())
  orbax_reference.assert_logits_match(model, torch_model, case)
  orbax_reference.assert_greedy_matches(model, torch_model)


@pytest.mark.slow
# Each case on one mesh kind, each kind twice: the full product took 4.5 min on 2 cores.
@pytest.mark.parametrize("case,axis_type", [
    ("gemma", AxisType.Auto), ("gemma_mha", AxisType.Explicit),
    ("gemma2", AxisType.Explicit), ("gemma3", AxisType.Auto),
])
def test_orbax_on_a_2x4_mesh_matches_transformers(made, case, axis_type):
  _, _, torch_model = made[case]
  mesh = jax.make_mesh((2, 4), ("fsdp", "tp"), axis_types=(axis_type,) * 2)
  model = load_local(case, made, mesh)
  assert model.embed_tokens.weight.value.sharding.mesh.shape == mesh.shape
  orbax_reference.assert_logits_match(model, torch_model, case)
  orbax_reference.assert_greedy_matches(model, torch_model)


def test_embedding_rows_are_resized_and_logged_once(made, caplog):
  with caplog.at_level(logging.WARNING, "tunix_zoo.checkpoint.orbax_io"):
    load_local("gemma", made, one_device_mesh())
    model = load_local("gemma3", made, one_device_mesh())
  messages = [r.getMessage() for r in caplog.records]
  assert sum("dropping the 5 unused rows" in m for m in messages) == 1
  assert sum("3 missing rows" in m for m in messages) == 1
  assert sum("vision weights are skipped" in m for m in messages) == 1
  np.testing.assert_array_equal(np.asarray(model.embed_tokens.weight.value[-3:]), 0)


def test_device_slices_equal_the_whole_tensor_sliced(made):
  """Slices that cut heads apart (rows 5:27 of q_proj's N*H) read the covering region."""
  _, root, _ = made["gemma3"]
  abstract = AutoModel.from_config(orbax_reference.preset_id("gemma3"))
  _, _, reader = orbax_checkpoint(root, orbax_reference.preset_id("gemma3"), abstract)
  with reader as ckpt:
    for key in ("model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.o_proj.weight",
                "model.layers.0.mlp.gate_proj.weight", "model.embed_tokens.weight"):
      whole = ckpt.read(key)
      assert whole.shape == ckpt.shape(key)
      rows, cols = whole.shape
      for index in [(slice(5, 27), slice(3, 40)), (slice(0, rows // 2), slice(cols // 4, cols)),
                    (slice(rows - 1, rows), slice(None))]:
        np.testing.assert_array_equal(ckpt.read(key, index), whole[index])


def test_no_preset_is_a_config_error_saying_to_pass_one(made):
  _, root, _ = made["gemma2"]
  with pytest.raises(ConfigError, match="carries no config.json.*Pass the preset as model_id"):
    AutoModel.from_pretrained(None, one_device_mesh(), model_source=ModelSource.LOCAL,
                              model_path=str(root))


def test_a_preset_of_another_size_names_the_leaf(made):
  _, root, _ = made["gemma2"]
  with pytest.raises(CheckpointError, match=r"input_embedding.*\(136, 64\).*preset"):
    AutoModel.from_pretrained("gemma2_2b", one_device_mesh(), model_source=ModelSource.LOCAL,
                              model_path=str(root))


def _copy(made, case, tmp_path):
  _, root, _ = made[case]
  shutil.copytree(root, tmp_path / "copy")
  return tmp_path / "copy"


def test_missing_data_file_is_a_checkpoint_error_naming_the_leaf(made, tmp_path):
  root = _copy(made, "gemma", tmp_path)
  # The largest data file holds array chunks (metadata is small and stored inline).
  max((root / orbax_reference.VARIATION).rglob("d/*"), key=lambda p: p.stat().st_size).unlink()
  with pytest.raises(CheckpointError, match=r"Cannot read leaf 'transformer/.*download it again"):
    load_local_from(root, "gemma")


def test_truncated_folder_without_metadata_is_a_checkpoint_error(made, tmp_path):
  root = _copy(made, "gemma", tmp_path)
  (root / orbax_reference.VARIATION / "_METADATA").unlink()
  (root / orbax_reference.VARIATION / "manifest.ocdbt").write_bytes(b"")
  with pytest.raises(CheckpointError, match="orbax|download it again"):
    load_local_from(root, "gemma")


def load_local_from(root, case):
  return AutoModel.from_pretrained(orbax_reference.preset_id(case), one_device_mesh(),
                                   model_source=ModelSource.LOCAL, model_path=str(root))


def _write_tree(made, case, tmp_path, edit):
  from safetensors.numpy import load_file
  import json

  hf, _, _ = made[case]
  tree = orbax_reference.gemma_tree(case, load_file(hf / "model.safetensors"),
                                    json.loads((hf / "config.json").read_text()))
  edit(tree)
  orbax_reference.save_orbax(tree, tmp_path / "bad" / orbax_reference.VARIATION)
  return tmp_path / "bad"


def test_missing_leaf_is_a_checkpoint_error_naming_the_key(made, tmp_path):
  root = _write_tree(made, "gemma2", tmp_path,
                     lambda tree: tree.pop("transformer/layer_1/post_ffw_norm"))
  with pytest.raises(CheckpointError,
                     match=r"no tensor for model parameter 'layers.1.post_mlp_norm.weight'"):
    load_local_from(root, "gemma2")


def test_wrong_shape_is_a_checkpoint_error_naming_the_leaf(made, tmp_path):
  def cut(tree):
    leaf = tree["transformer/layer_1/mlp/linear"]
    leaf["w"] = leaf["w"][:-1]

  root = _write_tree(made, "gemma2", tmp_path, cut)
  with pytest.raises(CheckpointError, match=r"'transformer/layer_1/mlp/linear/w'.*\(95, 64\)"):
    load_local_from(root, "gemma2")


def test_stacked_layout_is_refused_with_advice(made, tmp_path):
  def stack(tree):
    tree["transformer/stacked_layers/attn/q_einsum"] = tree.pop("transformer/layer_0/attn/q_einsum")

  root = _write_tree(made, "gemma2", tmp_path, stack)
  with pytest.raises(CheckpointError, match=r"stacked.*does not read"):
    load_local_from(root, "gemma2")


def test_unknown_leaf_is_refused(made, tmp_path):
  def extra(tree):
    tree["transformer/layer_9/attn/q_einsum"] = tree["transformer/layer_0/attn/q_einsum"]

  root = _write_tree(made, "gemma2", tmp_path, extra)
  with pytest.raises(CheckpointError, match=r"leaves the model does not read.*layer_9"):
    load_local_from(root, "gemma2")


def test_reader_refuses_a_folder_that_is_not_orbax(tmp_path):
  with pytest.raises(CheckpointError, match="not an orbax checkpoint"):
    OrbaxCheckpoint(tmp_path, GEMMA3_ORBAX, {})
