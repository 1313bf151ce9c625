"""fetch()'s argument checks, the LOCAL source and the shared download plumbing (no servers)."""

from __future__ import annotations

import json
import pathlib
import time

import pytest

from tests.sources import servers
from tunix_zoo import progress
from tunix_zoo.errors import SourceError
from tunix_zoo.sources import ModelSource, _download, fetch


@pytest.mark.parametrize("kwargs,match", [
    ({"source": "s3"}, r"unknown source 's3'.*HUGGINGFACE, KAGGLE, GCS, LOCAL"),
    ({"model_path": "acme/x"}, r"\[huggingface\].*model_path.*pass the repo id as model_id"),
    ({"source": "kaggle"}, r"\[kaggle\].*model_path is required.*google/gemma-3/transformers"),
    ({"source": "gcs"}, r"\[gcs\].*model_path is required.*gs://"),
    ({"source": "kaggle", "model_path": "a/b/transformers/c", "revision": "main"},
     r"revision applies to HUGGINGFACE only.*end of the handle"),
    ({"source": "kaggle", "model_path": "a/b/transformers/c", "token": "t"},
     r"token applies to HUGGINGFACE.*KAGGLE_API_TOKEN"),
    ({"source": ModelSource.LOCAL, "model_path": "/x", "model_download_path": "/y"},
     r"model_download_path does not apply to a LOCAL folder"),
    ({"source": "gcs", "model_path": "/data/ckpt"}, r"must start with 'gs://'"),
])
def test_arguments_that_do_not_fit_the_source_are_refused(kwargs, match):
  with pytest.raises(SourceError, match=match):
    fetch("acme/x", **kwargs)


def test_hub_needs_a_repo_id():
  with pytest.raises(SourceError, match=r"model_id is None.*repo id"):
    fetch(None)


def test_local_folder_round_trip(checkpoint):
  assert fetch(None, source="local", model_path=str(checkpoint)) == checkpoint.resolve()
  assert fetch(str(checkpoint), source=ModelSource.LOCAL) == checkpoint.resolve()


def test_local_errors_say_what_to_do(tmp_path, checkpoint):
  with pytest.raises(SourceError, match=r"\[local\] .*missing: the folder does not exist.*"
                     r"ModelSource.HUGGINGFACE"):
    fetch(None, source="local", model_path=str(tmp_path / "missing"))
  with pytest.raises(SourceError, match="this is a file, not a folder"):
    fetch(None, source="local", model_path=str(checkpoint / "config.json"))
  with pytest.raises(SourceError, match="no folder given"):
    fetch(None, source="local")


def _folder(root: pathlib.Path, names: dict[str, bytes]) -> pathlib.Path:
  for name, data in names.items():
    (root / name).parent.mkdir(parents=True, exist_ok=True)
    (root / name).write_bytes(data)
  return root


@pytest.mark.parametrize("names,match", [
    ({"config.json": b"{}", "pytorch_model.bin": b"x"},
     r"only pickle weights are published \(pytorch_model.bin\).*safe_serialization=True"),
    ({"model.safetensors": b"x"}, r"no config.json"),
    ({"config.json": b"{}"}, r"no \*.safetensors weights found \(files: config.json\)"),
])
def test_local_folders_without_a_loadable_checkpoint_are_explained(tmp_path, names, match):
  with pytest.raises(SourceError, match=match):
    fetch(None, source="local", model_path=str(_folder(tmp_path, names)))


def test_hidden_bookkeeping_does_not_count_as_checkpoint_files(tmp_path):
  folder = _folder(tmp_path, {".cache/config.json": b"{}", ".cache/model.safetensors": b"x"})
  with pytest.raises(SourceError, match="no \\*.safetensors"):
    fetch(None, source="local", model_path=str(folder))


def test_select_files_keeps_the_allow_list_only():
  names = ["config.json", "model-00001-of-00002.safetensors", "model.safetensors.index.json",
           "tokenizer.model", "merges.txt", "chat_template.jinja", "pytorch_model.bin",
           "weights.pt", "original/consolidated.00.pth", "README.md", ".gitattributes"]
  assert _download.select_files(names, source="gcs", ref="gs://b/m") == sorted(
      ["config.json", "model-00001-of-00002.safetensors", "model.safetensors.index.json",
       "tokenizer.model", "merges.txt", "chat_template.jinja"])


