"""Hugging Face Hub repos, through huggingface_hub's cache, resume and offline logic.

The repo's file list is read first, so that a repo publishing only pickle weights, or no
config.json, fails before anything is downloaded; then ``snapshot_download`` fetches the
safetensors, configs and tokenizer files only::

    folder = fetch("Qwen/Qwen3-0.6B", revision="main")
    folder = fetch("Qwen/Qwen3-0.6B", local_files_only=True)  # from the cache, no request

Every file is checked against the checksum the Hub advertised for it (its ETag: the
sha256 of an LFS file's content, the git blob id of any other) when it first arrives,
and again on every call with ``verify=True``; a file that does not match is deleted and
downloaded again, and never returned. The checksums are recorded under
:func:`tunix_zoo.sources._download.checksum_record_path`.

``HF_ENDPOINT``, ``HF_HUB_OFFLINE`` and ``HF_TOKEN`` are read at call time, so setting
them after ``huggingface_hub`` was imported still takes effect.
"""

from __future__ import annotations

import importlib
import json
import os
import pathlib
import re

import filelock
import huggingface_hub
from huggingface_hub import _local_folder as hf_local_folder
from huggingface_hub import constants as hf_constants
from huggingface_hub import errors as hf_errors

from tunix_zoo import progress
from tunix_zoo.errors import SourceError, exception_chain, http_status
from tunix_zoo.naming import validate_repo_id
from tunix_zoo.sources import _download

SOURCE = "huggingface"
_REVISION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)*")


def _transport_errors() -> tuple[type[BaseException], ...]:
  """Network-level failures of whichever HTTP client this huggingface_hub uses.

  huggingface_hub 0.x speaks through requests, 1.x through httpx, 2.x through httpx2.
  """
  found: list[type[BaseException]] = [ConnectionError, TimeoutError]
  for module, names in (("httpx2", ("TransportError",)), ("httpx", ("TransportError",)),
                        ("requests", ("ConnectionError", "Timeout"))):
    try:
      found.extend(getattr(importlib.import_module(module), n) for n in names)
    except ImportError:
      pass
  return tuple(found)


_TRANSPORT_ERRORS = _transport_errors()


class _ChecksumMismatch(OSError):
  """A downloaded file does not hash to the checksum the Hub advertised: download again."""


_HUB_RETRIED_STATUS = frozenset({408, 429, 500, 502, 503, 504})


def _truthy(value: str | None) -> bool:
  return (value or "").strip().lower() in ("1", "true", "yes", "on")


def _validate_revision(repo_id: str, revision: str) -> str:
  if len(revision) > 255 or not _REVISION.fullmatch(revision) or ".." in revision:
    raise _download.source_error(
        SOURCE, repo_id, f"revision {revision!r} is not a valid branch, tag or commit name.",
        "Pass a branch ('main'), a tag ('v1.0'), a 40-hex commit or 'refs/pr/N'.")
  return revision


def _is_transient(exc: BaseException) -> bool:
  if _download.disk_error(exc, source=SOURCE, ref="", folder=None):
    return False
  chain = list(exception_chain(exc))
  if any(isinstance(e, (hf_errors.OfflineModeIsEnabled, hf_errors.RepositoryNotFoundError,
                        hf_errors.RevisionNotFoundError)) for e in chain):
    return False
  if any(isinstance(e, _ChecksumMismatch) for e in chain):
    return True
  status = http_status(exc)
  if status is not None:
    # huggingface_hub retries a HEAD (file metadata) answered so five times itself; a
    # second layer of tries around it would multiply the wait.
    return status in _download.TRANSIENT_STATUS and not (
        _request_method(exc) == "HEAD" and status in _HUB_RETRIED_STATUS)
  # A truncated body ends in huggingface_hub's size "consistency check" OSError.
  return any(isinstance(e, _TRANSPORT_ERRORS) or "Consistency check failed" in str(e)
             for e in chain)


def _request_method(exc: BaseException) -> str | None:
  for e in exception_chain(exc):
    request = getattr(getattr(e, "response", None), "request", None)
    if request is not None:
      return getattr(request, "method", None)
  return None


