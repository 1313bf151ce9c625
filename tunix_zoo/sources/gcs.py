"""Google Cloud Storage folders (``gs://bucket/prefix``), through gcsfs.

Two processes fetching into one folder take turns (a lock file in it). Every request
has the retry policy's connect and read timeouts (a server stalling mid-body is retried
like a drop), and failures are retried under :func:`tunix_zoo.sources._download.retry`.
gcsfs also retries each failing request itself (6 tries, about 31 s of backoff, whatever
its ``retries`` attribute says); the listing is cut at the policy's deadline all the same
(fsspec's ``timeout``), so that a bucket answering 5xx, or nothing, fails within
``TUNIX_ZOO_RETRY_DEADLINE_S``.

The prefix is listed, the safetensors, configs and tokenizer files are downloaded in
parallel, each into a partial file that becomes the real one by an atomic rename once
its size and md5 check out; a marker under ``<folder>/.tunix_zoo/gcs/`` records the
object's size, generation and etag. A later call skips every file whose marker matches
the listing, re-downloads objects that changed, and resumes cut-off partial files of
the same generation::

    folder = fetch("gs://my-bucket/checkpoints/qwen3-0.6b")
    folder = fetch("gs://my-bucket/checkpoints/qwen3-0.6b", local_files_only=True)

Credentials are gcsfs's (``token=None``: application default credentials, then the
metadata server, then anonymous; a path to a service-account JSON; ``"anon"``).
``STORAGE_EMULATOR_HOST`` points gcsfs at another endpoint. Credentials are never
logged.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import hashlib
import json
import os
import pathlib
import re
import threading
import time
from typing import Any

import aiohttp
import gcsfs
import google.auth.exceptions
import requests

from tunix_zoo import progress
from tunix_zoo.errors import SourceError, exception_chain, http_status
from tunix_zoo.sources import _download

SOURCE = "gcs"
_BUCKET = re.compile(r"[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]")
_URL_FIX = "Pass model_path='gs://<bucket>/<folder holding config.json>'."
_STATE = ".tunix_zoo"  # bookkeeping inside the download folder; hidden from check_folder
_CHUNK = 32 * 1024 * 1024
_MAX_WORKERS = 8


class _ChecksumMismatch(OSError):
  """The bytes on disk do not hash to the md5 the listing gave: download again."""


def parse_url(url: str) -> tuple[str, str]:
  """Splits ``gs://bucket/prefix`` into the bucket and the prefix (no trailing slash).

  Raises:
    SourceError: not a ``gs://`` URL, an invalid bucket name, or a prefix with ``..``,
      empty parts or backslashes.
  """
  if not isinstance(url, str) or not url.startswith("gs://"):
    raise _download.source_error(SOURCE, repr(url), "a GCS path must start with 'gs://'.",
                                 _URL_FIX)
  bucket, _, prefix = url[len("gs://"):].rstrip("/").partition("/")
  if not _BUCKET.fullmatch(bucket) or ".." in bucket:
    raise _download.source_error(SOURCE, url, f"{bucket!r} is not a valid bucket name.",
                                 _URL_FIX)
  if prefix:
    _download.check_relative_name(prefix, source=SOURCE, ref=url)
  return bucket, prefix


def _default_folder(bucket: str, prefix: str) -> pathlib.Path:
  return _download.cache_root() / "gcs" / bucket / prefix


def _identity(info: dict[str, Any]) -> dict[str, Any]:
  """What makes an object version distinct; a change means a new download."""
  return {"size": int(info["size"]), "generation": str(info.get("generation") or ""),
          "etag": info.get("etag"), "md5": info.get("md5Hash")}


def _marker(folder: pathlib.Path, name: str) -> pathlib.Path:
  return folder / _STATE / "gcs" / f"{name}.json"


def _is_complete(folder: pathlib.Path, name: str, identity: dict[str, Any] | None,
                 rehash: bool = False) -> bool:
  """Whether ``name`` is on disk whole, and (when given) still the listed object; with
  ``rehash``, also whether its bytes still hash to the listed md5."""
  recorded = _download.read_json(_marker(folder, name))
  if not isinstance(recorded, dict) or (identity is not None and recorded != identity):
    return False
  target = folder / name
  if not (target.is_file() and target.stat().st_size == recorded.get("size")):
    return False
  return not (rehash and recorded.get("md5") and _md5_b64(target) != recorded["md5"])


def _md5_b64(path: pathlib.Path) -> str:
  h = hashlib.md5()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return base64.b64encode(h.digest()).decode()


def _download_one(fs: Any, remote: str, folder: pathlib.Path, name: str,
                  identity: dict[str, Any], bar: Any, bar_lock: threading.Lock) -> None:
  """Downloads one object into ``folder/name`` through a resumable partial file."""
  size, generation = identity["size"], identity["generation"]
  partial = folder / _STATE / "partial" / f"{name}.{generation or 'latest'}.part"
  partial.parent.mkdir(parents=True, exist_ok=True)
  offset = partial.stat().st_size if partial.exists() else 0
  if offset > size:
    offset = 0
  with open(partial, "r+b" if offset else "wb") as f:
    f.seek(offset)
    f.truncate()
    while offset < size:
      end = min(offset + _CHUNK, size)
      data = fs.cat_file(remote, start=offset, end=end, generation=generation or None)
      if not data:
        raise _ChecksumMismatch(f"empty read at byte {offset} of {size}")
      f.write(data)
      f.flush()  # what reached the OS survives a crash, and the next call resumes after it
      offset += len(data)
      with bar_lock:
        bar.update(len(data))
    f.flush()
    os.fsync(f.fileno())
  if identity["md5"] and _md5_b64(partial) != identity["md5"]:
    partial.unlink()
    raise _ChecksumMismatch(f"md5 of gs://{remote} does not match its listing")
  target = folder / name
  target.parent.mkdir(parents=True, exist_ok=True)
  os.replace(partial, target)
  _download.atomic_write_text(_marker(folder, name), json.dumps(identity))
  if identity["md5"]:
    _download.record_checksums(folder, source=SOURCE, ref=f"gs://{remote}", files={name: {
        "size": size, "algorithm": _download.MD5,
        "digest": base64.b64decode(identity["md5"]).hex()}})


def _is_transient(exc: BaseException) -> bool:
  """Worth another try: a checksum mismatch, a drop, a stall past the read timeout, 5xx."""
  if isinstance(exc, FileNotFoundError) or _download.disk_error(
      exc, source=SOURCE, ref="", folder=None):
    return False
  status = http_status(exc)
  if status is not None:
    return status in _download.TRANSIENT_STATUS
  return any(isinstance(e, (_ChecksumMismatch, aiohttp.ClientError, asyncio.TimeoutError,
                            requests.RequestException, ConnectionError, TimeoutError))
             for e in exception_chain(exc))


def _filesystem(token: Any) -> gcsfs.GCSFileSystem:
  """A gcsfs client whose every request has the policy's timeouts."""
  policy = _download.retry_policy()
  # A fresh instance: fsspec's instance and listing caches would hide changed objects.
  fs = gcsfs.GCSFileSystem(
      token=token, skip_instance_cache=True, use_listings_cache=False,
      requests_timeout=aiohttp.ClientTimeout(total=None, sock_connect=policy.connect_timeout_s,
                                             sock_read=policy.read_timeout_s))
  return fs


