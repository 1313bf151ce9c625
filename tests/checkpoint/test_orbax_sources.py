"""Orbax (Kaggle Flax) Gemma checkpoints through the Kaggle test server and the GCS emulator.

Tolerance as in test_orbax.py: float32 logits within 1e-4 of transformers.
"""

from __future__ import annotations

import pathlib

import pytest

from tests import orbax_reference
from tests.orbax_reference import assert_greedy_matches, assert_logits_match
from tests.reference import one_device_mesh
from tests.sources.fixtures import upload_to_gcs
from tunix_zoo import AutoModel, ModelSource
from tunix_zoo.errors import CheckpointError
from tunix_zoo.tokenizer import Tokenizer

pytestmark = pytest.mark.servers
HANDLE = "google/gemma-2/flax/gemma2-tiny-it"


@pytest.fixture(scope="module")
def gemma2(tmp_path_factory):
  return orbax_reference.make_case("gemma2", tmp_path_factory.mktemp("gemma2"))


def test_kaggle_flax_variation_loads_like_tunix_documents(kaggle, gemma2, tmp_path):
  _, root, torch_model = gemma2
  kaggle.add_model(HANDLE, 1, root)
  model, folder = AutoModel.from_pretrained(
      orbax_reference.preset_id("gemma2"), one_device_mesh(), model_source=ModelSource.KAGGLE,
      model_path=HANDLE)
  assert (tmp_path / "kagglehub") in pathlib.Path(folder).parents
  assert (pathlib.Path(folder) / orbax_reference.VARIATION / "_METADATA").is_file()
  # The variation's SentencePiece model came along and is the tokenizer.
  assert Tokenizer.from_pretrained(folder).encode("Hello")[0] == 2  # <bos>
  assert_logits_match(model, torch_model, "gemma2")
  assert_greedy_matches(model, torch_model)
  kaggle.faults.reset()
  AutoModel.from_pretrained(orbax_reference.preset_id("gemma2"), one_device_mesh(),
                            model_source=ModelSource.KAGGLE, model_path=f"{HANDLE}/1")
  assert kaggle.faults.hits == []  # a pinned, complete download makes no request


def test_kaggle_variation_missing_a_data_file_fails_naming_the_leaf(kaggle, gemma2):
  _, root, _ = gemma2
  checkpoint_dir = root / orbax_reference.VARIATION
  largest = max(checkpoint_dir.rglob("d/*"), key=lambda p: p.stat().st_size)
  kaggle.add_model(HANDLE, 1, root, skip=(largest.relative_to(root).as_posix(),))
  with pytest.raises(CheckpointError, match=r"Cannot read leaf 'transformer/"):
    AutoModel.from_pretrained(orbax_reference.preset_id("gemma2"), one_device_mesh(),
                              model_source=ModelSource.KAGGLE, model_path=HANDLE)


def test_gcs_orbax_folder_loads(gcs, gemma2):
  _, root, torch_model = gemma2
  url = upload_to_gcs(gcs, root, "orbax/gemma2-tiny")
  model, folder = AutoModel.from_pretrained(
      orbax_reference.preset_id("gemma2"), one_device_mesh(), model_source=ModelSource.GCS,
      model_path=url, token="anon")
  assert_logits_match(model, torch_model, "gemma2")
