"""``from_pretrained``'s transformers-style options against the local Hub server:
``subfolder``, ``variant``, ``force_download`` and ``cache_dir``."""

from __future__ import annotations

import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import reference
from tests.sources import servers
from tests.sources.fixtures import HF_REPO
from flax import nnx

from tunix_zoo import AutoModel, ModelSource, cache
from tunix_zoo.build import module_path
from tunix_zoo.automodel import load_folder
from tunix_zoo.errors import SourceError
from tunix_zoo.sources import fetch

pytestmark = pytest.mark.servers


def mesh():
  return jax.make_mesh((1, 1), ("fsdp", "tp"), devices=jax.devices()[:1])


def params(model) -> dict[str, np.ndarray]:
  return {module_path(p): np.asarray(v.get_value())
          for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def assert_same_params(a, b) -> None:
  pa, pb = params(a), params(b)
  assert sorted(pa) == sorted(pb)
  for name in pa:
    np.testing.assert_array_equal(pa[name], pb[name], err_msg=name)


def test_subfolder_fetches_and_loads_that_folder_only(hf_hub, checkpoint, tmp_path):
  root = tmp_path / "repo"
  shutil.copytree(checkpoint, root / "text")
  servers.make_checkpoint(root / "other", seed=4)
  hf_hub.add_repo("acme/nested", root)

  model, path = AutoModel.from_pretrained("acme/nested", mesh(), subfolder="text")
  assert pathlib.Path(path).name == "text"
  assert_same_params(model, load_folder(checkpoint, mesh()))
  assert not (pathlib.Path(path).parent / "other").exists()
  assert hf_hub.faults.count("/other/") == 0

  with pytest.raises(SourceError, match="no config.json at the model's root"):
    fetch("acme/nested")
  with pytest.raises(SourceError, match="no files under subfolder 'nope'.*other, text"):
    fetch("acme/nested", subfolder="nope")
  with pytest.raises(SourceError, match="refusing the file name"):
    fetch("acme/nested", subfolder="../x")
  local, _ = AutoModel.from_pretrained(str(root), mesh(), subfolder="other")
  assert local.config.num_layers == 1
  with pytest.raises(SourceError, match="subfolder applies to HUGGINGFACE and LOCAL only"):
    fetch(None, source=ModelSource.GCS, model_path="gs://b/m", subfolder="text")


@pytest.fixture(scope="module")
def variant_repo(tmp_path_factory):
  """A transformers checkpoint saved as variant fp16 in shards, beside a plain
  model.safetensors of other weights; and the transformers model of the variant."""
  folder = tmp_path_factory.mktemp("variant")
  torch_model = reference.make_checkpoint("qwen3", folder, variant="fp16",
                                          max_shard_size="200KB")
  plain = tmp_path_factory.mktemp("plain")
  reference.make_checkpoint("qwen3", plain, seed=7)
  shutil.copy(plain / "model.safetensors", folder / "model.safetensors")
  return folder, torch_model


def test_variant_downloads_and_loads_only_its_weights(hf_hub, variant_repo):
  folder, torch_model = variant_repo
  names = sorted(p.name for p in folder.iterdir())
  assert "model.safetensors.index.fp16.json" in names
  shards = [n for n in names if n.startswith("model.fp16-") and n.endswith(".safetensors")]
  assert len(shards) > 1
  hf_hub.add_repo("acme/variant", folder)

  model, path = AutoModel.from_pretrained("acme/variant", mesh(), variant="fp16")
  fetched = sorted(p.name for p in pathlib.Path(path).iterdir())
  assert "model.safetensors" not in fetched and set(shards) <= set(fetched)
  tokens, mask, positions = reference.left_padded_batch()
  expected = reference.reference_logits(torch_model, tokens, mask, positions)
  ours, _ = model(jnp.asarray(tokens), attention_mask=jnp.asarray(mask))
  assert np.abs(np.asarray(ours) - expected)[mask.astype(bool)].max() <= 1e-4

  plain, _ = AutoModel.from_pretrained("acme/variant", mesh())
  # model.safetensors holds other weights.
  assert not np.array_equal(params(plain)["embed_tokens.weight"],
                            params(model)["embed_tokens.weight"])
  with pytest.raises(SourceError, match="no weights of variant 'bf16'.*variants: fp16"):
    fetch("acme/variant", variant="bf16")


def test_force_download_replaces_a_damaged_cached_file(hf_hub, checkpoint):
  folder = fetch(HF_REPO)
  blob = (folder / "model.safetensors").resolve()
  good = blob.read_bytes()
  blob.write_bytes(b"\0" * len(good))
  gets = hf_hub.faults.count("/model.safetensors", "GET")
  fetch(HF_REPO)
  assert hf_hub.faults.count("/model.safetensors", "GET") == gets  # cached
  model, path = AutoModel.from_pretrained(HF_REPO, mesh(), force_download=True)
  assert hf_hub.faults.count("/model.safetensors", "GET") == gets + 1
  assert (pathlib.Path(path) / "model.safetensors").read_bytes() == good
  with pytest.raises(SourceError, match="force_download=True needs the network"):
    fetch(HF_REPO, force_download=True, local_files_only=True)


def test_cache_dir_is_a_cache_root(hf_hub, tmp_path):
  root = tmp_path / "elsewhere"
  _, path = AutoModel.from_pretrained(HF_REPO, mesh(), cache_dir=str(root))
  assert pathlib.Path(path).is_relative_to(root / "models--acme--tiny" / "snapshots")
  assert [e.model.partition("@")[0] for e in cache.list_cached(hf_cache_dir=root)] == [HF_REPO]
  assert cache.list_cached() == []  # nothing went to HF_HUB_CACHE
  model, again = AutoModel.from_pretrained(HF_REPO, mesh(), cache_dir=str(root),
                                           local_files_only=True)
  assert again == path
  config = json.loads((pathlib.Path(path) / "config.json").read_text())
  assert model.config.vocab_size == config["vocab_size"]
