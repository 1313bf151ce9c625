"""save_pretrained: folders transformers and tunix_zoo both load, written atomically.

Every family is exported from a model loaded out of a transformers checkpoint; the
export must load in transformers with the same logits (MAX_ABS, float32) and load back
into tunix_zoo bit for bit.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import pathlib
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from jax.sharding import AxisType

from tests import moe_reference, reference
from tunix_zoo import registry
from tunix_zoo.automodel import load_folder
from tunix_zoo.checkpoint import export
from tunix_zoo.checkpoint.export import save_pretrained
from tunix_zoo.checkpoint.keymap import Rule
from tunix_zoo.build import module_path
from tunix_zoo.checkpoint.reader import INDEX_FILE_NAME, CheckpointFiles
from tunix_zoo.checkpoint.writer import ShardedWriter
from tunix_zoo.errors import ExportError

MAX_ABS = 1e-4
CASES = sorted(reference.CASES)


@pytest.fixture(scope="module")
def sources(reference_checkpoints):
  """case -> folder of a transformers checkpoint (the session's reference ones)."""
  return {case: reference_checkpoints[case][0] for case in CASES}


def one_device_mesh():
  return jax.make_mesh((1, 1), ("fsdp", "tp"), devices=jax.devices()[:1])


def flat_params(model: nnx.Module) -> dict[str, np.ndarray]:
  return {
      module_path(path): np.asarray(var.get_value())
      for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))
  }


def assert_bit_equal(actual: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
  assert sorted(actual) == sorted(expected)
  for name, value in expected.items():
    assert actual[name].dtype == value.dtype, name
    assert actual[name].shape == value.shape, name
    assert actual[name].tobytes() == value.tobytes(), name


def load_in_transformers(folder: pathlib.Path):
  model, info = transformers.AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
  assert not any(info.values()), f"transformers reported {info}"
  return model.eval()


def siblings(folder: pathlib.Path) -> list[str]:
  return sorted(os.listdir(folder.parent))


@pytest.mark.parametrize("case", CASES)
def test_export_loads_in_transformers_and_back(sources, tmp_path, case):
  model = load_folder(sources[case], one_device_mesh())
  out = save_pretrained(model, tmp_path / "export")
  assert out == tmp_path / "export"
  assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
  config = json.loads((out / "config.json").read_text())
  assert config["torch_dtype"] == config["dtype"] == "float32"
  with CheckpointFiles(out) as files:
    has_lm_head = "lm_head.weight" in files
  assert has_lm_head == (not model.config.tie_word_embeddings)

  tokens, mask, positions = reference.left_padded_batch()
  expected = reference.reference_logits(load_in_transformers(out), tokens, mask, positions)
  logits, _ = model(jnp.asarray(tokens), attention_mask=jnp.asarray(mask))
  assert np.abs(np.asarray(logits) - expected)[mask.astype(bool)].max() <= MAX_ABS

  reloaded = load_folder(out, one_device_mesh())
  assert type(reloaded.config) is type(model.config)
  assert_bit_equal(flat_params(reloaded), flat_params(model))


@pytest.mark.parametrize("case", ["llama3", "gemma3"])
def test_sharded_export_writes_an_index(sources, tmp_path, case):
  model = load_folder(sources[case], one_device_mesh())
  out = save_pretrained(model, tmp_path / "export", max_shard_size="40KB")
  index = json.loads((out / INDEX_FILE_NAME).read_text())
  shards = sorted(name for name in os.listdir(out) if name.endswith(".safetensors"))
  assert len(shards) > 2
  assert sorted(set(index["weight_map"].values())) == shards
  # No tensor here exceeds the limit, so no shard does (beyond its small header).
  assert all(os.path.getsize(out / name) < 40_000 + 4_000 for name in shards)
  params = flat_params(model)
  assert index["metadata"]["total_size"] == sum(v.nbytes for v in params.values())
  assert_bit_equal(flat_params(load_folder(out, one_device_mesh())), params)
  tokens, mask, positions = reference.left_padded_batch(seed=1)
  expected = reference.reference_logits(load_in_transformers(out), tokens, mask, positions)
  logits, _ = model(jnp.asarray(tokens), attention_mask=jnp.asarray(mask))
  assert np.abs(np.asarray(logits) - expected)[mask.astype(bool)].max() <= MAX_ABS


@pytest.mark.parametrize("case", CASES)
def test_bfloat16_export(sources, tmp_path, case):
  model = load_folder(sources[case], one_device_mesh())
  out = save_pretrained(model, tmp_path / "export", dtype=jnp.bfloat16)
  config = json.loads((out / "config.json").read_text())
  assert config["torch_dtype"] == config["dtype"] == "bfloat16"
  expected = {
      name: np.asarray(jnp.asarray(value).astype(jnp.bfloat16))
      for name, value in flat_params(model).items()
  }
  reloaded = load_folder(out, one_device_mesh())
  assert_bit_equal(flat_params(reloaded), expected)

  torch_params = dict(load_in_transformers(out).named_parameters())
  key_map = registry.family_for_config_class(type(model.config)).param_table
  for name, value in expected.items():
    tensor = torch_params[key_map.checkpoint_key(name)]
    assert tensor.dtype == torch.bfloat16
    np.testing.assert_array_equal(tensor.detach().float().numpy(), value.astype(np.float32))


@pytest.mark.parametrize("case", CASES)
def test_export_from_2x4_mesh_equals_export_from_one_device(sources, tmp_path, case):
  single = save_pretrained(load_folder(sources[case], one_device_mesh()), tmp_path / "single")
  mesh = jax.make_mesh((2, 4), ("fsdp", "tp"), axis_types=(AxisType.Explicit,) * 2)
  sharded_model = load_folder(sources[case], mesh)
  assert len(sharded_model.layers[0].attn.q_proj.weight[...].addressable_shards) == 8
  sharded = save_pretrained(sharded_model, tmp_path / "sharded", max_shard_size="40KB")
  resharded = save_pretrained(sharded_model, tmp_path / "resharded")
  assert sorted(os.listdir(single)) == sorted(os.listdir(resharded))
  for name in os.listdir(single):
    assert (single / name).read_bytes() == (resharded / name).read_bytes(), name
  assert_bit_equal(
      flat_params(load_folder(sharded, one_device_mesh())),
      flat_params(load_folder(single, one_device_mesh())),
  )


def fail_on_third_tensor(monkeypatch, error: BaseException) -> None:
  real_add = ShardedWriter.add
  calls = []

  def add(self, key, array):
    calls.append(key)
    if len(calls) == 3:
      raise error
    real_add(self, key, array)

  monkeypatch.setattr(ShardedWriter, "add", add)


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), KeyboardInterrupt()],
                         ids=["disk_full", "interrupt"])
