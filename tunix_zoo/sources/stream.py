"""Byte fetchers that let a checkpoint be read straight from GCS or the HF Hub, no copy.

:func:`open_remote` returns a :class:`~tunix_zoo.checkpoint.remote_safetensors.
RemoteCheckpoint` over one of them:

* :class:`GcsFetcher` lists the ``gs://`` prefix once, then reads byte ranges with
  gcsfs, each pinned to the generation the listing saw (GCS answers 404 for a replaced
  object; responses carrying ``x-goog-generation`` are checked too), and lists the files
  again at the end of the load, so a file replaced mid-load raises SourceError instead of
  mixing two versions.
* :class:`HubFetcher` resolves the revision to its commit once (commits never change),
  then sends HTTP ``Range`` requests to ``hf_hub_url(..., revision=<commit>)`` through
  huggingface_hub's own HTTP session and headers.

Both retry transient failures (5xx, dropped connections, short bodies) under the sources'
shared :func:`~tunix_zoo.sources._download.retry` policy.

An orbax (Kaggle Flax Gemma) folder on ``gs://`` is not read through a fetcher:
:func:`open_remote` returns an :class:`OrbaxFolder`, whose slices tensorstore reads from
the bucket itself, under the same retry policy and concurrency::

    ckpt = open_remote(ModelSource.GCS, None, model_path="gs://b/qwen3", token="anon")
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import aiohttp

from tunix_zoo.checkpoint import orbax_io
from tunix_zoo.checkpoint.remote_safetensors import DEFAULT_CONCURRENCY, RemoteCheckpoint
from tunix_zoo.errors import SourceError, http_status
from tunix_zoo.sources import _download


class _ShortRead(OSError):
  """A range answered with fewer bytes than asked for (a dropped connection): retry."""


def _range_header(start: int, end: int) -> dict[str, str]:
  return {"Range": f"bytes={start}-{end - 1}"}


def _checked_length(data: bytes, start: int, end: int, what: str) -> bytes:
  if len(data) != end - start:
    raise _ShortRead(f"{what}: asked for bytes [{start}, {end}), got {len(data)}")
  return data


class GcsFetcher:
  """Byte ranges of the objects under one ``gs://bucket/prefix``, generation-pinned.

  Example::

      fetcher = GcsFetcher("gs://my-bucket/qwen3-0.6b", token="anon")
      head = fetcher.fetch("model.safetensors", 0, 8)
  """

  def __init__(self, url: str, *, token: Any = None):
    import gcsfs  # pylint: disable=import-outside-toplevel  (slow to import)

    from tunix_zoo.sources import gcs  # pylint: disable=import-outside-toplevel
    self._gcs = gcs
    bucket, prefix = gcs.parse_url(url)
    self.location = url.rstrip("/")
    self._root = f"{bucket}/{prefix}".rstrip("/")
    policy = _download.retry_policy()
    # A fresh instance: fsspec's instance and listing caches would hide changed objects.
    # A server that stops sending mid-range fails the request after read_timeout_s, and
    # the range is tried again.
    self._fs = gcsfs.GCSFileSystem(
        token=token, skip_instance_cache=True, use_listings_cache=False,
        requests_timeout=aiohttp.ClientTimeout(sock_read=policy.read_timeout_s,
                                               sock_connect=policy.connect_timeout_s))
    self._objects = self._list()
    if not self._objects:
      raise _download.source_error(gcs.SOURCE, url, "no objects under this prefix.",
                                   f"Check the path with `gcloud storage ls {url}`.")

  def _list(self) -> dict[str, dict[str, Any]]:
    """Top-level objects of the prefix: name -> {"size", "generation"}."""
    # fsspec's ``timeout`` also ends gcsfs's own retries (about 31 s of backoff).
    try:
      listing = self._fs.ls(self._root, detail=True,
                            timeout=_download.retry_policy().deadline_s)
    except Exception as e:  # pylint: disable=broad-except
      raise self._error(e) from e
    out = {}
    for info in listing:
      name = info["name"].rstrip("/")[len(self._root) + 1:]
      if info.get("type") == "file" and name and "/" not in name:
        out[name] = {"size": int(info["size"]), "generation": str(info.get("generation") or "")}
    return out

  def size(self, name: str) -> int | None:
    info = self._objects.get(name)
    return None if info is None else info["size"]

  def fetch(self, name: str, start: int, end: int) -> bytes:
    generation = self._objects[name]["generation"]
    url = self._fs.url(f"{self._root}/{name}", generation=generation or None)
    what = f"{self.location}/{name}"
    deadline = time.monotonic() + _download.retry_policy().deadline_s

    def get() -> bytes:
      headers, data = self._fs.call("GET", url, headers=_range_header(start, end),
                                    timeout=max(deadline - time.monotonic(), 0.01))
      served = headers.get("x-goog-generation")
      if served and generation and served != generation:
        raise self._replaced(name, f"generation {served} was served, not {generation}")
      return _checked_length(data, start, end, what)

    try:
      return _download.retry(get, is_transient=_is_transient_gcs, what=f"GCS read of {what}")
    except SourceError:
      raise
    except FileNotFoundError as e:
      # The listing saw this object: a 404 for its pinned generation means it was replaced.
      raise self._replaced(name, f"generation {generation} is gone") from e
    except Exception as e:  # pylint: disable=broad-except
      raise self._error(e) from e

  def check_unchanged(self, names: list[str]) -> None:
    now = self._list()
    for name in names:
      before, after = self._objects[name], now.get(name)
      if after != before:
        detail = ("it was deleted" if after is None else
                  f"generation {before['generation']} became {after['generation']}")
        raise self._replaced(name, detail)

  def _replaced(self, name: str, detail: str) -> SourceError:
    return _download.source_error(
        self._gcs.SOURCE, f"{self.location}/{name}",
        f"the object changed while the checkpoint was being read ({detail}); the load was "
        "abandoned rather than mix two versions.",
        "Load again once the upload has finished.")

  def _error(self, exc: BaseException) -> SourceError | BaseException:
    return self._gcs._to_source_error(exc, self.location) or exc  # pylint: disable=protected-access


def _is_transient_gcs(exc: BaseException) -> bool:
  if isinstance(exc, (SourceError, FileNotFoundError, PermissionError)):
    return False
  status = http_status(exc)
  if status is not None:
    return status in _download.TRANSIENT_STATUS
  return isinstance(exc, (_ShortRead, aiohttp.ClientError, asyncio.TimeoutError,
                          ConnectionError, TimeoutError))


class HubFetcher:
  """Byte ranges of the files of one Hub repo at one commit, over HTTP ``Range``.

  Example::

      fetcher = HubFetcher("Qwen/Qwen3-0.6B", revision="main")
      config = fetcher.fetch("config.json", 0, fetcher.size("config.json"))
  """

  def __init__(self, repo_id: str, *, revision: str | None = None, token: str | None = None):
    # pylint: disable=import-outside-toplevel  (slow to import)
    import huggingface_hub
    from huggingface_hub import constants

    from tunix_zoo.sources import huggingface
    self._hf = huggingface
    self._hub = huggingface_hub
    self.repo_id = huggingface.validate_repo_id(repo_id)
    self.revision = revision
    self.token = token
    self._endpoint = constants.ENDPOINT
    self.location = f"{constants.ENDPOINT}/{repo_id}" + (f"@{revision}" if revision else "")
    info = self._call(lambda: huggingface_hub.HfApi(endpoint=self._endpoint).model_info(
        repo_id, revision=revision, token=token))
    self.commit = info.sha
    self._names = {s.rfilename for s in info.siblings or ()}
    self._sizes: dict[str, int] = {}

  def size(self, name: str) -> int | None:
    if name not in self._names:
      return None
    if name not in self._sizes:
      meta = self._call(lambda: self._hub.get_hf_file_metadata(self._url(name),
                                                                token=self.token))
      self._sizes[name] = int(meta.size)
    return self._sizes[name]

  def fetch(self, name: str, start: int, end: int) -> bytes:
    headers = {**self._hub.utils.build_hf_headers(token=self.token),
               **_range_header(start, end)}
    timeout = _download.retry_policy().read_timeout_s

    def get() -> bytes:
      response = self._hub.get_session().get(self._url(name), headers=headers,
                                             follow_redirects=True, timeout=timeout)
      self._hub.utils.hf_raise_for_status(response)
      if response.status_code != 206 and (start, end) != (0, self.size(name)):
        raise _download.source_error(
            self._hf.SOURCE, self.location, f"the server ignored a Range request for {name} "
            f"(HTTP {response.status_code}).", "Use the download path (stream=False).")
      return _checked_length(response.content, start, end, f"{self.location}/{name}")

    return self._call(get, what=f"Hub range read of {self.repo_id}/{name}")

  def check_unchanged(self, names: list[str]) -> None:
    """Nothing to check: every range was read at one commit, which cannot change."""

  def _url(self, name: str) -> str:
    return self._hub.hf_hub_url(self.repo_id, name, revision=self.commit,
                                endpoint=self._endpoint)

  def _call(self, fn: Any, what: str | None = None) -> Any:
    # pylint: disable=protected-access  (the Hub source's own error translation)
    hf = self._hf
    try:
      return _download.retry(
          fn, what=what or f"Hub request for {self.repo_id}",
          is_transient=lambda e: isinstance(e, _ShortRead) or hf._is_transient(e))
    except SourceError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      error = None if isinstance(e, _ShortRead) else hf._to_source_error(
          e, self.repo_id, self.revision, self._endpoint, offline=False)
      if error is None:
        error = _download.source_error(hf.SOURCE, self.location,
                                       f"a range read failed on every try ({e}).",
                                       "Check your network and HF_ENDPOINT.")
      raise error from e


class OrbaxFolder:
  """An orbax checkpoint folder on ``gs://``, for :func:`~tunix_zoo.automodel.load_stream`:
  tensorstore reads its slices from the bucket itself (``orbax_folder``), with the
  context resources ``tensorstore_context`` (request concurrency, retries).

  tensorstore takes its endpoint from ``TENSORSTORE_GCS_HTTP_URL``; when only
  ``STORAGE_EMULATOR_HOST`` is set (the emulator convention gcsfs follows), it is set from
  that, so both read the same server. It authenticates with Application Default
  Credentials, not ``token``.

  Example::

      with OrbaxFolder("gs://my-bucket/gemma3-1b", concurrency=16) as folder:
        model = load_stream(folder, mesh, preset_id="gemma3_1b")
  """

  def __init__(self, location: str, *, concurrency: int = DEFAULT_CONCURRENCY):
    self.location = self.orbax_folder = location.rstrip("/")
    policy = _download.retry_policy()
    self.tensorstore_context = {
        "gcs_request_concurrency": {"limit": concurrency},
        "gcs_request_retries": {"max_retries": policy.attempts,
                                "initial_delay": f"{policy.base_delay_s}s",
                                "max_delay": f"{policy.max_delay_s}s"}}
    _point_tensorstore_at_the_emulator()

  def close(self) -> None:
    """Nothing to release: tensorstore's readers close with the load."""

  def __enter__(self) -> OrbaxFolder:
    return self

  def __exit__(self, *exc_info: object) -> None:
    self.close()


