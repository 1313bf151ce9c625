"""Kaggle Models, through kagglehub's downloader, cache and completion markers.

A handle is ``owner/model/framework/variation`` with an optional ``/version``. The
version's file list is read first (so pickle-only variations fail before any download),
then only the safetensors, configs and tokenizer files (or, for a Flax variation, the
orbax checkpoint folder and ``tokenizer.model``) are fetched, one
``kagglehub.model_download(handle, path=file)`` each, in parallel::

    folder = fetch("google/gemma-3/transformers/gemma-3-1b-it/1")
    folder = fetch("google/gemma-3/transformers/gemma-3-1b-it", local_files_only=True)

kagglehub marks each finished file complete; a file cut off mid-way has no marker and is
fetched again by the next call. With ``model_download_path`` each file is downloaded
into a hidden staging folder inside it and renamed to its final name once complete, so
a killed download never leaves a half file under a real name. Every request has the
retry policy's connect and read timeouts (kagglesdk sets none): a server stalling
mid-body is retried like a drop. tunix_zoo records which files a version needs under
:func:`tunix_zoo.sources._download.cache_root`, so that a later call for a pinned
version (or any call with ``local_files_only=True``) makes no request at all.
Credentials are kagglehub's: ``KAGGLE_API_TOKEN``, ``KAGGLE_USERNAME`` +
``KAGGLE_KEY``, or ``~/.kaggle/kaggle.json``.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import hashlib
import json
import os
import pathlib
import re
from typing import Callable, Iterator, TypeVar

import kagglehub
import kagglehub.cache
import kagglehub.clients
import kagglehub.config
import kagglehub.exceptions
import kagglehub.handle
import requests
import requests.adapters
import urllib3.exceptions
from kagglesdk import kaggle_http_client
from kagglesdk.kaggle_env import get_endpoint, get_env
from kagglesdk.models.types import model_api_service

from tunix_zoo.errors import SourceError, exception_chain, http_status
from tunix_zoo.sources import _download

SOURCE = "kaggle"
_SLUG = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_HANDLE_FIX = ("Pass model_path='owner/model/framework/variation[/version]', e.g. "
               "'google/gemma-3/transformers/gemma-3-1b-it/1'.")
_MAX_WORKERS = 8  # kagglehub's own cap on parallel file downloads
_PAGE_SIZE = 25  # what kagglehub itself asks for
_STAGING = pathlib.Path(".tunix_zoo") / "kaggle-staging"
T = TypeVar("T")


class _TimeoutAdapter(requests.adapters.HTTPAdapter):
  """Gives every request without a timeout the retry policy's connect and read timeouts."""

  def send(self, request, **kwargs):  # noqa: ANN001, ANN201 (requests' signature)
    if kwargs.get("timeout") is None:
      policy = _download.retry_policy()
      kwargs["timeout"] = (policy.connect_timeout_s, policy.read_timeout_s)
    return super().send(request, **kwargs)


def _bound_kagglesdk_requests() -> None:
  """Mounts :class:`_TimeoutAdapter` on every session kagglesdk opens.

  kagglesdk's client sends its calls, downloads included, with no timeout and offers no
  setting for one; its sessions are made in ``KaggleHttpClient._init_session``.
  """
  client = kaggle_http_client.KaggleHttpClient
  original = client._init_session  # pylint: disable=protected-access
  if getattr(original, "bounded_by_tunix_zoo", False):
    return

  def init_session(self):  # noqa: ANN001, ANN202
    fresh = self._session is None  # pylint: disable=protected-access
    result = original(self)
    if fresh and self._session is not None:  # pylint: disable=protected-access
      for prefix in ("http://", "https://"):
        self._session.mount(prefix, _TimeoutAdapter())  # pylint: disable=protected-access
    return result

  init_session.bounded_by_tunix_zoo = True
  client._init_session = init_session  # pylint: disable=protected-access


_bound_kagglesdk_requests()


@dataclasses.dataclass(frozen=True)
class KaggleRef:
  """A validated Kaggle model handle."""

  owner: str
  model: str
  framework: str
  variation: str
  version: int | None = None

  def __str__(self) -> str:
    parts = [self.owner, self.model, self.framework, self.variation]
    return "/".join(parts + ([str(self.version)] if self.version else []))

  @property
  def page(self) -> str:
    parts = (self.owner, self.model, self.framework, self.variation)
    return "https://www.kaggle.com/models/" + "/".join(parts)

  def handle(self) -> kagglehub.handle.ModelHandle:
    return kagglehub.handle.ModelHandle(self.owner, self.model, self.framework,
                                        self.variation, self.version)