def _advertised_checksum(folder: pathlib.Path, name: str,
                         local_dir: str | None) -> tuple[str, str] | None:
  """(algorithm, hex digest) the Hub's ETag gave for ``name``, as huggingface_hub kept it:
  the blob's file name in its cache, or the metadata file of a ``local_dir``."""
  if local_dir is None:
    etag = (folder / name).resolve().name
  else:
    metadata = hf_local_folder.read_download_metadata(pathlib.Path(local_dir), name)
    etag = metadata.etag if metadata is not None else ""
  if re.fullmatch(r"[0-9a-f]{64}", etag):
    return _download.SHA256, etag
  if re.fullmatch(r"[0-9a-f]{40}", etag):
    return _download.GIT_SHA1, etag
  return None


def _forget(folder: pathlib.Path, name: str, local_dir: str | None) -> None:
  """Deletes a bad file and huggingface_hub's record of it, so the next call fetches it."""
  path = folder / name
  if local_dir is None:
    path.resolve().unlink(missing_ok=True)  # the blob
  else:
    hf_local_folder.get_local_download_paths(pathlib.Path(local_dir), name).metadata_path \
        .unlink(missing_ok=True)
  path.unlink(missing_ok=True)


def _verify(folder: pathlib.Path, repo_id: str, local_dir: str | None,
            rehash_all: bool) -> None:
  """Hashes the files not yet verified (all of them when ``rehash_all``) against their
  advertised checksums; records the good ones, deletes the bad ones and raises."""
  recorded = _download.read_checksums(folder)
  good: dict[str, dict[str, object]] = {}
  bad: list[str] = []
  for path in sorted(folder.rglob("*")):
    name = path.relative_to(folder).as_posix()
    if any(part.startswith(".") for part in path.relative_to(folder).parts) or not path.is_file():
      continue
    advertised = _advertised_checksum(folder, name, local_dir)
    if advertised is None:
      continue
    entry = {"size": path.stat().st_size, "algorithm": advertised[0], "digest": advertised[1]}
    if not rehash_all and recorded.get(name) == entry:
      continue
    if _download.file_digest(path, advertised[0]) == advertised[1]:
      good[name] = entry
    else:
      bad.append(name)
      _forget(folder, name, local_dir)
  if good:
    _download.record_checksums(folder, source=SOURCE, ref=repo_id, files=good)
  if bad:
    raise _ChecksumMismatch(f"{', '.join(bad)} did not hash to the checksum the Hub "
                            "advertised; deleted")


def _clean_stale_partials(repo_id: str, cache_dir: str | os.PathLike[str] | None) -> None:
  """Deletes ``blobs/*.incomplete`` files that a killed download left in the repo's cache.

  huggingface_hub writes each blob to ``<etag>.<random>.incomplete`` under a lock
  ``.locks/<repo>/<etag>.lock``; a file whose lock is free belongs to no live download.
  """
  repo_folder = huggingface_hub.file_download.repo_folder_name(repo_id=repo_id,
                                                                repo_type="model")
  cache = pathlib.Path(cache_dir if cache_dir is not None else hf_constants.HF_HUB_CACHE)
  for partial in (cache / repo_folder / "blobs").glob("*.incomplete"):
    etag = partial.name.split(".", 1)[0]
    lock = filelock.FileLock(str(cache / ".locks" / repo_folder / f"{etag}.lock"))
    try:
      with lock.acquire(timeout=0):
        partial.unlink(missing_ok=True)
    except (filelock.Timeout, OSError):
      continue  # being written by another process, or not ours to delete


