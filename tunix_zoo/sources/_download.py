"""Plumbing shared by the sources: file selection, folder checks, retries, atomic writes.

Every source turns a reference into a local folder; this module holds what they agree
on, so that the Hub, Kaggle, GCS and a local folder accept and reject the same files::

    names = ["config.json", "model.safetensors", "pytorch_model.bin"]
    select_files(names, source="gcs", ref="gs://b/m")  # ["config.json", "model.safetensors"]
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import errno
import fnmatch
import hashlib
import json
import logging
import os
import pathlib
import posixpath
import random
import tempfile
import threading
import time
from typing import Any, Callable, Iterable, Iterator, TypeVar

import filelock

from tunix_zoo.progress import quiet
from tunix_zoo.errors import SourceError

log = logging.getLogger(__name__)
T = TypeVar("T")

# What a model folder needs: weights in safetensors, configs, and the tokenizer files
# (sentencepiece / tiktoken models, vocab and merges lists, chat templates).
ALLOW_PATTERNS = (
    "*.safetensors",
    "*.json",
    "*.model",
    "*.tiktoken",
    "*.txt",
    "*.jinja",
)
# Pickled weights run code when loaded; they are never downloaded.
PICKLE_PATTERNS = ("*.bin", "*.pth", "*.pt", "*.ckpt", "*.pkl", "*.pickle")
# Files that mark an orbax (Flax) checkpoint, as published for Gemma on Kaggle.
_ORBAX_NAMES = frozenset(
    {"_METADATA", "_CHECKPOINT_METADATA", "checkpoint", "manifest.ocdbt", "_sharding"})
CONVERT_HINT = (
    "Convert the weights to safetensors first, e.g. load them with transformers and call "
    "model.save_pretrained(folder, safe_serialization=True), or pick a repo/variation that "
    "publishes *.safetensors.")

TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})


_DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EACCES, errno.EPERM,
                          errno.EROFS})


def disk_error(exc: BaseException, *, source: str, ref: str,
               folder: pathlib.Path | None) -> SourceError | None:
  """A SourceError for a local write that failed (full disk, read-only or foreign
  folder), found on ``exc`` or what it was raised from; None for any other failure."""
  current: BaseException | None = exc
  while current is not None:
    if (isinstance(current, OSError) and current.errno in _DISK_ERRNOS
        and not isinstance(current, (ConnectionError, TimeoutError))):
      where = current.filename or folder
      if current.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        fix = ("Free space there (or raise the file size limit), or pass "
               "model_download_path=<a folder on a disk with room>.")
      else:
        fix = ("Fix the folder's permissions, or pass model_download_path=<a folder you can "
               "write> (or set TUNIX_ZOO_CACHE / HF_HOME / KAGGLEHUB_CACHE).")
      return source_error(source, ref, f"cannot write the download in {where}: "
                          f"{current.strerror}.", fix + " Nothing was left half-written.")
    current = current.__cause__
  return None


@contextlib.contextmanager
def folder_lock(folder: pathlib.Path, *, source: str, ref: str) -> Iterator[None]:
  """Holds ``<folder>/.tunix_zoo/lock`` (as huggingface_hub locks its blobs), so two
  processes fetching into one folder take turns instead of sharing partial files."""
  lock_path = folder / ".tunix_zoo" / "lock"
  try:
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    lock = filelock.FileLock(str(lock_path))
    lock.acquire()
  except OSError as e:
    raise disk_error(e, source=source, ref=ref, folder=folder) or e
  try:
    yield
  finally:
    lock.release()


def source_error(source: str, ref: str, problem: str, fix: str) -> SourceError:
  """Builds the one message shape every source uses: who, what went wrong, what to do."""
  return SourceError(f"[{source}] {ref}: {problem} {fix}".strip())


@contextlib.contextmanager
def stderr_hidden_if_quiet() -> Iterator[None]:
  """Sends stderr to /dev/null under ``TUNIX_ZOO_QUIET=1``, for libraries whose bars
  cannot be switched off."""
  if not quiet():
    yield
    return
  with open(os.devnull, "w", encoding="utf-8") as sink, contextlib.redirect_stderr(sink):
    yield


def wait_all(futures: list[concurrent.futures.Future[Any]]) -> None:
  """Waits for every future; on the first failure cancels those not started and raises."""
  for future in concurrent.futures.as_completed(futures):
    if future.exception() is not None:
      for other in futures:
        other.cancel()
      future.result()


def cache_root() -> pathlib.Path:
  """Folder for tunix_zoo's own downloads and bookkeeping.

  ``TUNIX_ZOO_CACHE`` wins, then ``$XDG_CACHE_HOME/tunix_zoo``, then
  ``~/.cache/tunix_zoo``.
  """
  explicit = os.environ.get("TUNIX_ZOO_CACHE")
  if explicit:
    return pathlib.Path(explicit).expanduser()
  xdg = os.environ.get("XDG_CACHE_HOME")
  base = pathlib.Path(xdg).expanduser() if xdg else pathlib.Path.home() / ".cache"
  return base / "tunix_zoo"


def check_relative_name(name: str, *, source: str, ref: str) -> str:
  """Returns ``name`` if it stays inside the folder it is joined to, else raises.

  Remote listings and user ids both end up in local paths; an absolute name, a ``..``
  part, a backslash or an empty part could write outside the download folder.
  """
  parts = name.split("/")
  if (not name or "\\" in name or "\x00" in name or name.startswith("/")
      or posixpath.isabs(name) or pathlib.PureWindowsPath(name).drive
      or any(p in ("", ".", "..") for p in parts)):
    raise source_error(
        source, ref, f"refusing the file name {name!r}: it would be written outside the "
        "download folder.", "The source's listing is malformed; report it to its owner.")
  return name


def _matches(name: str, patterns: Iterable[str]) -> bool:
  return any(fnmatch.fnmatch(name, p) for p in patterns)


def _looks_orbax(names: Iterable[str]) -> bool:
  return any(posixpath.basename(n) in _ORBAX_NAMES or ".orbax" in n or "ocdbt" in n
             for n in names)


def select_files(names: Iterable[str], *, source: str, ref: str) -> list[str]:
  """Picks the files to download from a remote listing, or explains why none will do.

  Args:
    names: every file of the remote model, as paths relative to its root.
    source: source name for messages ("huggingface", "kaggle", "gcs").
    ref: the id, handle or URL the user gave, for messages.

  Returns:
    The sorted names matching :data:`ALLOW_PATTERNS`.

  Raises:
    SourceError: a name escapes the folder, or the listing has no config.json or no
      ``*.safetensors`` (pickle-only checkpoints get their own advice). An orbax
      checkpoint needs neither: every file but pickles is picked.
  """
  names = sorted(set(names))
  for n in names:
    check_relative_name(n, source=source, ref=ref)
  _check_contents(names, source=source, ref=ref)
  if _is_orbax_only(names):
    # An orbax checkpoint's data files have no suffix: take the whole folder.
    return [n for n in names if not _matches(n, PICKLE_PATTERNS)]
  return [n for n in names if _matches(n, ALLOW_PATTERNS)]


def _is_orbax_only(names: list[str]) -> bool:
  """A Flax (orbax) checkpoint with no safetensors beside it, as Kaggle's Flax Gemmas."""
  return _looks_orbax(names) and not any(fnmatch.fnmatch(n, "*.safetensors") for n in names)