def _list(fs: gcsfs.GCSFileSystem, root: str, url: str) -> dict[str, Any]:
  """``root``'s objects (path -> info), given up on within the retry policy's deadline,
  gcsfs's own retries of each request included."""
  policy = _download.retry_policy()
  deadline = time.monotonic() + policy.deadline_s
  # fsspec's ``timeout`` cancels the call (and gcsfs's backoff in it) when it runs out.
  return _download.retry(
      lambda: fs.find(root, detail=True, timeout=max(deadline - time.monotonic(), 0.01)),
      is_transient=_is_transient, what=f"GCS listing of {url}", policy=policy)


def _to_source_error(exc: BaseException, url: str,
                     folder: pathlib.Path | None = None) -> SourceError | None:
  # A local write that failed is reported as such, whatever it was raised while handling.
  disk = _download.disk_error(exc, source=SOURCE, ref=url, folder=folder)
  if disk is not None:
    return disk
  chain = list(exception_chain(exc))
  status = http_status(exc)
  creds_fix = ("Run `gcloud auth application-default login`, set "
               "GOOGLE_APPLICATION_CREDENTIALS, or pass token=<service-account JSON path>; "
               "for a public bucket pass token='anon'.")
  if status == 401 or any(isinstance(e, google.auth.exceptions.GoogleAuthError) for e in chain):
    return _download.source_error(SOURCE, url, "GCS refused the credentials (HTTP 401).",
                                  creds_fix)
  if status == 403 or any(isinstance(e, OSError) and str(e).startswith("Forbidden")
                          for e in chain):
    return _download.source_error(
        SOURCE, url, "GCS denied access (HTTP 403).",
        "Use credentials with storage.objects.list and storage.objects.get on the bucket. "
        + creds_fix)
  if any(isinstance(e, FileNotFoundError) and e.errno is None for e in chain):
    return _download.source_error(
        SOURCE, url, "the bucket or an object of it does not exist (HTTP 404).",
        "Check the path with `gcloud storage ls " + url + "`; if the objects were being "
        "rewritten, run the call again.")
  if any(isinstance(e, _ChecksumMismatch) for e in chain):
    return _download.source_error(
        SOURCE, url, "downloaded bytes did not match the listed md5 on every "
        "try of the retry policy.", "Run the call again; if it persists, the "
        "object may be changing while it is read.")
  if (status is not None and status >= 500) or any(
      isinstance(e, (aiohttp.ClientError, requests.RequestException, asyncio.TimeoutError,
                     ConnectionError, TimeoutError)) for e in chain):
    endpoint = os.environ.get("STORAGE_EMULATOR_HOST") or "https://storage.googleapis.com"
    return _download.source_error(
        SOURCE, url, f"could not reach GCS at {endpoint} within the retry policy "
        f"({_download.retry_policy().deadline_s:g} s; {type(exc).__name__}).",
        "Check your network (and STORAGE_EMULATOR_HOST if set); if the files are already "
        "downloaded, pass local_files_only=True.")
  if status is not None:
    return _download.source_error(SOURCE, url, f"GCS answered HTTP {status}.",
                                  "Retry later; if it persists, check the bucket's settings.")
  return None


