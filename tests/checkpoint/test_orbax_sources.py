"""Orbax (Kaggle Flax) Gemma checkpoints through the Kaggle test server and the GCS emulator.

Tolerance as in test_orbax.py: float32 logits within 1e-4 of transformers.
"""

from __future__ import annotations

import pathlib

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType

from tests import orbax_reference, reference
from tests.orbax_reference import assert_greedy_matches, assert_logits_match
from tests.reference import mesh_2x4, one_device_mesh
from tests.sources import servers
from tests.sources.counting import counting
from tests.sources.fixtures import GCS_BUCKET, upload_to_gcs
from tunix_zoo import AutoModel, ModelSource
from tunix_zoo.automodel import load_folder
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


# ------------------------------------------------------------- streamed from gs://

STREAM_MAX_ABS = 1e-6  # the same weights, read two ways: as equal as the local load
# One program for the streamed and the local model of a test (same structure, same mesh);
# eagerly each operation of each call would compile alone.
_forward = nnx.jit(lambda model, tokens: model(tokens)[0])


@pytest.fixture(scope="module")
def counting_gcs(gcs_emulator, gemma2):
  """A counting proxy in front of the emulator, the gemma2 orbax checkpoint uploaded."""
  _, root, _ = gemma2
  with counting(servers.GcsProxy)(gcs_emulator) as proxy:
    upload_to_gcs(proxy, root / orbax_reference.VARIATION, "orbax-stream/gemma2")
    yield proxy


@pytest.fixture
def streaming(counting_gcs, tmp_path, monkeypatch):
  counting_gcs.faults.reset()
  counting_gcs.reset_counts()
  monkeypatch.setenv("STORAGE_EMULATOR_HOST", counting_gcs.url)
  monkeypatch.setenv("TUNIX_ZOO_CACHE", str(tmp_path / "zoo-cache"))
  monkeypatch.setenv("TUNIX_ZOO_RETRY_BASE_DELAY_S", "0.05")
  return counting_gcs


def stored_bytes(folder: pathlib.Path) -> int:
  return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def test_gcs_orbax_folder_streams_its_slices_in_place(streaming, gemma2, tmp_path):
  _, root, _ = gemma2
  preset, mesh = orbax_reference.preset_id("gemma2"), mesh_2x4(AxisType.Explicit)
  url = f"gs://{GCS_BUCKET}/orbax-stream/gemma2"
  model, path = AutoModel.from_pretrained(preset, mesh, model_source=ModelSource.GCS,
                                          model_path=url, stream=True, token="anon")
  assert path == url
  local = load_folder(root / orbax_reference.VARIATION, mesh, preset_id=preset)
  tokens = jnp.asarray(reference.left_padded_batch()[0])
  diff = np.abs(np.asarray(_forward(model, tokens)) - np.asarray(_forward(local, tokens))).max()
  assert diff <= STREAM_MAX_ABS
  # tensorstore fetched the data files' chunks once per process, not once per device
  # (8 devices hold slices of each leaf: per-device reads fetch ~8x), plus metadata and
  # listings of a size fixed per checkpoint. 1.0-1.1x on an idle machine; on a loaded one
  # tensorstore fetches some OCDBT b-tree nodes (kept in the same data files, and as
  # large as this tiny model's leaves) again: 1.27x and 2.34x were seen with two suites
  # running beside it.
  data = streaming.bytes_sent("orbax-stream/gemma2/ocdbt.process_0/d/")
  stored = stored_bytes(root / orbax_reference.VARIATION / "ocdbt.process_0" / "d")
  assert 0.9 * stored <= data <= 3.0 * stored, (data, stored)
  assert streaming.bytes_sent("orbax-stream/gemma2/") - data <= 150_000
  assert not (tmp_path / "zoo-cache").exists()


@pytest.mark.slow
def test_gcs_orbax_stream_retries_a_503_burst(streaming, gemma2):
  _, root, _ = gemma2
  preset, mesh = orbax_reference.preset_id("gemma2"), mesh_2x4(AxisType.Auto)
  streaming.faults.status(503, match="orbax-stream%2Fgemma2%2Focdbt.process_0", times=2)
  model, _ = AutoModel.from_pretrained(preset, mesh, model_source=ModelSource.GCS,
                                       model_path=f"gs://{GCS_BUCKET}/orbax-stream/gemma2",
                                       stream=True, token="anon")
  assert streaming.faults.count("orbax-stream%2Fgemma2%2Focdbt.process_0") >= 3
  local = load_folder(root / orbax_reference.VARIATION, mesh, preset_id=preset)
  tokens = jnp.asarray(reference.left_padded_batch()[0])
  diff = np.abs(np.asarray(_forward(model, tokens)) - np.asarray(_forward(local, tokens))).max()
  assert diff <= STREAM_MAX_ABS
