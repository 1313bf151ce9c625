"""Kaggle source against a Kaggle-API server on 127.0.0.1:7777 (KAGGLE_API_ENVIRONMENT=TEST)."""

from __future__ import annotations

import pytest

from tests.sources import servers
from tests.sources.fixtures import KAGGLE_HANDLE, KAGGLE_VERSION
from tunix_zoo.errors import SourceError
from tunix_zoo.sources import ModelSource, fetch

pytestmark = pytest.mark.servers
BLOBS = "/blobs/"


def kaggle_fetch(handle: str = KAGGLE_HANDLE, **kwargs):
  return fetch("tiny", source=ModelSource.KAGGLE, model_path=handle, **kwargs)


def test_round_trip_into_kagglehub_cache(kaggle, checkpoint, tmp_path):
  folder = kaggle_fetch()
  servers.assert_fetched(folder, checkpoint)
  assert folder == tmp_path / "kagglehub/models" / KAGGLE_HANDLE / str(KAGGLE_VERSION)
  assert kaggle.faults.count(BLOBS) == len(servers.FETCHED)


def test_model_download_path_receives_files_directly(kaggle, checkpoint, tmp_path):
  folder = kaggle_fetch(model_download_path=str(tmp_path / "here"))
  assert folder == tmp_path / "here"
  servers.assert_fetched(folder, checkpoint)


def test_pinned_version_second_call_and_offline_make_no_request(kaggle, checkpoint):
  first = kaggle_fetch()
  kaggle.faults.reset()
  assert kaggle_fetch(f"{KAGGLE_HANDLE}/{KAGGLE_VERSION}") == first
  assert kaggle_fetch(local_files_only=True) == first
  assert kaggle.faults.hits == []
  # Without a version, one call asks for the latest and downloads nothing.
  assert kaggle_fetch() == first
  assert kaggle.faults.hits == [("POST", "/api/v1/models.ModelApiService/GetModelInstance")]


def test_offline_with_nothing_downloaded_says_what_to_do(kaggle):
  with pytest.raises(SourceError, match=r"\[kaggle\] .*local_files_only=True and no complete "
                     r"download.*Run once"):
    kaggle_fetch(local_files_only=True)
  assert kaggle.faults.hits == []


def test_new_version_is_fetched_when_unpinned(kaggle, checkpoint, tmp_path):
  kaggle_fetch()
  newer = servers.make_checkpoint(tmp_path / "v3", seed=3)
  kaggle.add_model(KAGGLE_HANDLE, 3, newer)
  folder = kaggle_fetch()
  assert folder.name == "3"
  servers.assert_fetched(folder, newer)
  assert kaggle_fetch(f"{KAGGLE_HANDLE}/2", local_files_only=True).name == "2"


@pytest.mark.parametrize("match", ["GetModelInstance", "ListModelInstanceVersionFiles",
                                   "/blobs/acme/tiny/transformers/tiny-it/2/model.safetensors"])
def test_server_error_once_is_retried(kaggle, checkpoint, match):
  kaggle.faults.status(503, match=match)
  servers.assert_fetched(kaggle_fetch(), checkpoint)


def test_connection_dropped_mid_file_is_retried(kaggle, checkpoint):
  kaggle.faults.drop(match="model.safetensors")
  servers.assert_fetched(kaggle_fetch(), checkpoint)
  assert kaggle.faults.count("model.safetensors") == 2


def test_killed_download_leaves_nothing_mistaken_for_complete(kaggle, checkpoint):
  kaggle.faults.stall(match="model.safetensors")
  proc = servers.fetch_in_subprocess({"model_id": "tiny", "source": "kaggle",
                                      "model_path": KAGGLE_HANDLE})
  servers.kill_when_stalled(proc, kaggle.faults)
  servers.assert_fetched(kaggle_fetch(), checkpoint)


