"""save_pretrained under faults: a replaced checkpoint is never lost, staging debris is
cleaned, and a full disk or a read-only folder is an ExportError with nothing left
half-written."""

from __future__ import annotations

import fcntl
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import pytest

from tests.sources import servers
from tunix_zoo.automodel import load_folder
from tunix_zoo.checkpoint import export
from tunix_zoo.checkpoint.reader import CheckpointFiles
from tunix_zoo.errors import ExportError

_REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  """Two different tiny models, to tell which one a folder holds."""
  first = load_folder(servers.make_checkpoint(tmp_path_factory.mktemp("a"), seed=0))
  second_folder = servers.make_checkpoint(tmp_path_factory.mktemp("b"), seed=1)
  second = load_folder(second_folder)
  second.source_folder = second_folder
  return first, second


def _embedding(folder: pathlib.Path) -> np.ndarray:
  with CheckpointFiles(folder) as files:
    return files.read("model.embed_tokens.weight")


def _hidden(folder: pathlib.Path) -> list[str]:
  return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_exchange_paths_swaps_two_folders(tmp_path):
  (tmp_path / "a").mkdir()
  (tmp_path / "a" / "from_a").touch()
  (tmp_path / "b").mkdir()
  (tmp_path / "b" / "from_b").touch()
  assert export.exchange_paths(tmp_path / "a", tmp_path / "b")  # Linux, ext4/tmpfs
  assert [p.name for p in (tmp_path / "a").iterdir()] == ["from_b"]
  assert [p.name for p in (tmp_path / "b").iterdir()] == ["from_a"]


def test_overwrite_replaces_in_one_step_and_leaves_nothing_hidden(models, tmp_path):
  first, second = models
  out = tmp_path / "out"
  export.save_pretrained(first, out)
  export.save_pretrained(second, out, overwrite=True)
  np.testing.assert_array_equal(_embedding(out), _embedding(second.source_folder))
  assert _hidden(tmp_path) == []


def test_a_kill_between_the_two_renames_is_recovered_by_the_next_call(models, tmp_path):
  first, second = models
  out = tmp_path / "out"
  export.save_pretrained(first, out)
  old = _embedding(out)
  # What the two-rename fallback leaves when killed between its renames.
  os.replace(out, tmp_path / ".out.replaced-0123456789ab")
  with pytest.raises(ExportError, match="already exists and is not empty"):
    export.save_pretrained(second, out)  # puts the old checkpoint back, then refuses
  np.testing.assert_array_equal(_embedding(out), old)
  assert _hidden(tmp_path) == []
  export.save_pretrained(second, out, overwrite=True)
  assert not np.array_equal(_embedding(out), old)


def test_stale_partial_folders_are_deleted_after_a_successful_export(models, tmp_path):
  first, _ = models
  dead = tmp_path / ".out.partial-deadbeef0000"  # a killed export's staging folder
  dead.mkdir()
  (dead / "model.safetensors").write_bytes(b"half")
  live = tmp_path / ".out.partial-livelivelive"  # another process's, still being filled
  live.mkdir()
  fd = os.open(live, os.O_RDONLY)
  fcntl.flock(fd, fcntl.LOCK_EX)
  try:
    export.save_pretrained(first, tmp_path / "out")
  finally:
    os.close(fd)
  assert _hidden(tmp_path) == [live.name]


@pytest.mark.parametrize("out_dir, overwrite, message", [
    (None, False, "out_dir=None is not a folder path"),
    ("", False, "out_dir='' is not a folder path"),
    ("x", "yes", "overwrite='yes' must be True or False"),
])
def test_bad_arguments(models, tmp_path, monkeypatch, out_dir, overwrite, message):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(ExportError, match=message):
    export.save_pretrained(models[0], out_dir, overwrite=overwrite)
  assert list(tmp_path.iterdir()) == []


_CHILD = """
import json, os, resource, signal, sys
from tests.sources import servers
from tunix_zoo.automodel import load_folder
from tunix_zoo.checkpoint.export import save_pretrained
args = json.loads(sys.argv[1])
model = load_folder(args["checkpoint"])
os.setgid(65534); os.setuid(65534)  # nobody: mode bits apply (root bypasses them)
results = {}
try:
  save_pretrained(model, os.path.join(args["readonly"], "out"))
except Exception as e:
  results["readonly"] = [type(e).__name__, str(e)]
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a kill
resource.setrlimit(resource.RLIMIT_FSIZE, (1024, 1024))
try:
  save_pretrained(model, os.path.join(args["writable"], "out"))
except Exception as e:
  results["full"] = [type(e).__name__, str(e)]
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def unprivileged_exports(tmp_path_factory):
  """Runs the read-only and full-disk exports in one process without root's bypass."""
  if os.geteuid() != 0:
    pytest.skip("needs root to switch to the unprivileged user")
  base = pathlib.Path(tempfile.mkdtemp(prefix="i17-export-"))
  os.chmod(base, 0o755)
  checkpoint = servers.make_checkpoint(base / "ckpt")
  for p in [checkpoint, *checkpoint.iterdir()]:
    os.chmod(p, 0o755 if p.is_dir() else 0o644)
  readonly, writable = base / "readonly", base / "writable"
  readonly.mkdir(mode=0o555)
  writable.mkdir()
  os.chown(writable, 65534, 65534)
  env = {**os.environ, "PYTHONPATH": str(_REPO_ROOT), "XLA_FLAGS": "", "HOME": str(base)}
  proc = subprocess.run(
      [sys.executable, "-c", _CHILD, json.dumps({"checkpoint": str(checkpoint),
                                                  "readonly": str(readonly),
                                                  "writable": str(writable)})],
      env=env, cwd=_REPO_ROOT, capture_output=True, text=True, timeout=300)
  try:
    assert proc.returncode == 0, proc.stderr[-3000:]
    yield json.loads(proc.stdout.strip().splitlines()[-1]), readonly, writable
  finally:
    shutil.rmtree(base, ignore_errors=True)  # root removes it whatever its mode bits


@pytest.mark.slow
def test_read_only_folder_is_an_export_error_naming_it(unprivileged_exports):
  results, readonly, _ = unprivileged_exports
  kind, message = results["readonly"]
  assert kind == "ExportError"
  assert str(readonly) in message and "Permission denied" in message
  assert list(readonly.iterdir()) == []


@pytest.mark.slow
def test_full_disk_is_an_export_error_and_nothing_is_left(unprivileged_exports):
  results, _, writable = unprivileged_exports
  kind, message = results["full"]
  assert kind == "ExportError"
  assert str(writable) in message and "Free space" in message
  assert list(writable.iterdir()) == []