def test_failed_export_leaves_no_folder_and_no_debris(sources, tmp_path, monkeypatch, error):
  model = load_folder(sources["qwen3"], one_device_mesh())
  out = tmp_path / "export"
  fail_on_third_tensor(monkeypatch, error)
  # An OSError is reported as the ExportError naming the folder.
  with pytest.raises(ExportError if isinstance(error, OSError) else type(error)):
    save_pretrained(model, out, max_shard_size="40KB")
  assert os.listdir(tmp_path) == []


def test_failure_after_the_weights_leaves_no_folder(sources, tmp_path, monkeypatch):
  model = load_folder(sources["llama3"], one_device_mesh())

  def broken_copy(source, staging):
    raise OSError("copy failed")

  monkeypatch.setattr(export, "_copy_tokenizer_files", broken_copy)
  with pytest.raises(ExportError, match="copy failed"):
    save_pretrained(model, tmp_path / "out" / "export", source_dir=sources["llama3"])
  assert os.listdir(tmp_path / "out") == []


def test_failed_overwrite_keeps_the_previous_export(sources, tmp_path, monkeypatch):
  model = load_folder(sources["qwen2p5"], one_device_mesh())
  out = save_pretrained(model, tmp_path / "export")
  before = {name: (out / name).read_bytes() for name in os.listdir(out)}
  fail_on_third_tensor(monkeypatch, OSError("write failed"))
  with pytest.raises(ExportError, match="write failed"):
    save_pretrained(model, out, dtype=jnp.bfloat16, overwrite=True)
  assert siblings(out) == ["export"]
  assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before


def test_refuses_to_overwrite_a_non_empty_folder(sources, tmp_path):
  model = load_folder(sources["gemma"], one_device_mesh())
  out = tmp_path / "export"
  out.mkdir()
  (out / "notes.txt").write_text("keep me")
  with pytest.raises(ExportError, match="overwrite=True"):
    save_pretrained(model, out)
  assert os.listdir(out) == ["notes.txt"]
  save_pretrained(model, out, overwrite=True)
  assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
  assert siblings(out) == ["export"]
  assert_bit_equal(flat_params(load_folder(out, one_device_mesh())), flat_params(model))


def test_fills_an_existing_empty_folder(sources, tmp_path):
  out = tmp_path / "export"
  out.mkdir()
  save_pretrained(load_folder(sources["gemma2"], one_device_mesh()), out)
  assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]


def test_rejects_bad_arguments(sources, tmp_path):
  model = load_folder(sources["llama3"], one_device_mesh())
  (tmp_path / "a_file").write_text("")
  with pytest.raises(ExportError, match="not a folder"):
    save_pretrained(model, tmp_path / "a_file")
  with pytest.raises(ExportError, match="floating dtype"):
    save_pretrained(model, tmp_path / "export", dtype=jnp.int8)
  with pytest.raises(ExportError, match="source_dir"):
    save_pretrained(model, tmp_path / "export", source_dir=tmp_path / "missing")
  with pytest.raises(ExportError, match="tunix_zoo models"):
    save_pretrained(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), tmp_path / "export")
  assert os.listdir(tmp_path) == ["a_file"]