def _to_source_error(exc: BaseException, repo_id: str, revision: str | None,
                     endpoint: str, offline: bool,
                     folder: pathlib.Path | None = None) -> SourceError | None:
  """Translates a huggingface_hub failure into advice; None for unknown errors."""
  ref = f"{repo_id}@{revision}" if revision else repo_id
  disk = _download.disk_error(exc, source=SOURCE, ref=ref, folder=folder)
  if disk is not None:
    return disk
  page = f"{endpoint}/{repo_id}"
  token_fix = ("Set HF_TOKEN (or run `hf auth login`) or pass token=..., with a token that "
               f"can read the repo; for gated models accept the license at {page} first.")
  chain = list(exception_chain(exc))
  status = http_status(exc)
  for e in chain:
    if isinstance(e, hf_errors.GatedRepoError):
      return _download.source_error(SOURCE, ref, "the repo is gated.", token_fix)
    if isinstance(e, hf_errors.RevisionNotFoundError):
      return _download.source_error(
          SOURCE, ref, f"revision {revision!r} does not exist.",
          f"Check the branches, tags and commits at {page}, or leave revision unset for "
          "'main'.")
    if isinstance(e, hf_errors.RepositoryNotFoundError):
      problem = ("the Hub answered 401: the repo does not exist, or it is private or gated "
                 "and no valid token was sent." if status == 401
                 else "the repo does not exist on the Hub.")
      return _download.source_error(
          SOURCE, ref, problem, f"Check the id (see {page}). If the repo is private or "
          f"gated: {token_fix}")
  if offline and any(isinstance(e, (hf_errors.LocalEntryNotFoundError,
                                    hf_errors.OfflineModeIsEnabled)) for e in chain):
    return _download.source_error(
        SOURCE, ref, "offline mode (local_files_only=True or HF_HUB_OFFLINE=1) and the repo "
        "is not complete in the local cache.",
        "Run once with network access to fill the cache, or unset HF_HUB_OFFLINE / pass "
        "local_files_only=False.")
  if status in (401, 403):
    return _download.source_error(SOURCE, ref, f"the Hub refused access (HTTP {status}).",
                                  token_fix)
  if status == 404:
    return _download.source_error(
        SOURCE, ref, "the Hub answered 404 for a file of the repo.",
        f"Check that the repo and revision still exist at {page}.")
  if any(isinstance(e, json.JSONDecodeError) for e in chain):
    return _download.source_error(
        SOURCE, ref, f"{endpoint} answered with something that is not the Hub's JSON API "
        "(an HTML page from a proxy, captive portal or wrong HF_ENDPOINT?).",
        "Check HF_ENDPOINT and your proxy settings; open the endpoint in a browser to see "
        "what answers.")
  if any(isinstance(e, _ChecksumMismatch) for e in chain):
    return _download.source_error(
        SOURCE, ref, f"downloaded bytes did not match the checksum the Hub advertised, on "
        f"every try ({exc}).", "Run the call again; if it persists, a proxy or disk is "
        "corrupting data: check them.")
  if _is_transient(exc) or isinstance(exc, hf_errors.LocalEntryNotFoundError):
    return _download.source_error(
        SOURCE, ref, f"could not reach the Hub at {endpoint} within the retry policy "
        f"({_download.retry_policy().attempts} tries, {_download.retry_policy().deadline_s:g} s)"
        f" ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}).",
        "Check your network and HF_ENDPOINT; if the model is already in the cache, pass "
        "local_files_only=True or set HF_HUB_OFFLINE=1.")
  if status is not None:
    return _download.source_error(SOURCE, ref, f"the Hub answered HTTP {status}.",
                                  "Retry later; if it persists, check the repo page " + page)
  return None


def _allow_patterns(subfolder: str | None, variant: str | None) -> list[str]:
  """What snapshot_download fetches: the usual files, under ``subfolder`` when given, and
  of the weights only ``variant``'s (``model.<variant>[-i-of-n].safetensors``) when given."""
  weights = ([f"model.{variant}.safetensors", f"model.{variant}-*-of-*.safetensors"]
             if variant else ["*.safetensors"])
  patterns = [p for p in _download.ALLOW_PATTERNS if p != "*.safetensors"] + weights
  return [f"{subfolder}/{p}" if subfolder else p for p in patterns]


def _check_listing(names: list[str], repo_id: str, subfolder: str | None,
                   variant: str | None) -> None:
  """Raises SourceError unless the repo holds a checkpoint in ``subfolder`` of ``variant``."""
  if subfolder:
    inside = [n[len(subfolder) + 1:] for n in names if n.startswith(subfolder + "/")]
    if not inside:
      folders = sorted({n.split("/")[0] for n in names if "/" in n})
      raise _download.source_error(
          SOURCE, repo_id, f"the repo has no files under subfolder {subfolder!r}.",
          f"Its folders: {', '.join(folders) or 'none'}; pass one of them, or no subfolder.")
    names = inside
  _download.select_files(names, source=SOURCE, ref=repo_id)
  if variant is None:
    return
  present = {m.group(1) for n in names
             if (m := re.fullmatch(r"model\.([^.-]+)(?:-\d+-of-\d+)?\.safetensors", n))}
  if variant not in present:
    raise _download.source_error(
        SOURCE, repo_id, f"the repo has no weights of variant {variant!r} "
        f"(model.{variant}.safetensors).",
        f"Its variants: {', '.join(sorted(present)) or 'none'}; pass one of them, or no "
        "variant for model.safetensors.")