def _check_contents(names: list[str], *, source: str, ref: str) -> None:
  """Raises unless ``names`` hold a config.json and safetensors weights, or an orbax
  checkpoint (loaded with a preset's config)."""
  if _is_orbax_only(names):
    return
  has_weights = any(fnmatch.fnmatch(n, "*.safetensors") for n in names)
  if not has_weights:
    pickles = [n for n in names if _matches(n, PICKLE_PATTERNS)]
    if pickles:
      raise source_error(
          source, ref, f"only pickle weights are published ({', '.join(pickles[:3])}); "
          "tunix_zoo loads *.safetensors only, because unpickling runs arbitrary code.",
          CONVERT_HINT)
    shown = ", ".join(names[:8]) + (" ..." if len(names) > 8 else "") or "nothing"
    raise source_error(
        source, ref, f"no *.safetensors weights found (files: {shown}).",
        "Point to a model folder that holds config.json and *.safetensors files.")
  if "config.json" not in names:
    raise source_error(
        source, ref, "no config.json at the model's root.",
        "Point to the folder that holds config.json (for a sub-folder, include it in the "
        "path or handle).")


def check_folder(folder: pathlib.Path, *, source: str, ref: str) -> pathlib.Path:
  """Returns ``folder`` if it holds a loadable checkpoint (config.json + safetensors, or
  an orbax checkpoint)."""
  names = [p.relative_to(folder).as_posix() for p in folder.rglob("*")
           if p.is_file() and not any(part.startswith(".") for part in
                                      p.relative_to(folder).parts)]
  _check_contents(names, source=source, ref=ref)
  return folder


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
  """The one retry policy of the Hub, Kaggle and GCS sources.

  ``attempts`` tries at most, ``base_delay_s`` before the second (doubling, at most
  ``max_delay_s``, with jitter), all within ``deadline_s`` of the first: no try starts
  that could not finish, at the pace of the slowest try so far, before it.
  ``read_timeout_s`` bounds every wait for bytes from a server: a stall longer than it
  fails the request, which is then retried like a drop.
  :func:`retry_policy` reads the ``TUNIX_ZOO_RETRY_*`` and ``TUNIX_ZOO_READ_TIMEOUT_S``
  environment variables, so a deployment (or a test) can tighten or loosen them::

      TUNIX_ZOO_RETRY_DEADLINE_S=300 tunix-zoo download Qwen/Qwen3-8B
  """

  attempts: int = 4
  base_delay_s: float = 0.5
  max_delay_s: float = 8.0
  deadline_s: float = 60.0
  read_timeout_s: float = 20.0
  connect_timeout_s: float = 10.0

  def delay(self, attempt: int) -> float:
    """Seconds to wait after failed try number ``attempt`` (1-based)."""
    base = min(self.max_delay_s, self.base_delay_s * 2 ** (attempt - 1))
    return base * (0.75 + random.random() / 2)


