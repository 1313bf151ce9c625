"""Source faults against real servers on 127.0.0.1: each case names the exception the
caller gets and the state left on disk."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

import pytest

from tests.sources import servers
from tests.sources.fixtures import GCS_URL, HF_REPO, KAGGLE_HANDLE
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


# ----------------------------------------------------------------------------- GCS


def _gcs(**kwargs):
  return fetch("tiny", source="gcs", model_path=GCS_URL, token="anon", **kwargs)


def test_gcs_stall_mid_body_is_retried_after_the_read_timeout(gcs, checkpoint, monkeypatch):
  monkeypatch.setenv("TUNIX_ZOO_READ_TIMEOUT_S", "1")
  gcs.faults.stall(match="model.safetensors")
  start = time.monotonic()
  servers.assert_fetched(_gcs(), checkpoint)
  assert time.monotonic() - start < 15  # not the server's 60 s stall
  assert gcs.faults.count("model.safetensors") == 2


def test_gcs_two_processes_into_one_folder_both_succeed(gcs, checkpoint, tmp_path):
  target = tmp_path / "shared"
  kwargs = {"model_id": "tiny", "source": "gcs", "model_path": GCS_URL, "token": "anon",
            "model_download_path": str(target)}
  procs = [servers.fetch_in_subprocess(kwargs) for _ in range(2)]
  errors = [proc.communicate(timeout=120)[1].decode() for proc in procs]
  assert [proc.returncode for proc in procs] == [0, 0], errors
  servers.assert_fetched(target, checkpoint)
  assert not list((target / ".tunix_zoo" / "partial").glob("*.part"))


@pytest.mark.slow
def test_gcs_500_forever_gives_up_within_60s(gcs, tmp_path, monkeypatch):
  """gcsfs retries the listing's 500s itself (about 31 s of backoff); the retry policy's
  deadline (60 s by default, 3 s here) ends those retries too."""
  assert _download.RetryPolicy().deadline_s == 60
  monkeypatch.setenv("TUNIX_ZOO_RETRY_DEADLINE_S", "3")
  gcs.faults.status(500, match="/o", times=10**6)
  start = time.monotonic()
  with pytest.raises(SourceError, match=r"could not reach GCS.*\(3 s;"):
    _gcs(model_download_path=str(tmp_path / "dl"))
  assert time.monotonic() - start < 3 + 2
  assert gcs.faults.count("/o") >= 2  # gcsfs's own retries ran, until the deadline
  assert not (tmp_path / "dl" / "model.safetensors").exists()



@pytest.mark.slow
def test_gcs_stream_500_forever_gives_up_within_the_deadline(gcs, monkeypatch):
  """The streamed load lists the bucket itself: the deadline ends gcsfs's retries there too."""
  from tunix_zoo.sources import open_stream

  monkeypatch.setenv("TUNIX_ZOO_RETRY_DEADLINE_S", "3")
  gcs.faults.status(500, match="/o", times=10**6)
  start = time.monotonic()
  with pytest.raises(SourceError, match=r"could not reach GCS.*\(3 s;"):
    open_stream(None, source="gcs", model_path=GCS_URL, token="anon")
  assert time.monotonic() - start < 3 + 2
  assert gcs.faults.count("/o") >= 2  # gcsfs's own retries ran, until the deadline

# ----------------------------------------------------------------------------- Kaggle


def _kaggle(**kwargs):
  return fetch("tiny", source="kaggle", model_path=KAGGLE_HANDLE, **kwargs)


def test_kaggle_stall_mid_body_is_retried_after_the_read_timeout(kaggle, checkpoint, tmp_path,
                                                                 monkeypatch):
  monkeypatch.setenv("TUNIX_ZOO_READ_TIMEOUT_S", "1")
  kaggle.faults.stall(match="model.safetensors")
  start = time.monotonic()
  servers.assert_fetched(_kaggle(model_download_path=str(tmp_path / "dl")), checkpoint)
  assert time.monotonic() - start < 15
  assert kaggle.faults.count("model.safetensors", method="GET") >= 2


# ------------------------------------------------------ read-only folder, full disk


_CHILD = """
import json, os, resource, signal, sys
from tunix_zoo.sources import fetch
cases = json.loads(sys.argv[1])
results = {}
for name, kwargs in cases.items():
  if name.startswith("full"):
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a kill
    resource.setrlimit(resource.RLIMIT_FSIZE, (1024, 1024))
  try:
    fetch(**kwargs)
    results[name] = ["ok", ""]
  except Exception as e:
    results[name] = [type(e).__name__, str(e)]
print(json.dumps(results))
"""


@pytest.fixture
def unprivileged_fetch(monkeypatch):
  """Runs fetch cases in a process whose mode bits apply (root without CAP_DAC_OVERRIDE,
  through setpriv); full-disk cases (named ``full*``, run last) under a 1 KB file size
  limit."""
  if os.geteuid() != 0 or not shutil.which("setpriv"):
    pytest.skip("needs root and setpriv to drop CAP_DAC_OVERRIDE")
  base = pathlib.Path(tempfile.mkdtemp(prefix="i17-fetch-"))
  os.chmod(base, 0o777)
  for name in ("HF_HOME", "HF_HUB_CACHE", "TUNIX_ZOO_CACHE", "HOME"):
    monkeypatch.setenv(name, str(base / name.lower()))

  def run(cases: dict) -> dict:
    env = {**os.environ, "PYTHONPATH": str(pathlib.Path(__file__).resolve().parents[2])}
    proc = subprocess.run(["setpriv", "--bounding-set=-dac_override,-dac_read_search",
                           sys.executable, "-c", _CHILD, json.dumps(cases)], env=env,
                          capture_output=True, text=True, timeout=300, cwd=base)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])

  yield base, run
  shutil.rmtree(base, ignore_errors=True)  # root removes it whatever its mode bits


def test_read_only_and_full_download_folders_are_source_errors(hf_hub, gcs, unprivileged_fetch):
  base, run = unprivileged_fetch
  readonly = base / "readonly"
  readonly.mkdir(mode=0o555)
  full = {name: base / name for name in ("full_hub", "full_gcs")}
  for folder in full.values():
    folder.mkdir(mode=0o777)
  results = run({
      "readonly_hub": {"model_id": HF_REPO, "model_download_path": str(readonly / "hub")},
      "readonly_gcs": {"model_id": "tiny", "source": "gcs", "model_path": GCS_URL,
                       "token": "anon", "model_download_path": str(readonly / "gcs")},
      "full_hub": {"model_id": HF_REPO, "model_download_path": str(full["full_hub"])},
      "full_gcs": {"model_id": "tiny", "source": "gcs", "model_path": GCS_URL,
                   "token": "anon", "model_download_path": str(full["full_gcs"])},
  })
  for name in ("readonly_hub", "readonly_gcs"):
    kind, message = results[name]
    assert kind == "SourceError" and "Permission denied" in message, (name, message)
    assert str(readonly) in message and "model_download_path" in message
  assert list(readonly.iterdir()) == []
  for name, folder in full.items():
    kind, message = results[name]
    assert kind == "SourceError" and "File too large" in message, (name, message)
    assert "Free space" in message
    assert not (folder / "model.safetensors").exists()  # nothing half-written under its name
