"""``tunix_zoo.cache`` and ``tunix-zoo cache``, on caches filled by real downloads.

The HF cache holds two revisions of ``acme/tiny`` (sharing config and tokenizer blobs)
and one of ``acme/other``, downloaded from the local Hub server; Kaggle and GCS caches
are filled from their local servers.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import shutil
import subprocess

import pytest
from huggingface_hub import constants

from tests.sources import servers
from tests.sources.fixtures import GCS_URL, KAGGLE_HANDLE
from tunix_zoo import cache, cli
from tunix_zoo.automodel import AutoModel
from tunix_zoo.errors import CacheError, SourceError
from tunix_zoo.sources import ModelSource, _download, fetch

pytestmark = pytest.mark.servers


def flip_byte(path: pathlib.Path, offset: int = 100) -> None:
  data = bytearray(path.read_bytes())
  data[offset] ^= 0x01
  path.write_bytes(bytes(data))


@pytest.fixture
def two_repos(hf_hub, checkpoint, tmp_path):
  """(old commit, new commit, other commit) after downloading all three."""
  old = hf_hub.add_repo("acme/tiny", checkpoint)
  fetch("acme/tiny")
  retrained = servers.make_checkpoint(tmp_path / "retrained", seed=1)
  new = hf_hub.add_repo("acme/tiny", retrained)
  fetch("acme/tiny")
  other = hf_hub.add_repo("acme/other", servers.make_checkpoint(tmp_path / "other", seed=2))
  fetch("acme/other")
  assert len({old, new, other}) == 3
  return old, new, other


def test_list_shows_each_revision_with_size_and_refs(two_repos, capsys):
  old, new, other = two_repos
  entries = {e.model: e for e in cache.list_cached()}
  assert sorted(entries) == sorted([f"acme/tiny@{old}", f"acme/tiny@{new}",
                                    f"acme/other@{other}"])
  assert entries[f"acme/tiny@{new}"].refs == ("main",)
  assert entries[f"acme/tiny@{old}"].refs == ()
  for entry in entries.values():
    assert entry.source == "huggingface"
    assert set(servers.FETCHED) <= set(entry.files)
    assert entry.size == sum((entry.path / n).stat().st_size for n in entry.files)
    assert entry.last_used > 0

  assert cli.main(["cache", "list", "--json"]) == 0
  listed = json.loads(capsys.readouterr().out)
  assert {e["model"] for e in listed} == set(entries)
  assert cli.main(["cache", "list"]) == 0
  text = capsys.readouterr().out
  assert f"acme/tiny@{new}" in text and "main" in text and "KiB" in text


def test_verify_names_a_flipped_byte(two_repos, capsys):
  old, new, _ = two_repos
  assert all(r.ok and r.checked == len(r.model.files) for r in cache.verify())
  [old_entry] = cache.find(f"acme/tiny@{old}")
  flip_byte((old_entry.path / "model.safetensors").resolve())

  by_model = {r.model.model: r for r in cache.verify()}
  assert by_model[f"acme/tiny@{old}"].status == cache.MISMATCH
  assert by_model[f"acme/tiny@{old}"].bad_files == ("model.safetensors",)
  assert by_model[f"acme/tiny@{new}"].ok  # a blob of its own, untouched

  assert cli.main(["cache", "verify", f"acme/tiny@{old[:10]}"]) == 1
  out = capsys.readouterr().out
  assert "mismatch" in out and "model.safetensors" in out and old in out
  assert cli.main(["cache", "verify", "acme/tiny@main"]) == 0


def test_verify_reads_the_git_blob_sha1_of_regular_files(tmp_path):
  """Blobs of non-LFS files are named by their git sha1; checked against git itself."""
  path = tmp_path / "config.json"
  path.write_text('{"model_type": "llama"}\n')
  git = subprocess.run(["git", "hash-object", str(path)], capture_output=True, text=True,
                       check=True).stdout.strip()
  assert _download.file_digest(path, _download.GIT_SHA1) == git


def test_remove_a_revision_keeps_the_blobs_others_use(two_repos, monkeypatch, capsys):
  old, new, other = two_repos
  [old_entry] = cache.find(f"acme/tiny@{old}")
  blobs = old_entry.path.parents[1] / "blobs"
  shared = (old_entry.path / "config.json").resolve()
  assert shared == (cache.find(f"acme/tiny@{new}")[0].path / "config.json").resolve()
  own = (old_entry.path / "model.safetensors").resolve()

  assert cli.main(["cache", "remove", f"acme/tiny@{old}"]) == 0
  assert f"removed huggingface acme/tiny@{old}" in capsys.readouterr().out
  assert not old_entry.path.exists() and not own.exists()
  assert shared.exists() and blobs.is_dir()
  assert {e.model for e in cache.list_cached()} == {f"acme/tiny@{new}", f"acme/other@{other}"}
  assert all(r.ok for r in cache.verify())

  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
  for repo in ("acme/tiny", "acme/other"):
    model, _ = AutoModel.from_pretrained(repo, local_files_only=True)
    assert model.config.num_layers == 1
  with pytest.raises(SourceError, match="offline"):
    fetch("acme/tiny", revision=old, local_files_only=True)


def test_remove_a_repo_and_unknown_names(two_repos, capsys):
  _, _, other = two_repos
  assert [e.model.partition("@")[0] for e in cache.remove("acme/tiny")] == ["acme/tiny"] * 2
  assert [e.model for e in cache.list_cached()] == [f"acme/other@{other}"]
  with pytest.raises(CacheError, match="'acme/tiny' is not in the cache"):
    cache.remove("acme/tiny")
  assert cli.main(["cache", "verify", "acme/nothing"]) == 2
  assert "error: 'acme/nothing' is not in the cache" in capsys.readouterr().err


def record_checksums(folder: pathlib.Path, names, algorithm: str = "sha256") -> None:
  """Records checksums as a source that advertises them would (kagglehub gives none)."""
  files = {n: {"size": (folder / n).stat().st_size, "algorithm": algorithm,
               "digest": hashlib.new(algorithm, (folder / n).read_bytes()).hexdigest()}
           for n in names}
  _download.record_checksums(folder, source="kaggle", ref=str(folder), files=files)


def test_kaggle_versions_verify_by_recorded_checksums_and_remove(kaggle, checkpoint, tmp_path, capsys):
  kaggle.add_model(KAGGLE_HANDLE, 3, servers.make_checkpoint(tmp_path / "v3", seed=3))
  v2 = fetch(None, source=ModelSource.KAGGLE, model_path=f"{KAGGLE_HANDLE}/2")
  v3 = fetch(None, source=ModelSource.KAGGLE, model_path=f"{KAGGLE_HANDLE}/3")
  entries = {e.model: e for e in cache.list_cached()}
  assert sorted(entries) == [f"{KAGGLE_HANDLE}/2", f"{KAGGLE_HANDLE}/3"]
  assert entries[f"{KAGGLE_HANDLE}/2"].path == v2
  assert sorted(entries[f"{KAGGLE_HANDLE}/2"].files) == sorted(servers.FETCHED)

  [report] = cache.verify(f"{KAGGLE_HANDLE}/2")
  assert report.status == cache.NO_CHECKSUMS and not report.ok
  assert cli.main(["cache", "verify", f"{KAGGLE_HANDLE}/2"]) == 3
  assert "no recorded checksums" in capsys.readouterr().out

  record_checksums(v2, servers.FETCHED)
  record_checksums(v3, servers.FETCHED, "md5")
  assert all(r.ok for r in cache.verify(KAGGLE_HANDLE))
  flip_byte(v3 / "model.safetensors")
  [report] = cache.verify(f"{KAGGLE_HANDLE}/3")
  assert report.bad_files == ("model.safetensors",)

  cache.remove(f"{KAGGLE_HANDLE}/3")
  assert not v3.exists() and not _download.read_checksums(v3)
  assert [e.model for e in cache.list_cached()] == [f"{KAGGLE_HANDLE}/2"]
  kaggle.faults.status(503, times=100)  # offline in effect: no request may succeed
  assert fetch(None, source=ModelSource.KAGGLE, model_path=KAGGLE_HANDLE,
               local_files_only=True) == v2


@pytest.mark.slow
def test_gcs_download_lists_verifies_and_removes(gcs, checkpoint, tmp_path):
  folder = fetch(None, source=ModelSource.GCS, model_path=GCS_URL, token="anon")
  [entry] = cache.list_cached()
  assert (entry.source, entry.model, entry.path) == ("gcs", GCS_URL, folder)
  # The download recorded the md5 the bucket advertised for every file.
  [report] = cache.verify(GCS_URL)
  assert report.ok and report.checked == len(servers.FETCHED)
  (folder / "tokenizer.json").unlink()
  assert cache.verify(GCS_URL)[0].bad_files == ("tokenizer.json",)
  nested = folder / "keep-me.txt"  # not listed by the record: not this download's file
  nested.write_text("x")
  cache.remove(GCS_URL + "/")
  assert cache.list_cached() == [] and nested.exists()
  assert not (folder / "model.safetensors").exists()
  shutil.rmtree(folder)


def test_a_record_without_usable_checksums_is_not_a_pass(kaggle, checkpoint):
  folder = fetch(None, source=ModelSource.KAGGLE, model_path=f"{KAGGLE_HANDLE}/2")
  _download.record_checksums(folder, source="kaggle", ref="x", files={
      "model.safetensors": {"size": 1}, "config.json": "not a record"})
  [report] = cache.verify(f"{KAGGLE_HANDLE}/2")
  assert report.status == cache.NO_CHECKSUMS and not report.ok