_TENSORSTORE_URL = "TENSORSTORE_GCS_HTTP_URL"
_url_set_here: list[str] = []


def _point_tensorstore_at_the_emulator() -> None:
  """``TENSORSTORE_GCS_HTTP_URL`` from ``STORAGE_EMULATOR_HOST``, unless set otherwise."""
  emulator = os.environ.get("STORAGE_EMULATOR_HOST")
  current = os.environ.get(_TENSORSTORE_URL)
  if not emulator or (current is not None and current not in _url_set_here):
    return
  url = emulator if "://" in emulator else f"http://{emulator}"
  os.environ[_TENSORSTORE_URL] = url
  _url_set_here.append(url)


def open_remote(source: Any, model_id: str | None, *, model_path: str | os.PathLike | None,
                revision: str | None = None, token: Any = None,
                concurrency: int | None = None) -> RemoteCheckpoint | OrbaxFolder:
  """A :class:`RemoteCheckpoint` over the GCS prefix or Hub repo the arguments name, or
  an :class:`OrbaxFolder` for a ``gs://`` prefix holding an orbax checkpoint.

  ``source`` is ``"gcs"`` or ``"huggingface"`` (a :class:`~tunix_zoo.sources.ModelSource`).
  """
  source = getattr(source, "value", source)
  if source == "gcs":
    fetcher: Any = GcsFetcher(os.fspath(model_path), token=token)
    if fetcher.size("config.json") is None and any(
        fetcher.size(name) is not None for name in orbax_io.MARKERS):
      return OrbaxFolder(fetcher.location, concurrency=concurrency or DEFAULT_CONCURRENCY)
  else:
    fetcher = HubFetcher(model_id, revision=revision, token=token)
  return RemoteCheckpoint(fetcher, concurrency=concurrency or DEFAULT_CONCURRENCY)