def test_partial_file_left_in_download_path_is_replaced(kaggle, checkpoint, tmp_path):
  target = tmp_path / "here"
  target.mkdir()
  # What a crash mid-write leaves: the file, without kagglehub's completion marker.
  (target / "model.safetensors").write_bytes(b"\0" * 10)
  servers.assert_fetched(kaggle_fetch(model_download_path=str(target)), checkpoint)


def test_listing_is_read_across_pages(kaggle, checkpoint, tmp_path):
  sharded = tmp_path / "sharded"
  sharded.mkdir()
  for name in servers.FETCHED:
    (sharded / name).write_bytes((checkpoint / name).read_bytes())
  extras = {f"extra_{i:02d}.json": f"{{\"i\": {i}}}".encode() for i in range(30)}
  for name, data in extras.items():
    (sharded / name).write_bytes(data)
  kaggle.add_model("acme/sharded/transformers/s", 1, sharded)
  folder = kaggle_fetch("acme/sharded/transformers/s")
  assert all((folder / n).read_bytes() == d for n, d in extras.items())
  assert kaggle.faults.count("ListModelInstanceVersionFiles") == 2


def test_missing_model_is_a_clear_error(kaggle):
  with pytest.raises(SourceError, match=r"\[kaggle\] acme/nope/transformers/x: .*404.*"
                     r"Check the handle"):
    kaggle_fetch("acme/nope/transformers/x")


def test_private_model_needs_credentials_and_the_message_says_so(kaggle, checkpoint,
                                                                 monkeypatch):
  kaggle.add_model("acme/private/transformers/p", 1, checkpoint, token="kg_secret_123")
  with pytest.raises(SourceError, match=r"HTTP 401.*KAGGLE_API_TOKEN.*license") as error:
    kaggle_fetch("acme/private/transformers/p")
  assert "kg_secret_123" not in str(error.value)
  monkeypatch.setenv("KAGGLE_API_TOKEN", "kg_secret_123")
  servers.assert_fetched(kaggle_fetch("acme/private/transformers/p"), checkpoint)


def test_pickle_only_variation_is_refused_before_download(kaggle, checkpoint):
  kaggle.add_model("acme/tiny/pyTorch/pt", 1, checkpoint, skip=("model.safetensors",))
  with pytest.raises(SourceError, match=r"only pickle weights.*safe_serialization=True"):
    kaggle_fetch("acme/tiny/pyTorch/pt")
  assert kaggle.faults.count(BLOBS) == 0


@pytest.mark.parametrize("handle", [
    "acme/tiny/transformers", "acme/../transformers/x", "acme/tiny/transformers/../../x",
    "https://www.kaggle.com/models/acme/tiny/transformers/tiny-it", "/acme/tiny/transformers/x",
    "acme/tiny/transformers/tiny-it/0", "acme/tiny/transformers/tiny-it/latest",
    "acme/tiny/transformers/tiny it", "acme/tiny/nosuchframework/x",
    "acme/tiny/transformers/tiny-it/2/extra"])
def test_malformed_handles_are_rejected_before_any_request(kaggle, handle):
  with pytest.raises(SourceError, match=r"\[kaggle\]"):
    kaggle_fetch(handle)
  assert kaggle.faults.hits == []


def test_unreachable_kaggle_is_a_clear_error(kaggle, monkeypatch):
  # LOCALHOST sends calls to http://localhost:80, where nothing listens.
  monkeypatch.setenv("KAGGLE_API_ENVIRONMENT", "LOCALHOST")
  with pytest.raises(SourceError, match=r"could not reach Kaggle at http://localhost.*"
                     r"local_files_only=True"):
    kaggle_fetch()


def test_forbidden_is_a_clear_error(kaggle):
  kaggle.faults.status(403, match="ListModelInstanceVersionFiles")
  with pytest.raises(SourceError, match=r"refused access \(HTTP 403\).*KAGGLE_API_TOKEN"):
    kaggle_fetch()
