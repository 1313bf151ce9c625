"""HF Hub source against a real Hub-protocol server on 127.0.0.1."""

from __future__ import annotations

import pathlib

import pytest

from tests.sources import servers
from tests.sources.fixtures import HF_REPO
from tunix_zoo.errors import SourceError
from tunix_zoo.sources import ModelSource, fetch

pytestmark = pytest.mark.servers


def test_round_trip_into_hub_cache(hf_hub, checkpoint, tmp_path):
  folder = fetch(HF_REPO)
  servers.assert_fetched(folder, checkpoint)
  assert folder.is_relative_to(tmp_path / "hf-cache")
  assert hf_hub.faults.count("/resolve/", method="GET") == len(servers.FETCHED)


def test_model_download_path_receives_files_directly(hf_hub, checkpoint, tmp_path):
  folder = fetch(HF_REPO, source=ModelSource.HUGGINGFACE,
                 model_download_path=str(tmp_path / "here"))
  assert folder == (tmp_path / "here").resolve()
  servers.assert_fetched(folder, checkpoint)


def test_revision_by_commit_and_unknown_revision(hf_hub, checkpoint):
  sha = hf_hub.repos[HF_REPO].sha
  servers.assert_fetched(fetch(HF_REPO, revision=sha), checkpoint)
  with pytest.raises(SourceError, match=r"revision 'v9' does not exist"):
    fetch(HF_REPO, revision="v9")


def test_warm_cache_downloads_nothing_and_offline_makes_no_request(hf_hub, checkpoint,
                                                                   monkeypatch):
  first = fetch(HF_REPO)
  hf_hub.faults.reset()
  assert fetch(HF_REPO) == first
  assert hf_hub.faults.count("/resolve/") == 0
  hf_hub.faults.reset()
  servers.assert_fetched(fetch(HF_REPO, local_files_only=True), checkpoint)
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  servers.assert_fetched(fetch(HF_REPO), checkpoint)
  assert hf_hub.faults.hits == []


def test_offline_with_cold_cache_says_what_to_do(hf_hub, monkeypatch):
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  with pytest.raises(SourceError, match=r"\[huggingface\] acme/tiny: offline mode.*HF_HUB_OFFLINE"):
    fetch(HF_REPO)
  assert hf_hub.faults.hits == []


@pytest.mark.parametrize("match", ["/api/models/", "/resolve/main/config.json",
                                   "model.safetensors"])
def test_server_error_once_is_retried(hf_hub, checkpoint, match):
  hf_hub.faults.status(500, match=match)
  servers.assert_fetched(fetch(HF_REPO), checkpoint)


def test_connection_dropped_mid_file_resumes(hf_hub, checkpoint):
  hf_hub.faults.drop(match="model.safetensors")
  servers.assert_fetched(fetch(HF_REPO), checkpoint)
  assert hf_hub.faults.count("model.safetensors", method="GET") == 2


def test_killed_download_leaves_nothing_mistaken_for_complete(hf_hub, checkpoint, tmp_path):
  hf_hub.faults.stall(match="model.safetensors")
  servers.kill_when_stalled(servers.fetch_in_subprocess({"model_id": HF_REPO}), hf_hub.faults)
  cache = tmp_path / "hf-cache"
  assert list(cache.rglob("*.incomplete"))  # the crash left a partial download behind
  assert not list(cache.rglob("snapshots/*/model.safetensors"))
  servers.assert_fetched(fetch(HF_REPO), checkpoint)


def test_missing_repo_is_a_clear_error(hf_hub):
  with pytest.raises(SourceError, match=r"\[huggingface\] acme/nope: the repo does not exist"
                     r".*Check the id"):
    fetch("acme/nope")


def test_private_repo_needs_a_token_and_the_message_says_so(hf_hub, checkpoint):
  hf_hub.add_repo("acme/private", checkpoint, token="hf_secret_123")
  with pytest.raises(SourceError, match=r"401.*HF_TOKEN.*token=") as error:
    fetch("acme/private")
  assert "hf_secret_123" not in str(error.value)
  servers.assert_fetched(fetch("acme/private", token="hf_secret_123"), checkpoint)


def test_pickle_only_repo_is_refused_before_download(hf_hub, checkpoint):
  hf_hub.add_repo("acme/pickles", checkpoint, skip=("model.safetensors",))
  with pytest.raises(SourceError, match=r"only pickle weights.*pytorch_model\.bin.*"
                     r"safe_serialization=True"):
    fetch("acme/pickles")
  assert hf_hub.faults.count("/resolve/") == 0


def test_repo_without_config_is_refused(hf_hub, checkpoint):
  hf_hub.add_repo("acme/noconfig", checkpoint, skip=("config.json",))
  with pytest.raises(SourceError, match="no config.json"):
    fetch("acme/noconfig")


@pytest.mark.parametrize("repo_id", [
    "../etc/passwd", "/abs/path", "acme/../../x", "https://huggingface.co/acme/tiny",
    "acme/tiny?x=1", "acme/tiny#x", "acme tiny", "acme/tiny/extra", "acme--x/tiny",
    "acme\\tiny", "", ".hidden/x", "acme/tiny/"])
def test_malformed_repo_ids_are_rejected_before_any_request(hf_hub, repo_id):
  with pytest.raises(SourceError, match="not a valid Hub repo id|empty"):
    fetch(repo_id)
  assert hf_hub.faults.hits == []


@pytest.mark.parametrize("revision", ["../../x", "/main", "main/../../x", "a b"])
def test_malformed_revisions_are_rejected(hf_hub, revision):
  with pytest.raises(SourceError, match="not a valid branch"):
    fetch(HF_REPO, revision=revision)
  assert hf_hub.faults.hits == []


def test_unreachable_hub_is_a_clear_error(hf_hub, monkeypatch):
  monkeypatch.setenv("HF_ENDPOINT", f"http://{servers.LOCALHOST}:{servers.free_port()}")
  with pytest.raises(SourceError, match=r"could not reach the Hub at http://127\.0\.0\.1.*"
                     r"local_files_only=True"):
    fetch(HF_REPO)


def test_offline_reuses_a_model_download_path(hf_hub, checkpoint, tmp_path: pathlib.Path):
  target = tmp_path / "dl"
  fetch(HF_REPO, model_download_path=str(target))
  hf_hub.faults.reset()
  folder = fetch(HF_REPO, model_download_path=str(target), local_files_only=True)
  servers.assert_fetched(folder, checkpoint)
  assert hf_hub.faults.hits == []


def test_forbidden_is_a_clear_error(hf_hub):
  hf_hub.faults.status(403, match="/api/models/")
  with pytest.raises(SourceError, match=r"\[huggingface\] acme/tiny: the Hub refused access "
                     r"\(HTTP 403\).*HF_TOKEN"):
    fetch(HF_REPO)
