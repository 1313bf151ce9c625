"""What the sources downloaded: list it, re-hash it, remove one model of it.

Three caches are read, each in its own layout:

* Hugging Face: huggingface_hub's cache (``HF_HUB_CACHE``), through its own
  ``scan_cache_dir`` and ``delete_revisions``. One entry per cached revision, named
  ``owner/name@<commit>``. A blob's name is the hash the Hub gave for the file: the
  sha256 of an LFS file, the git blob sha1 of a regular one; verify re-hashes against it.
* Kaggle: kagglehub's cache (``KAGGLEHUB_CACHE``), one entry per downloaded version,
  ``owner/model/framework/variation/version``.
* GCS: tunix_zoo's download folders under ``<cache_root>/gcs/``, one entry per
  ``gs://bucket/prefix``.

Kaggle and GCS folders are verified against the checksums their server advertised, which
the download recorded (:func:`tunix_zoo.sources.read_checksums`: per file its size, the
algorithm and the digest; GCS gives md5s, Kaggle none); a folder without a record is
reported as :data:`NO_CHECKSUMS`, never as verified. Example::

    for entry in list_cached():
      print(entry.source, entry.model, entry.size, entry.last_used)
    [report] = verify("acme/tiny@1f2e3d4")
    report.ok, report.bad_files
    remove("acme/tiny@1f2e3d4")  # blobs another revision uses stay
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import shutil
from typing import Iterable, Iterator

from tunix_zoo.errors import CacheError

__all__ = ["CachedModel", "VerifyReport", "VERIFIED", "MISMATCH", "NO_CHECKSUMS",
           "list_cached", "find", "verify", "remove"]

VERIFIED = "verified"
MISMATCH = "mismatch"
NO_CHECKSUMS = "no recorded checksums"
HUGGINGFACE, KAGGLE, GCS = "huggingface", "kaggle", "gcs"
_KAGGLE_VERSION = re.compile(r"[0-9]+")
_GCS_RECORD = pathlib.Path(".tunix_zoo") / "gcs-manifest.json"


@dataclasses.dataclass(frozen=True)
class CachedModel:
  """One cached model: an HF revision, a Kaggle version or a GCS download folder."""

  source: str  # "huggingface", "kaggle" or "gcs"
  model: str  # what verify and remove take: repo@commit, a Kaggle handle, a gs:// URL
  path: pathlib.Path  # the folder a load reads
  size: int  # bytes on disk (an HF revision counts the blobs it links to)
  last_used: float  # seconds since the epoch: the latest access or change of its files
  refs: tuple[str, ...] = ()  # HF branches and tags pointing at the revision
  files: tuple[str, ...] = ()  # relative to ``path``


@dataclasses.dataclass(frozen=True)
class VerifyReport:
  """The outcome of re-hashing one cached model."""

  model: CachedModel
  status: str  # VERIFIED, MISMATCH or NO_CHECKSUMS
  checked: int  # files re-hashed
  bad_files: tuple[str, ...] = ()  # relative paths whose bytes or size are wrong, or missing

  @property
  def ok(self) -> bool:
    return self.status == VERIFIED


def list_cached(*, hf_cache_dir: str | os.PathLike[str] | None = None) -> list[CachedModel]:
  """Every cached model of the three sources, sorted by source then name.

  ``hf_cache_dir`` is the huggingface_hub cache root (default ``HF_HUB_CACHE``).
  """
  return [*_hf_entries(hf_cache_dir), *_kaggle_entries(), *_gcs_entries()]


def find(model: str, *, hf_cache_dir: str | os.PathLike[str] | None = None
         ) -> list[CachedModel]:
  """The cached entries ``model`` names.

  ``owner/name`` names every revision of an HF repo, ``owner/name@rev`` one (a commit,
  a prefix of one of at least 7 characters, or a branch or tag); a Kaggle handle without
  a version names every version; ``gs://bucket/prefix`` its download folder.

  Raises:
    CacheError: nothing cached matches (the message lists what is cached).
  """
  entries = list_cached(hf_cache_dir=hf_cache_dir)
  matched = [e for e in entries if _names(model, e)]
  if not matched:
    cached = ", ".join(e.model for e in entries) or "nothing"
    raise CacheError(f"{model!r} is not in the cache (cached: {cached}). `tunix-zoo cache "
                     "list` shows the names to use.")
  return matched


def verify(model: str | None = None, *,
           hf_cache_dir: str | os.PathLike[str] | None = None) -> list[VerifyReport]:
  """Re-hashes every file of ``model`` (default: of every cached model).

  Raises:
    CacheError: ``model`` is not cached.
  """
  entries = (find(model, hf_cache_dir=hf_cache_dir) if model is not None
             else list_cached(hf_cache_dir=hf_cache_dir))
  return [_verify_hf(e, hf_cache_dir) if e.source == HUGGINGFACE else _verify_recorded(e)
          for e in entries]


def remove(model: str, *, hf_cache_dir: str | os.PathLike[str] | None = None
           ) -> list[CachedModel]:
  """Deletes the cached files of ``model`` only; returns the entries removed.

  An HF revision goes through huggingface_hub's ``delete_revisions``, which keeps every
  blob another revision still links to; a Kaggle version loses its folder and kagglehub's
  completion markers; a GCS download loses the files its record lists and its record.

  Raises:
    CacheError: ``model`` is not cached.
  """
  entries = find(model, hf_cache_dir=hf_cache_dir)
  hf = [e for e in entries if e.source == HUGGINGFACE]
  if hf:
    import huggingface_hub  # pylint: disable=import-outside-toplevel

    info = huggingface_hub.scan_cache_dir(_hf_root(hf_cache_dir))
    info.delete_revisions(*(e.model.rpartition("@")[2] for e in hf)).execute()
  for entry in entries:
    if entry.source == KAGGLE:
      _remove_kaggle(entry)
    elif entry.source == GCS:
      _remove_gcs(entry)
  return entries


# -- Hugging Face ------------------------------------------------------------------------
def _hf_root(cache_dir: str | os.PathLike[str] | None) -> pathlib.Path:
  if cache_dir is not None:
    return pathlib.Path(cache_dir).expanduser()
  from huggingface_hub import constants  # pylint: disable=import-outside-toplevel

  return pathlib.Path(os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE)


def _hf_entries(cache_dir: str | os.PathLike[str] | None) -> list[CachedModel]:
  root = _hf_root(cache_dir)
  if not root.is_dir():
    return []
  import huggingface_hub  # pylint: disable=import-outside-toplevel

  entries = []
  for repo in huggingface_hub.scan_cache_dir(root).repos:
    if repo.repo_type != "model":
      continue
    for revision in repo.revisions:
      used = [max(f.blob_last_accessed, f.blob_last_modified) for f in revision.files]
      entries.append(CachedModel(
          source=HUGGINGFACE, model=f"{repo.repo_id}@{revision.commit_hash}",
          path=revision.snapshot_path, size=revision.size_on_disk,
          last_used=max(used, default=revision.last_modified), refs=tuple(sorted(revision.refs)),
          files=tuple(sorted(f.file_path.relative_to(revision.snapshot_path).as_posix()
                             for f in revision.files))))
  return sorted(entries, key=lambda e: e.model)


def _verify_hf(entry: CachedModel, cache_dir: str | os.PathLike[str] | None) -> VerifyReport:
  from tunix_zoo.sources import file_digest  # pylint: disable=import-outside-toplevel

  bad = []
  for name in entry.files:
    blob = (entry.path / name).resolve()
    expected = blob.name
    # A blob is named by the hash the Hub gave: sha256 (LFS) or the git blob id.
    algorithm = "sha256" if len(expected) == 64 else "git-sha1"
    if not blob.is_file() or file_digest(blob, algorithm) != expected:
      bad.append(name)
  return VerifyReport(entry, MISMATCH if bad else VERIFIED, len(entry.files), tuple(bad))


# -- Kaggle ------------------------------------------------------------------------------
def _kaggle_root() -> pathlib.Path:
  import kagglehub.config  # pylint: disable=import-outside-toplevel

  return pathlib.Path(kagglehub.config.get_cache_folder()).expanduser() / "models"


def _kaggle_entries() -> list[CachedModel]:
  root = _kaggle_root()
  if not root.is_dir():
    return []
  entries = []
  for folder in sorted(root.glob("*/*/*/*/*")):
    if folder.is_dir() and _KAGGLE_VERSION.fullmatch(folder.name):
      entries.append(_folder_entry(KAGGLE, folder.relative_to(root).as_posix(), folder,
                                   _visible_files(folder)))
  return entries


def _remove_kaggle(entry: CachedModel) -> None:
  variation = entry.path.parent
  shutil.rmtree(entry.path)
  _forget_checksums(entry.path)
  # kagglehub's per-file completion markers and the whole-version one.
  shutil.rmtree(variation / ".complete" / entry.path.name, ignore_errors=True)
  (variation / f"{entry.path.name}.complete").unlink(missing_ok=True)
  _prune_empty(variation, stop=_kaggle_root())


# -- GCS ---------------------------------------------------------------------------------
def _gcs_root() -> pathlib.Path:
  from tunix_zoo.sources._download import cache_root  # pylint: disable=import-outside-toplevel

  return cache_root() / "gcs"


def _gcs_entries() -> list[CachedModel]:
  root = _gcs_root()
  if not root.is_dir():
    return []
  entries = []
  for record_path in sorted(root.rglob(str(_GCS_RECORD))):
    folder = record_path.parent.parent
    try:
      record = json.loads(record_path.read_text(encoding="utf-8"))
      url, names = str(record["url"]), [str(n) for n in record["files"]]
    except (OSError, ValueError, KeyError, TypeError):
      continue  # a record cut off mid-write: that download never completed
    entries.append(_folder_entry(GCS, url, folder, names))
  return entries


def _remove_gcs(entry: CachedModel) -> None:
  # Only the listed files: another prefix's download may live in a sub-folder.
  for name in entry.files:
    (entry.path / name).unlink(missing_ok=True)
  _forget_checksums(entry.path)
  shutil.rmtree(entry.path / _GCS_RECORD.parent, ignore_errors=True)
  for name in entry.files:
    _prune_empty((entry.path / name).parent, stop=entry.path)
  _prune_empty(entry.path, stop=_gcs_root())


# -- recorded checksums and folders -------------------------------------------------------
def _verify_recorded(entry: CachedModel) -> VerifyReport:
  # pylint: disable-next=import-outside-toplevel
  from tunix_zoo.sources import file_digest, read_checksums

  bad = []
  checked = 0
  for name, record in sorted(read_checksums(entry.path).items()):
    if not (isinstance(record, dict) and isinstance(record.get("size"), int)
            and isinstance(record.get("algorithm"), str)
            and isinstance(record.get("digest"), str)):
      continue  # not a checksum we can test against
    path = entry.path / name
    checked += 1
    if (not path.is_file() or path.stat().st_size != record["size"]
        or file_digest(path, record["algorithm"]) != record["digest"].lower()):
      bad.append(name)
  if not checked:
    return VerifyReport(entry, NO_CHECKSUMS, 0)
  return VerifyReport(entry, MISMATCH if bad else VERIFIED, checked, tuple(bad))


def _forget_checksums(folder: pathlib.Path) -> None:
  from tunix_zoo.sources import checksum_record_path  # pylint: disable=import-outside-toplevel

  checksum_record_path(folder).unlink(missing_ok=True)


def _folder_entry(source: str, model: str, folder: pathlib.Path,
                  names: Iterable[str]) -> CachedModel:
  names = sorted(names)
  stats = [(folder / n).stat() for n in names if (folder / n).is_file()]
  return CachedModel(
      source=source, model=model, path=folder, size=sum(s.st_size for s in stats),
      last_used=max((max(s.st_atime, s.st_mtime) for s in stats), default=0.0),
      files=tuple(names))


def _visible_files(folder: pathlib.Path) -> Iterator[str]:
  for path in folder.rglob("*"):
    relative = path.relative_to(folder)
    if path.is_file() and not any(part.startswith(".") for part in relative.parts):
      yield relative.as_posix()


def _prune_empty(folder: pathlib.Path, *, stop: pathlib.Path) -> None:
  """Removes ``folder`` and its parents while they are empty, up to (not) ``stop``."""
  folder, stop = folder.resolve(), stop.resolve()
  while folder != stop and stop in folder.parents:
    try:
      folder.rmdir()
    except OSError:
      return
    folder = folder.parent


def _names(model: str, entry: CachedModel) -> bool:
  """Whether the user's ``model`` names ``entry``."""
  if entry.source == GCS:
    return model.rstrip("/") == entry.model.rstrip("/")
  if entry.source == KAGGLE:
    return model == entry.model or model == entry.model.rpartition("/")[0]
  repo_id, _, commit = entry.model.partition("@")
  wanted, _, revision = model.partition("@")
  if wanted != repo_id:
    return False
  return (not revision or revision in entry.refs
          or (len(revision) >= 7 and commit.startswith(revision)))