@pytest.mark.parametrize("name", ["../x.json", "/etc/x.json", "a/../../x.json", "a//b.json",
                                  "a\\b.json", "C:/x.json", "./x.json", ""])
def test_names_that_escape_the_folder_are_refused(name):
  with pytest.raises(SourceError, match="outside the download folder"):
    _download.select_files(["config.json", "model.safetensors", name], source="gcs",
                           ref="gs://b/m")


def test_retry_backs_off_on_transient_errors_only():
  calls = []

  def flaky() -> str:
    calls.append(1)
    if len(calls) < 3:
      raise ConnectionResetError("reset by peer")
    return "ok"

  assert _download.retry(flaky, is_transient=lambda e: isinstance(e, ConnectionError),
                         what="test", policy=_download.RetryPolicy(base_delay_s=0.01)) == "ok"
  assert len(calls) == 3
  calls.clear()
  with pytest.raises(ValueError):
    _download.retry(lambda: calls.append(1) or int("x"),
                    is_transient=lambda e: isinstance(e, ConnectionError), what="test")
  assert len(calls) == 1


def test_retry_gives_up_after_the_last_attempt():
  calls = []

  def down() -> None:
    calls.append(1)
    raise ConnectionRefusedError("down")

  with pytest.raises(ConnectionRefusedError):
    _download.retry(down, is_transient=lambda e: True, what="test", attempts=3,
                    policy=_download.RetryPolicy(base_delay_s=0.01))
  assert len(calls) == 3


def test_retry_starts_no_try_it_cannot_finish_before_the_deadline():
  calls = []

  def slow_failure() -> None:
    calls.append(time.monotonic())
    time.sleep(0.3)
    raise ConnectionResetError("reset")

  start = time.monotonic()
  with pytest.raises(ConnectionResetError):
    _download.retry(slow_failure, is_transient=lambda e: True, what="test",
                    policy=_download.RetryPolicy(attempts=100, base_delay_s=0.01,
                                                 deadline_s=1.0))
  assert time.monotonic() - start <= 1.0
  assert 2 <= len(calls) <= 3


def test_retry_policy_reads_the_environment(monkeypatch):
  monkeypatch.setenv("TUNIX_ZOO_RETRY_DEADLINE_S", "5")
  monkeypatch.setenv("TUNIX_ZOO_RETRY_ATTEMPTS", "2")
  policy = _download.retry_policy()
  assert (policy.deadline_s, policy.attempts) == (5.0, 2)
  monkeypatch.setenv("TUNIX_ZOO_RETRY_ATTEMPTS", "zero")
  with pytest.raises(SourceError, match="TUNIX_ZOO_RETRY_ATTEMPTS='zero' is not a positive int"):
    _download.retry_policy()


def test_quiet_mode_silences_progress_bars(monkeypatch, capsys):
  monkeypatch.setenv("TUNIX_ZOO_QUIET", "1")
  with progress.progress_class()(total=3, desc="quiet-bar") as bar:
    bar.update(3)
  assert "quiet-bar" not in capsys.readouterr().err
  monkeypatch.setenv("TUNIX_ZOO_QUIET", "0")
  with progress.progress_class()(total=3, desc="loud-bar") as bar:
    bar.update(3)
  assert "loud-bar" in capsys.readouterr().err


def test_cache_root_follows_the_environment(monkeypatch, tmp_path):
  monkeypatch.setenv("TUNIX_ZOO_CACHE", str(tmp_path / "z"))
  assert _download.cache_root() == tmp_path / "z"
  monkeypatch.delenv("TUNIX_ZOO_CACHE")
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  assert _download.cache_root() == tmp_path / "xdg" / "tunix_zoo"


def test_atomic_write_replaces_whole_files(tmp_path):
  target = tmp_path / "d" / "marker.json"
  _download.atomic_write_text(target, json.dumps({"a": 1}))
  _download.atomic_write_text(target, json.dumps({"a": 2}))
  assert _download.read_json(target) == {"a": 2}
  assert sorted(p.name for p in target.parent.iterdir()) == ["marker.json"]
  target.write_text("{truncated")
  assert _download.read_json(target) is None


def test_checkpoint_fixture_holds_what_the_server_tests_expect(checkpoint):
  assert {p.name for p in checkpoint.iterdir()} == set(servers.FETCHED + servers.NOT_FETCHED)
