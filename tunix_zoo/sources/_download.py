"""Plumbing shared by the sources: file selection, folder checks, retries, atomic writes.

Every source turns a reference into a local folder; this module holds what they agree
on, so that the Hub, Kaggle, GCS and a local folder accept and reject the same files::

    names = ["config.json", "model.safetensors", "pytorch_model.bin"]
    select_files(names, source="gcs", ref="gs://b/m")  # ["config.json", "model.safetensors"]
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import fnmatch
import json
import logging
import os
import pathlib
import posixpath
import random
import tempfile
import time
from typing import Any, Callable, Iterable, Iterator, TypeVar


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

RETRY_ATTEMPTS = 4
RETRY_BASE_DELAY_S = 0.5
TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})


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


def exception_chain(exc: BaseException) -> Iterator[BaseException]:
  """Yields ``exc`` and every exception it was raised from or while handling."""
  seen: set[int] = set()
  current: BaseException | None = exc
  while current is not None and id(current) not in seen:
    seen.add(id(current))
    yield current
    current = current.__cause__ or current.__context__


def http_status(exc: BaseException) -> int | None:
  """The first HTTP status code found along ``exc``'s chain, if any."""
  for e in exception_chain(exc):
    response = getattr(e, "response", None)
    code = getattr(response, "status_code", None)
    if code is None:
      code = getattr(e, "status", None) or getattr(e, "code", None)
    if isinstance(code, int) and 100 <= code < 600:
      return code
  return None


def retry(fn: Callable[[], T], *, is_transient: Callable[[BaseException], bool],
          what: str, attempts: int = RETRY_ATTEMPTS,
          base_delay: float = RETRY_BASE_DELAY_S) -> T:
  """Calls ``fn``, retrying transient failures with exponential backoff and jitter.

  Args:
    fn: the operation; it must be safe to repeat (downloads resume or restart).
    is_transient: says whether a raised exception is worth another try.
    what: a short description for the log line.
    attempts: total tries, at least 1.
    base_delay: seconds before the second try; doubles for each further try.

  Returns:
    ``fn``'s result.

  Example::

      info = retry(lambda: api.model_info(repo), is_transient=is_5xx, what=repo)
  """
  for attempt in range(1, attempts + 1):
    try:
      return fn()
    except Exception as e:  # pylint: disable=broad-except
      if attempt == attempts or not is_transient(e):
        raise
      delay = base_delay * 2 ** (attempt - 1) * (0.75 + random.random() / 2)
      log.warning("%s failed (%s: %s); retrying in %.1fs (attempt %d of %d)", what,
                  type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "",
                  delay, attempt + 1, attempts)
      time.sleep(delay)
  raise AssertionError("unreachable")  # the loop returns or raises


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