@pytest.mark.parametrize("case", ["qwen3", "gemma3"])
def test_special_token_ids_survive_the_round_trip(sources, tmp_path, case):
  """The ids a checkpoint's config.json gives (an EOS list too) are written back, and
  transformers reads them from the export."""
  source = tmp_path / "source"
  source.mkdir()
  for path in sources[case].iterdir():
    (source / path.name).symlink_to(path)
  config = json.loads((sources[case] / "config.json").read_text())
  config.update(bos_token_id=1, eos_token_id=[2, 5], pad_token_id=0)
  (source / "config.json").unlink()
  (source / "config.json").write_text(json.dumps(config))
  model = load_folder(source, one_device_mesh())
  assert (model.config.bos_token_id, model.config.eos_token_id) == (1, (2, 5))
  out = save_pretrained(model, tmp_path / "export")
  written = json.loads((out / "config.json").read_text())
  assert (written["bos_token_id"], written["eos_token_id"], written["pad_token_id"]) == (
      1, [2, 5], 0)
  hf = transformers.AutoConfig.from_pretrained(out)
  assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (1, [2, 5], 0)


def test_copies_tokenizer_files_from_source_dir(sources, tmp_path):
  source = tmp_path / "source"
  (source / "additional_chat_templates").mkdir(parents=True)
  files = {
      "tokenizer.json": "{}", "tokenizer_config.json": '{"eos_token": "</s>"}',
      "special_tokens_map.json": "{}", "generation_config.json": '{"eos_token_id": [1, 2]}',
      "tokenizer.model": "sentencepiece bytes", "chat_template.jinja": "{{ messages }}",
      "additional_chat_templates/tool_use.jinja": "{{ tools }}",
  }
  for name, text in files.items():
    (source / name).write_text(text)
  (source / "README.md").write_text("not copied")
  (source / "config.json").write_text("{}")
  model = load_folder(sources["qwen3"], one_device_mesh())
  out = save_pretrained(model, tmp_path / "export", source_dir=source)
  written = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
  assert written == sorted([*files, "config.json", "model.safetensors"])
  for name, text in files.items():
    assert (out / name).read_text() == text
  assert json.loads((out / "config.json").read_text())["model_type"] == "qwen3"


def test_stacked_parameter_is_written_one_tensor_per_row(sources, tmp_path, monkeypatch):
  """A stacked rule (as for MoE experts) splits the leading axis; the loader restacks it."""
  model = load_folder(sources["llama3"], one_device_mesh())
  spec = registry.family_for_config_class(type(model.config))
  rows_table = spec.param_table.extend([Rule("model.embed_tokens.row.{e}", "embed_tokens.weight")])
  monkeypatch.setitem(registry._families, spec.category,
                      dataclasses.replace(spec, param_table=rows_table))
  out = save_pretrained(model, tmp_path / "export", max_shard_size="40KB")
  embedding = np.asarray(model.embed_tokens.weight[...])
  with CheckpointFiles(out) as files:
    assert "model.embed_tokens.weight" not in files
    for row in (0, reference.VOCAB - 1):
      np.testing.assert_array_equal(files.read(f"model.embed_tokens.row.{row}"), embedding[row])
  assert_bit_equal(flat_params(load_folder(out, one_device_mesh())), flat_params(model))


@pytest.mark.parametrize("case", sorted(moe_reference.CASES))
def test_qwen3_moe_exports_one_tensor_per_expert_from_a_2x4_mesh(tmp_path, case):
  source = tmp_path / "source"
  moe_reference.make_checkpoint(case, source)
  mesh = jax.make_mesh((2, 4), ("fsdp", "tp"), axis_types=(AxisType.Explicit,) * 2)
  model = load_folder(source, mesh)
  out = save_pretrained(model, tmp_path / "export", max_shard_size="40KB")
  with CheckpointFiles(out) as exported, CheckpointFiles(source) as original:
    assert exported.keys() == original.keys()
    for key in exported.keys():
      assert exported.read(key).tobytes() == original.read(key).tobytes(), key
  tokens, mask, positions = reference.left_padded_batch()
  expected = reference.reference_logits(load_in_transformers(out), tokens, mask, positions)
  logits, _ = load_folder(out, one_device_mesh())(
      jnp.asarray(tokens), attention_mask=jnp.asarray(mask))
  assert np.abs(np.asarray(logits) - expected)[mask.astype(bool)].max() <= MAX_ABS


@pytest.mark.parametrize("spec, covered", [
    (jax.sharding.PartitionSpec("fsdp", "tp"), False),
    (jax.sharding.PartitionSpec(None, "tp"), True),
    (jax.sharding.PartitionSpec(), True),
])
def test_process_zero_coverage_is_decided_from_the_sharding(spec, covered):
  """With two processes (each owning one fsdp row), which tensors need a collective."""
  mesh = jax.make_mesh((2, 4), ("fsdp", "tp"))
  shape = (8, 16)
  indices = jax.sharding.NamedSharding(mesh, spec).devices_indices_map(shape)
  process_of = {device: row for row, devices in enumerate(mesh.devices) for device in devices}
  device = collections.namedtuple("Device", "id process_index")
  fake = types.SimpleNamespace(
      shape=shape, is_fully_addressable=False,
      sharding=types.SimpleNamespace(devices_indices_map=lambda _: {
          device(d.id, process_of[d]): index for d, index in indices.items()
      }),
  )
  assert export._process_zero_covers(fake) is covered