def parse_handle(handle: str) -> KaggleRef:
  """Parses ``owner/model/framework/variation[/version]``, rejecting anything else.

  Every part must be a plain slug, so that no handle can address a path outside
  kagglehub's cache or ``model_download_path``.

  Raises:
    SourceError: wrong number of parts, a part that is not a slug (``..``, a URL, a
      space...), a version that is not a positive integer, or an unknown framework.
  """
  parts = handle.split("/") if isinstance(handle, str) else []
  if len(parts) not in (4, 5) or not all(_SLUG.fullmatch(p) and ".." not in p
                                         for p in parts):
    raise _download.source_error(SOURCE, repr(handle), "this is not a Kaggle model handle.",
                                 _HANDLE_FIX)
  version = None
  if len(parts) == 5:
    if not parts[4].isdigit() or int(parts[4]) < 1:
      raise _download.source_error(SOURCE, handle, f"version {parts[4]!r} is not a positive "
                                   "integer.", _HANDLE_FIX)
    version = int(parts[4])
  ref = KaggleRef(*parts[:4], version=version)
  try:
    ref.handle().framework_enum()
  except ValueError:
    raise _download.source_error(
        SOURCE, handle, f"unknown framework {ref.framework!r}.",
        "Use the 'transformers' framework variation of the model.") from None
  return ref


def _is_transient(exc: BaseException) -> bool:
  if _download.disk_error(exc, source=SOURCE, ref="", folder=None):
    return False
  status = http_status(exc)
  if status is not None:
    return status in _download.TRANSIENT_STATUS
  return any(isinstance(e, (requests.ConnectionError, requests.Timeout,
                            requests.exceptions.ChunkedEncodingError,
                            urllib3.exceptions.ProtocolError,
                            kagglehub.exceptions.DataCorruptionError,
                            ConnectionError, TimeoutError))
             for e in exception_chain(exc))


def _to_source_error(exc: BaseException, ref: KaggleRef,
                     folder: pathlib.Path | None = None) -> SourceError | None:
  disk = _download.disk_error(exc, source=SOURCE, ref=str(ref), folder=folder)
  if disk is not None:
    return disk
  status = http_status(exc)
  if status in (401, 403):
    return _download.source_error(
        SOURCE, str(ref), f"Kaggle refused access (HTTP {status}).",
        "Set KAGGLE_API_TOKEN (or KAGGLE_USERNAME and KAGGLE_KEY, or ~/.kaggle/kaggle.json) "
        f"and accept the model's license at {ref.page}.")
  if status == 404:
    return _download.source_error(
        SOURCE, str(ref), "Kaggle has no such model, variation or version (HTTP 404).",
        f"Check the handle against {ref.page}.")
  if _is_transient(exc):
    return _download.source_error(
        SOURCE, str(ref), f"could not reach Kaggle at {get_endpoint(get_env())} within "
        f"the retry policy ({_download.retry_policy().attempts} tries, "
        f"{_download.retry_policy().deadline_s:g} s) ({type(exc).__name__}).",
        "Check your network; if the model is already downloaded, pass "
        "local_files_only=True.")
  if status is not None:
    return _download.source_error(SOURCE, str(ref), f"Kaggle answered HTTP {status}.",
                                  f"Retry later; if it persists, check {ref.page}.")
  return None


@contextlib.contextmanager
def _errors(ref: KaggleRef, folder: pathlib.Path | None) -> Iterator[None]:
  try:
    yield
  except SourceError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    error = _to_source_error(e, ref, folder)
    if error is None:
      raise
    raise error from e


def _retry(fn: Callable[[], T], ref: KaggleRef, what: str) -> T:
  return _download.retry(fn, is_transient=_is_transient, what=f"Kaggle {what} of {ref}")


def _current_version(ref: KaggleRef) -> int:
  request = model_api_service.ApiGetModelInstanceRequest()
  request.owner_slug, request.model_slug = ref.owner, ref.model
  request.framework, request.instance_slug = ref.handle().framework_enum(), ref.variation
  with kagglehub.clients.build_kaggle_client() as client:
    return client.models.model_api_client.get_model_instance(request).version_number


def _list_files(ref: KaggleRef) -> list[str]:
  names: list[str] = []
  page_token = None
  with kagglehub.clients.build_kaggle_client() as client:
    while True:
      request = model_api_service.ApiListModelInstanceVersionFilesRequest()
      request.owner_slug, request.model_slug = ref.owner, ref.model
      request.framework, request.instance_slug = ref.handle().framework_enum(), ref.variation
      request.version_number, request.page_size = ref.version, _PAGE_SIZE
      if page_token:
        request.page_token = page_token
      response = client.models.model_api_client.list_model_instance_version_files(request)
      names.extend(f.name for f in response.files)
      page_token = response.next_page_token
      if not page_token:
        return names


def _variation_dir(ref: KaggleRef) -> pathlib.Path:
  return (_download.cache_root() / "kaggle" / ref.owner / ref.model / ref.framework /
          ref.variation)


def _manifest(ref: KaggleRef, out_dir: pathlib.Path | None) -> pathlib.Path:
  """Where the file list of ``ref`` (pinned) downloaded into ``out_dir`` is recorded."""
  where = str(out_dir) if out_dir else "kagglehub:" + kagglehub.config.get_cache_folder()
  key = hashlib.sha256(where.encode()).hexdigest()[:16]
  return _variation_dir(ref) / str(ref.version) / f"{key}.json"