def _offline(url: str, folder: pathlib.Path) -> pathlib.Path:
  record = _download.read_json(folder / _STATE / "gcs-manifest.json")
  if (isinstance(record, dict) and record.get("url") == url
      and all(_is_complete(folder, n, None) for n in record.get("files", []))):
    return _download.check_folder(folder, source=SOURCE, ref=url)
  raise _download.source_error(
      SOURCE, url, f"local_files_only=True and no complete download of it is in {folder}.",
      "Run once with local_files_only=False (and the same model_download_path) first.")


def fetch(url: str, *, download_dir: str | os.PathLike[str] | None = None,
          token: Any = None, local_files_only: bool = False,
          verify: bool = False) -> pathlib.Path:
  """Downloads the safetensors, configs and tokenizer files under a ``gs://`` prefix.

  Args:
    url: ``gs://bucket/prefix``, the folder holding config.json.
    download_dir: folder to put the files in; default
      ``<cache_root>/gcs/<bucket>/<prefix>``.
    token: gcsfs credentials (see the module docstring); None for the defaults.
    local_files_only: never call GCS; return the folder if an earlier call completed it.
    verify: re-hash files downloaded before against the listed md5; fetch bad ones again.

  Returns:
    The folder holding config.json and the ``*.safetensors`` files.

  Raises:
    SourceError: malformed URL, nothing loadable under the prefix, missing bucket,
      refused credentials, GCS unreachable, or offline with nothing downloaded.
  """
  bucket, prefix = parse_url(url)
  folder = (pathlib.Path(download_dir).expanduser() if download_dir is not None
            else _default_folder(bucket, prefix)).resolve()
  if local_files_only:
    return _offline(url, folder)
  fs = _filesystem(token)
  root = f"{bucket}/{prefix}".rstrip("/")
  try:
    with _download.folder_lock(folder, source=SOURCE, ref=url):
      listing = _list(fs, root, url)
      objects = {path[len(root) + 1:]: info for path, info in listing.items()
                 if path.startswith(root + "/") and not path.endswith("/")}
      if not objects:
        raise _download.source_error(SOURCE, url, "no objects under this prefix.",
                                     "Check the path with `gcloud storage ls " + url + "`.")
      names = _download.select_files(objects, source=SOURCE, ref=url)
      identities = {n: _identity(objects[n]) for n in names}
      todo = [n for n in names if not _is_complete(folder, n, identities[n], rehash=verify)]
      total = sum(identities[n]["size"] for n in todo)
      bar_lock = threading.Lock()
      with progress.progress_class()(total=total, unit="B", unit_scale=True,
                                       desc=f"Downloading {len(todo)} files from {url}") as bar, \
          concurrent.futures.ThreadPoolExecutor(_MAX_WORKERS) as pool:
        _download.wait_all([pool.submit(
            _download.retry,
            lambda n=n: _download_one(fs, f"{root}/{n}", folder, n, identities[n], bar,
                                      bar_lock),
            is_transient=_is_transient, what=f"GCS download of {url}/{n}") for n in todo])
      _download.atomic_write_text(folder / _STATE / "gcs-manifest.json",
                                  json.dumps({"url": url, "files": names}, indent=1))
  except SourceError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    error = _to_source_error(e, url, folder)
    if error is None:
      raise
    raise error from e
  return _download.check_folder(folder, source=SOURCE, ref=url)
