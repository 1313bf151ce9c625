"""Every failure a user can cause has its own exception class.

All of them derive from :class:`ZooError`, so callers can catch one type::

    try:
        model, path = AutoModel.from_pretrained("acme/typo", mesh)
    except tunix_zoo.errors.ZooError as e:
        print(e)
"""

from __future__ import annotations

from typing import Iterator


class ZooError(Exception):
    """Base class of every error tunix_zoo raises on purpose."""


class ModelNameError(ZooError, ValueError):
    """A model id or name is malformed, or explicit naming fields disagree."""


class UnknownModelError(ZooError, KeyError):
    """A family, config id or HF ``model_type`` is not registered."""

    def __str__(self) -> str:  # KeyError would quote the message.
        return str(self.args[0]) if self.args else ""


class ConfigMismatchError(ZooError, ValueError):
    """A checkpoint's config.json disagrees with the preset the caller named."""


class CheckpointError(ZooError):
    """A checkpoint folder or file is missing, corrupt, or does not fit the model."""


class SourceError(ZooError):
    """A model source (HF Hub, Kaggle, GCS, local folder) cannot provide the files."""


class ShardingError(ZooError, ValueError):
    """A mesh or sharding rule table cannot hold the model."""


class ExportError(ZooError):
    """A model cannot be written where or how the caller asked (existing folder, bad dtype)."""


class TokenizerError(ZooError):
    """A tokenizer folder lacks tokenizer.json, or its files or chat template are invalid."""


class GenerationError(ZooError, ValueError):
    """generate() got prompts or sampling settings it cannot use."""


class RematError(ZooError, ValueError):
    """A remat (activation rematerialisation) mode is not one the models offer."""


class LoraError(ZooError, ValueError):
    """LoRA adapters cannot be applied, merged or saved as asked (e.g. a module path
    regex matching no projection)."""


class ArgumentError(ZooError, ValueError):
    """A public function got an argument of the wrong type or out of range (a dtype that
    is not floating, a negative size, a string where a mesh belongs)."""


class ConfigError(ZooError, ValueError):
    """A config.json value or a config override is unknown, has the wrong type or range, or
    breaks the architecture (heads not a multiple of KV heads, ...)."""


class CacheError(ZooError):
    """A cached model named for verify or remove is not in the cache, or its records are
    unreadable."""


# Third-party clients (requests, httpx, gcsfs, kagglesdk) wrap their HTTP failures
# differently; sources and uploads read the status the same way through these two.
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
