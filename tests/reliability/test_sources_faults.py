"""Source faults against real servers on 127.0.0.1: each case names the exception the
caller gets and the state left on disk."""

from __future__ import annotations

import json
import pathlib
import time

import pytest

from tests.sources import servers
from tests.sources.fixtures import (  # noqa: F401  (fixtures are found by name)
    HF_REPO, checkpoint, hf_hub, hub_server)
from tunix_zoo.errors import SourceError
from tunix_zoo.sources import _download, fetch

pytestmark = pytest.mark.servers


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch):
  """Short backoff so that faults that exhaust the policy fail in seconds."""
  monkeypatch.setenv("TUNIX_ZOO_RETRY_BASE_DELAY_S", "0.05")


def _snapshot_weights(cache: pathlib.Path) -> list[pathlib.Path]:
  return list(cache.rglob("snapshots/*/model.safetensors"))


# ----------------------------------------------------------------------------- Hub


def test_hub_bytes_corrupted_in_transit_are_fetched_again(hf_hub, checkpoint):
  hf_hub.faults.corrupt(match="model.safetensors")
  folder = fetch(HF_REPO)
  servers.assert_fetched(folder, checkpoint)
  assert hf_hub.faults.count("model.safetensors", method="GET") == 2
  recorded = _download.read_checksums(folder)["model.safetensors"]
  assert recorded["algorithm"] == "sha256"
  assert recorded["digest"] == _download.file_digest(checkpoint / "model.safetensors", "sha256")


def test_hub_bytes_corrupted_on_every_try_leave_no_file(hf_hub, tmp_path):
  hf_hub.faults.corrupt(match="model.safetensors", times=100)
  with pytest.raises(SourceError, match=r"did not match the checksum the Hub advertised"):
    fetch(HF_REPO)
  cache = tmp_path / "hf-cache"
  assert not _snapshot_weights(cache)
  blobs = [p for p in cache.rglob("blobs/*") if p.stat().st_size > 1000]
  assert not blobs  # no corrupt blob stays cached for a later call to pick up


def test_hub_corrupt_download_path_is_deleted(hf_hub, checkpoint, tmp_path):
  hf_hub.faults.corrupt(match="model.safetensors", times=100)
  target = tmp_path / "dl"
  with pytest.raises(SourceError, match="checksum"):
    fetch(HF_REPO, model_download_path=str(target))
  assert not (target / "model.safetensors").exists()
  hf_hub.faults.reset()
  servers.assert_fetched(fetch(HF_REPO, model_download_path=str(target)), checkpoint)


def test_hub_verify_rehashes_a_cache_hit(hf_hub, checkpoint):
  folder = fetch(HF_REPO)
  weights = (folder / "model.safetensors").resolve()
  data = bytearray(weights.read_bytes())
  data[len(data) // 2] ^= 0xFF
  weights.chmod(0o644)
  weights.write_bytes(bytes(data))  # bit rot in the cache
  hf_hub.faults.reset()
  servers.assert_fetched(fetch(HF_REPO, verify=True), checkpoint)
  assert hf_hub.faults.count("model.safetensors", method="GET") == 1


def test_hub_500_forever_gives_up_within_the_deadline(hf_hub, monkeypatch):
  monkeypatch.setenv("TUNIX_ZOO_RETRY_DEADLINE_S", "3")
  hf_hub.faults.status(500, match="/api/models/", times=10**6)
  start = time.monotonic()
  with pytest.raises(SourceError, match=r"could not reach the Hub.*3 s"):
    fetch(HF_REPO)
  assert time.monotonic() - start < 3
  assert hf_hub.faults.count("/api/models/") >= 2  # retried, within the deadline


@pytest.mark.slow
def test_hub_500_forever_on_files_gives_up_within_60s(hf_hub, tmp_path):
  """huggingface_hub retries a failing HEAD itself; tunix_zoo adds no second layer."""
  hf_hub.faults.status(500, match="/resolve/", times=10**6)
  start = time.monotonic()
  with pytest.raises(SourceError, match=r"HTTP 500|could not reach"):
    fetch(HF_REPO)
  assert time.monotonic() - start < 60
  assert not _snapshot_weights(tmp_path / "hf-cache")


def test_hub_api_answering_html_is_a_source_error(hf_hub, tmp_path):
  hf_hub.faults.html(match="/api/models/", times=100)
  with pytest.raises(SourceError, match=r"HTML|not JSON|not the Hub"):
    fetch(HF_REPO)
  assert not (tmp_path / "hf-cache").exists() or not _snapshot_weights(tmp_path / "hf-cache")


def test_hub_head_error_carries_no_body(hf_hub):
  import http.client  # pylint: disable=import-outside-toplevel
  host, port = hf_hub.server_address
  conn = http.client.HTTPConnection(host, port, timeout=5)
  conn.request("HEAD", "/acme/nope/resolve/main/config.json")
  first = conn.getresponse()
  first.read()
  assert first.status == 404
  conn.request("HEAD", f"/{HF_REPO}/resolve/main/config.json")
  assert conn.getresponse().status == 200  # the kept-alive connection still parses
  conn.close()


def test_hub_stale_incomplete_files_are_cleaned_after_a_rerun(hf_hub, checkpoint, tmp_path):
  hf_hub.faults.stall(match="model.safetensors")
  servers.kill_when_stalled(servers.fetch_in_subprocess({"model_id": HF_REPO}), hf_hub.faults)
  cache = tmp_path / "hf-cache"
  assert list(cache.rglob("*.incomplete"))
  servers.assert_fetched(fetch(HF_REPO), checkpoint)
  assert not list(cache.rglob("*.incomplete"))
