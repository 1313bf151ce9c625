"""GCS source against gcp-storage-emulator, behind a fault-injecting proxy, on 127.0.0.1."""

from __future__ import annotations

import time

import pytest

from tests.sources import servers
from tests.sources.fixtures import GCS_BUCKET, GCS_PREFIX, GCS_URL, upload_to_gcs
from tunix_zoo.errors import SourceError
from tunix_zoo.sources import ModelSource, fetch

pytestmark = pytest.mark.servers
MEDIA = "alt=media"


def gcs_fetch(url: str = GCS_URL, **kwargs):
  return fetch("tiny", source=ModelSource.GCS, model_path=url, token="anon", **kwargs)


def test_round_trip_into_the_cache_folder(gcs, checkpoint, tmp_path):
  folder = gcs_fetch()
  assert folder == tmp_path / "zoo-cache/gcs" / GCS_BUCKET / GCS_PREFIX
  servers.assert_fetched(folder, checkpoint)
  assert gcs.faults.count(MEDIA) == len(servers.FETCHED)


def test_model_download_path_receives_files_directly(gcs, checkpoint, tmp_path):
  folder = gcs_fetch(model_download_path=str(tmp_path / "here"))
  assert folder == tmp_path / "here"
  servers.assert_fetched(folder, checkpoint)


def test_second_call_only_lists_and_offline_makes_no_request(gcs, checkpoint):
  first = gcs_fetch()
  gcs.faults.reset()
  assert gcs_fetch() == first
  assert gcs.faults.count(MEDIA) == 0 and gcs.faults.count() == 1  # the listing
  gcs.faults.reset()
  servers.assert_fetched(gcs_fetch(local_files_only=True), checkpoint)
  assert gcs.faults.hits == []


def test_offline_with_nothing_downloaded_says_what_to_do(gcs):
  with pytest.raises(SourceError, match=r"\[gcs\] gs://zoo-test/models/tiny: local_files_only"
                     r"=True and no complete download.*Run once"):
    gcs_fetch(local_files_only=True)
  assert gcs.faults.hits == []


def test_changed_object_is_downloaded_again(gcs, checkpoint, tmp_path):
  url = upload_to_gcs(gcs, checkpoint, "models/changing")
  gcs_fetch(url)
  newer = servers.make_checkpoint(tmp_path / "newer", seed=7)
  upload_to_gcs(gcs, newer, "models/changing")
  gcs.faults.reset()
  servers.assert_fetched(gcs_fetch(url), newer)
  # Every object written again has a new generation, even with the same bytes.
  assert gcs.faults.count(MEDIA) == len(servers.FETCHED)


@pytest.mark.parametrize("fault", ["status", "drop"])
def test_transient_failure_mid_file_is_retried(gcs, checkpoint, fault):
  if fault == "status":
    gcs.faults.status(503, match="model.safetensors")
  else:
    gcs.faults.drop(match="model.safetensors")
  servers.assert_fetched(gcs_fetch(), checkpoint)
  assert gcs.faults.count("model.safetensors") == 2


def test_killed_download_resumes_from_its_partial_file(gcs, checkpoint, tmp_path):
  # 256-byte reads, so the ~1 KB weights take several requests and a crash lands mid-file.
  prelude = "from tunix_zoo.sources import gcs; gcs._CHUNK = 256"
  gcs.faults.stall(match="model.safetensors", skip=1)
  proc = servers.fetch_in_subprocess(
      {"model_id": "tiny", "source": "gcs", "model_path": GCS_URL, "token": "anon"}, prelude)
  servers.kill_when_stalled(proc, gcs.faults)
  folder = tmp_path / "zoo-cache/gcs" / GCS_BUCKET / GCS_PREFIX
  assert not (folder / "model.safetensors").exists()
  partial, = (folder / ".tunix_zoo/partial").glob("model.safetensors.*.part")
  assert partial.stat().st_size == 256
  gcs.faults.reset()
  servers.assert_fetched(gcs_fetch(), checkpoint)
  assert [r for p, r in gcs.faults.ranges if "model.safetensors" in p] == [
      f"bytes=256-{(checkpoint / 'model.safetensors').stat().st_size - 1}"]


def test_missing_bucket_and_empty_prefix_are_clear_errors(gcs):
  with pytest.raises(SourceError, match=r"\[gcs\] gs://no-such-bucket/x: the bucket.*does not "
                     r"exist.*gcloud storage ls"):
    gcs_fetch("gs://no-such-bucket/x")
  with pytest.raises(SourceError, match="no objects under this prefix"):
    gcs_fetch(f"gs://{GCS_BUCKET}/models/nothing-here")


@pytest.mark.parametrize("status,match", [(401, "refused the credentials.*token='anon'"),
                                          (403, "denied access.*storage.objects.get")])
def test_refused_credentials_are_clear_errors(gcs, status, match):
  gcs.faults.status(status, match="/o")
  with pytest.raises(SourceError, match=match):
    gcs_fetch()


def test_pickle_only_prefix_is_refused_before_download(gcs, checkpoint, tmp_path):
  pickles = tmp_path / "pickles"
  pickles.mkdir()
  for name in ("config.json", "pytorch_model.bin"):
    (pickles / name).write_bytes((checkpoint / name).read_bytes())
  url = upload_to_gcs(gcs, pickles, "models/pickles")
  with pytest.raises(SourceError, match=r"only pickle weights.*safe_serialization=True"):
    gcs_fetch(url)
  assert gcs.faults.count(MEDIA) == 0


@pytest.mark.parametrize("url", ["s3://bucket/x", "gs://", "gs://Upper/x", "gs://b/x",
                                 "gs://zoo-test/models/../../etc", "gs://zoo-test/a//b",
                                 "gs://zoo-test/a\\b", "/local/folder", "gs://zoo..test/x"])
def test_malformed_urls_are_rejected_before_any_request(gcs, url):
  with pytest.raises(SourceError, match=r"\[gcs\]"):
    gcs_fetch(url)
  assert gcs.faults.hits == []


@pytest.mark.slow
def test_unreachable_endpoint_is_a_clear_error(gcs, monkeypatch):
  # gcsfs retries a refused connection 5 times with backoff (~30 s); the retry policy's
  # deadline (3 s here) ends that.
  monkeypatch.setenv("TUNIX_ZOO_RETRY_DEADLINE_S", "3")
  monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://{servers.LOCALHOST}:{servers.free_port()}")
  start = time.monotonic()
  with pytest.raises(SourceError, match=r"could not reach GCS at http://127\.0\.0\.1.*"
                     r"\(3 s;.*local_files_only=True"):
    gcs_fetch()
  assert time.monotonic() - start < 3 + 2