def fetch(repo_id: str, *, revision: str | None = None, token: str | None = None,
          download_dir: str | os.PathLike[str] | None = None,
          local_files_only: bool = False, verify: bool = False,
          subfolder: str | None = None, variant: str | None = None,
          cache_dir: str | os.PathLike[str] | None = None,
          force_download: bool = False) -> pathlib.Path:
  """Downloads a Hub repo's safetensors, configs and tokenizer files.

  Args:
    repo_id: ``owner/name`` on the Hub.
    revision: branch, tag or commit; the default branch when None.
    token: Hub token; None uses ``HF_TOKEN`` or the stored login.
    download_dir: put the files directly in this folder (``local_dir``) instead of the
      Hugging Face cache.
    local_files_only: use the cache only, never the network (also when
      ``HF_HUB_OFFLINE=1``).
    verify: re-hash every file, also those verified before, against the checksums the
      Hub advertised; bad ones are downloaded again.
    subfolder: the repo folder holding the checkpoint; only its files are fetched.
    variant: fetch only the ``model.<variant>.safetensors`` weights (and shards).
    cache_dir: the cache root instead of ``HF_HUB_CACHE``, as in transformers.
    force_download: fetch every file again, even when cached.

  Returns:
    The folder holding config.json and the ``*.safetensors`` files (``subfolder`` of the
    snapshot when given).

  Raises:
    SourceError: malformed id or revision, a repo without safetensors or config.json,
      missing repo/revision, refused access, an unreachable Hub, or offline with a
      cold cache.
  """
  validate_repo_id(repo_id)
  if revision is not None:
    _validate_revision(repo_id, revision)
  endpoint = (os.environ.get("HF_ENDPOINT") or hf_constants.ENDPOINT).rstrip("/")
  offline = (local_files_only or hf_constants.HF_HUB_OFFLINE
             or _truthy(os.environ.get("HF_HUB_OFFLINE")))
  local_dir = (str(pathlib.Path(download_dir).expanduser().resolve())
               if download_dir is not None else None)
  if subfolder is not None:
    subfolder = _download.check_relative_name(subfolder.strip("/"), source=SOURCE,
                                              ref=repo_id)
  if force_download and offline:
    raise _download.source_error(
        SOURCE, repo_id, "force_download=True needs the network, but offline mode is on "
        "(local_files_only=True or HF_HUB_OFFLINE=1).", "Drop one of the two.")
  what = f"Hub download of {repo_id}"
  try:
    if not offline:
      api = huggingface_hub.HfApi(endpoint=endpoint, token=token)
      info = _download.retry(lambda: api.model_info(repo_id, revision=revision),
                             is_transient=_is_transient, what=what)
      _check_listing([s.rfilename for s in info.siblings or []], repo_id, subfolder, variant)

    def download_and_verify() -> pathlib.Path:
      path = pathlib.Path(huggingface_hub.snapshot_download(
          repo_id, revision=revision, token=token, local_dir=local_dir,
          local_files_only=offline, allow_patterns=_allow_patterns(subfolder, variant),
          cache_dir=cache_dir, force_download=force_download,
          endpoint=endpoint, tqdm_class=progress.progress_class() if progress.quiet()
          else None))
      _verify(path, repo_id, local_dir, rehash_all=verify)
      return path

    path = _download.retry(download_and_verify, is_transient=_is_transient, what=what,
                           attempts=1 if offline else None)
    if local_dir is None and not offline:
      _clean_stale_partials(repo_id, cache_dir)
  except SourceError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    error = _to_source_error(e, repo_id, revision, endpoint, offline,
                             pathlib.Path(local_dir or hf_constants.HF_HUB_CACHE))
    if error is None:
      raise
    raise error from e
  return _download.check_folder(pathlib.Path(path, subfolder or ""), source=SOURCE,
                                ref=repo_id)