_POLICY_ENV = {"attempts": ("TUNIX_ZOO_RETRY_ATTEMPTS", int),
               "base_delay_s": ("TUNIX_ZOO_RETRY_BASE_DELAY_S", float),
               "deadline_s": ("TUNIX_ZOO_RETRY_DEADLINE_S", float),
               "read_timeout_s": ("TUNIX_ZOO_READ_TIMEOUT_S", float)}


def retry_policy() -> RetryPolicy:
  """The policy in force: the defaults, overridden by ``TUNIX_ZOO_RETRY_ATTEMPTS``,
  ``TUNIX_ZOO_RETRY_BASE_DELAY_S``, ``TUNIX_ZOO_RETRY_DEADLINE_S`` and
  ``TUNIX_ZOO_READ_TIMEOUT_S`` (read at each call)."""
  values: dict[str, Any] = {}
  for field, (name, kind) in _POLICY_ENV.items():
    text = os.environ.get(name)
    if not text:
      continue
    try:
      value = kind(text)
    except ValueError:
      value = None
    if value is None or value <= 0 or (kind is int and value < 1):
      raise SourceError(f"[sources] {name}={text!r} is not a positive {kind.__name__}. "
                        f"Set it to e.g. {getattr(RetryPolicy, field)!r}, or unset it.")
    values[field] = value
  return RetryPolicy(**values)