def _complete_folder(ref: KaggleRef, out_dir: pathlib.Path | None) -> pathlib.Path | None:
  """The folder of a pinned ``ref`` if every file it needs is marked complete."""
  record = _download.read_json(_manifest(ref, out_dir))
  if not isinstance(record, dict) or not isinstance(record.get("files"), list):
    return None
  cache = kagglehub.cache.Cache(override_dir=str(out_dir) if out_dir else None)
  handle = ref.handle()
  if not all(cache.load_from_cache(handle, name) for name in record["files"]):
    return None
  return pathlib.Path(cache.get_path(handle))


def _cached_versions(ref: KaggleRef) -> list[int]:
  root = _variation_dir(ref)
  if not root.is_dir():
    return []
  return sorted((int(p.name) for p in root.iterdir() if p.name.isdigit()), reverse=True)


def _kagglehub_download(ref: KaggleRef, name: str, output_dir: str | None,
                        force: bool = False) -> None:
  try:
    kagglehub.model_download(str(ref), path=name, output_dir=output_dir, force_download=force)
  except FileExistsError:
    # The file is there without kagglehub's completion marker: an earlier download was cut
    # off. Replace it.
    kagglehub.model_download(str(ref), path=name, output_dir=output_dir, force_download=True)


def _download_file(ref: KaggleRef, name: str, out_dir: pathlib.Path | None,
                   force: bool = False) -> None:
  if out_dir is None:
    _kagglehub_download(ref, name, None, force)  # kagglehub's cache, marked complete by it
    return
  staging = out_dir / _STAGING
  staged = kagglehub.cache.Cache(override_dir=str(staging))
  # A marker left by an earlier call would make kagglehub skip a file that was moved out.
  staged.mark_as_incomplete(ref.handle(), name)
  _kagglehub_download(ref, name, str(staging))
  target = out_dir / name
  target.parent.mkdir(parents=True, exist_ok=True)
  os.replace(staging / name, target)  # same filesystem: atomic
  kagglehub.cache.Cache(override_dir=str(out_dir)).mark_as_complete(ref.handle(), name)


def fetch(handle: str, *, download_dir: str | os.PathLike[str] | None = None,
          local_files_only: bool = False, verify: bool = False) -> pathlib.Path:
  """Downloads a Kaggle model variation's safetensors (or orbax), configs and tokenizer.

  Args:
    handle: ``owner/model/framework/variation[/version]``; the latest version when the
      version is left out.
    download_dir: put the files directly in this folder (kagglehub's ``output_dir``)
      instead of kagglehub's cache.
    local_files_only: never call Kaggle; use the newest complete download (of the given
      version, if pinned).
    verify: download every file again, checked against the md5 Kaggle sends with it
      (kagglehub keeps no checksum to re-hash a cache hit against).

  Returns:
    The folder holding config.json and the ``*.safetensors`` files.

  Raises:
    SourceError: malformed handle, a pickle-only variation, missing model,
      refused access, Kaggle unreachable, or offline with nothing downloaded.
  """
  ref = parse_handle(handle)
  out_dir = (pathlib.Path(download_dir).expanduser().resolve()
             if download_dir is not None else None)
  if local_files_only:
    versions = [ref.version] if ref.version else _cached_versions(ref)
    for version in versions:
      folder = _complete_folder(dataclasses.replace(ref, version=version), out_dir)
      if folder is not None:
        return _download.check_folder(folder, source=SOURCE, ref=handle)
    raise _download.source_error(
        SOURCE, handle, "local_files_only=True and no complete download of it was found"
        + (f" in {out_dir}." if out_dir else " in kagglehub's cache."),
        "Run once with local_files_only=False (and the same model_download_path) first.")
  with _errors(ref, out_dir):
    if ref.version is None:
      ref = dataclasses.replace(ref, version=_retry(lambda: _current_version(ref), ref,
                                                    "version lookup"))
    folder = None if verify else _complete_folder(ref, out_dir)
    if folder is not None:
      return _download.check_folder(folder, source=SOURCE, ref=str(ref))
    names = _download.select_files(_retry(lambda: _list_files(ref), ref, "file listing"),
                                   source=SOURCE, ref=str(ref))
    # kagglehub draws one bar per file and has no switch to hide them.
    with _download.stderr_hidden_if_quiet(), \
        concurrent.futures.ThreadPoolExecutor(_MAX_WORKERS) as pool:
      _download.wait_all([
          pool.submit(_retry, lambda n=n: _download_file(ref, n, out_dir, verify), ref,
                      f"download of {n}") for n in names])
  _download.atomic_write_text(_manifest(ref, out_dir),
                              json.dumps({"handle": str(ref), "files": names}, indent=1))
  folder = _complete_folder(ref, out_dir)
  if folder is None:
    raise _download.source_error(
        SOURCE, str(ref), "kagglehub finished without marking every file complete.",
        "Run the call again; it resumes the missing files.")
  return _download.check_folder(folder, source=SOURCE, ref=str(ref))