def retry(fn: Callable[[], T], *, is_transient: Callable[[BaseException], bool],
          what: str, policy: RetryPolicy | None = None, attempts: int | None = None) -> T:
  """Calls ``fn``, retrying transient failures under the :class:`RetryPolicy`.

  Args:
    fn: the operation; it must be safe to repeat (downloads resume or restart).
    is_transient: says whether a raised exception is worth another try.
    what: a short description for the log line.
    policy: attempts, backoff and total deadline; :func:`retry_policy` when None.
    attempts: overrides the policy's number of tries (1: no retry).

  Returns:
    ``fn``'s result.

  Example::

      info = retry(lambda: api.model_info(repo), is_transient=is_5xx, what=repo)
  """
  policy = policy or retry_policy()
  attempts = policy.attempts if attempts is None else attempts
  deadline = time.monotonic() + policy.deadline_s
  slowest = 0.0
  for attempt in range(1, attempts + 1):
    began = time.monotonic()
    try:
      return fn()
    except Exception as e:  # pylint: disable=broad-except
      now = time.monotonic()
      slowest = max(slowest, now - began)
      delay = policy.delay(attempt)
      if (attempt == attempts or not is_transient(e)
          or now + delay + slowest > deadline):
        raise
      log.warning("%s failed (%s: %s); retrying in %.1fs (attempt %d of %d)", what,
                  type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "",
                  delay, attempt + 1, attempts)
      time.sleep(delay)
  raise AssertionError("unreachable")  # the loop returns or raises


# ------------------------------------------------------------------ checksums

# Algorithms a server advertises for a file's content, as recorded in the checksum file.
SHA256, GIT_SHA1, MD5 = "sha256", "git-sha1", "md5"


def file_digest(path: pathlib.Path, algorithm: str) -> str:
  """The hex digest of ``path``'s bytes: ``sha256``, ``md5``, or ``git-sha1`` (the git
  blob id, ``sha1(b"blob <size>\\0" + content)``, that the Hub gives non-LFS files)."""
  h = hashlib.sha1() if algorithm == GIT_SHA1 else hashlib.new(algorithm)
  if algorithm == GIT_SHA1:
    h.update(b"blob %d\0" % path.stat().st_size)
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


_RECORD_LOCK = threading.Lock()


def checksum_record_path(folder: pathlib.Path) -> pathlib.Path:
  """Where the checksums advertised for the files of ``folder`` are recorded."""
  key = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:24]
  return cache_root() / "checksums" / f"{key}.json"


def read_checksums(folder: pathlib.Path) -> dict[str, dict[str, Any]]:
  """``{name: {"size", "algorithm", "digest"}}`` recorded for ``folder``'s files."""
  record = read_json(checksum_record_path(folder))
  files = record.get("files") if isinstance(record, dict) else None
  return files if isinstance(files, dict) else {}


def record_checksums(folder: pathlib.Path, *, source: str, ref: str,
                     files: dict[str, dict[str, Any]]) -> None:
  """Adds the checksums the server advertised for ``files`` to ``folder``'s record.

  The record (under ``<cache_root>/checksums/``) says, per file, its size and the digest
  the server gave at download time, so that a later check can re-hash the cache.
  """
  path = checksum_record_path(folder)
  path.parent.mkdir(parents=True, exist_ok=True)
  with _RECORD_LOCK, filelock.FileLock(str(path) + ".lock"):
    merged = {**read_checksums(folder), **files}
    atomic_write_text(path, json.dumps(
        {"folder": str(folder.resolve()), "source": source, "ref": ref, "files": merged},
        indent=1, sort_keys=True))


def atomic_write_text(path: pathlib.Path, text: str) -> None:
  """Writes ``text`` to ``path`` so that readers see the old file or the whole new one."""
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    pathlib.Path(tmp).unlink(missing_ok=True)
    raise


def read_json(path: pathlib.Path) -> Any | None:
  """The JSON in ``path``, or None when it is missing or unreadable (a stale marker)."""
  try:
    return json.loads(path.read_text(encoding="utf-8"))
  except (OSError, ValueError):
    return None
