"""What a model id or name says: family, version, config id and config package.

A model is named either by an HF id (``meta-llama/Llama-3.1-8B``, case-sensitive, with
its organisation) or by a config id (``llama3p1_8b``); its *name* is the id's last
segment in lower case (``llama-3.1-8b``). The family is the longest prefix of the name
that standardises to a family registered in :mod:`tunix_zoo.registry`, so families that
third parties register are recognised the same way as the built-ins::

    naming = ModelNaming(model_id="meta-llama/Llama-3.1-8B")
    naming.model_name             # "llama-3.1-8b"
    naming.model_family           # "llama3p1"
    naming.model_version          # "8b"
    naming.model_config_id        # "llama3p1_8b"
    naming.model_config_category  # "llama3"
"""

from __future__ import annotations

import dataclasses
import difflib
import re

from tunix_zoo import registry
from tunix_zoo.errors import ModelNameError, SourceError, UnknownModelError

# Hugging Face's rule for an organisation or repository name.
_SEGMENT = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?")
# Where a family can end inside a name: "gemma-2|-2b-it", "gemma2|_2b_it".
_SEPARATORS = "-_"
# Meta published Llama 3 as "Meta-Llama-3-8B" and Llama 3.1 onwards as "Llama-3.1-8B".
_META_LLAMA_PREFIX = "meta-llama-"
# Below this difflib ratio a registered family is no useful suggestion.
_SUGGESTION_CUTOFF = 0.6


@dataclasses.dataclass(frozen=True)
class ModelNaming:
  """The naming fields of one model, derived from its ``model_id`` or ``model_name``.

  Give ``model_id`` or ``model_name`` (or both); every other field is derived, and a
  field given explicitly must equal what is derived, else :class:`ModelNameError`.

  Attributes:
    model_id: An HF id (``"Qwen/Qwen3-0.6B"``) or a config id (``"qwen3_0p6b"``), as
      given; None when only ``model_name`` was given.
    model_name: The id's last segment, lower-cased, with a ``meta-llama-`` prefix
      shortened to ``llama-`` (``"qwen3-0.6b"``). A config id given as ``model_id`` is
      its own name (``"qwen3_0p6b"``): the HF spelling cannot be recovered from it, as
      ``p`` may stand for ``.`` or be a letter. When both are given they must name the
      same family and version, and the ``model_name`` given is kept.
    model_family: The registered family the name starts with, standardised: dots become
      ``p`` and hyphens go (``"llama-3.1"`` -> ``"llama3p1"``).
    model_version: The rest of the name: lower case, ``-`` -> ``_``, ``.`` -> ``p``
      (``"4b-instruct-2507"`` -> ``"4b_instruct_2507"``).
    model_config_category: The package under ``tunix_zoo/models/`` holding the
      family's config (``"llama3"`` for ``llama3p1``).
    model_config_id: ``<family>_<version>`` (``"llama3p1_8b"``).

  Raises:
    ModelNameError: The id or name is malformed, names no version, or explicit fields
      disagree.
    UnknownModelError: No registered family starts the name.

  Example::

      a = ModelNaming(model_id="Qwen/Qwen3-0.6B")
      b = ModelNaming(model_name="qwen3-0.6b")
      c = ModelNaming(model_id="qwen3_0p6b")
      assert a.model_config_id == b.model_config_id == c.model_config_id == "qwen3_0p6b"
  """

  model_id: str | None = None
  model_name: str | None = None
  model_family: str | None = None
  model_version: str | None = None
  model_config_category: str | None = None
  model_config_id: str | None = None

  def __post_init__(self) -> None:
    if self.model_id is None and self.model_name is None:
      raise ModelNameError(
          "ModelNaming needs a model_id (an HF id like 'Qwen/Qwen3-0.6B' or a config id "
          "like 'qwen3_0p6b') or a model_name (like 'qwen3-0.6b')."
      )
    families = registry.family_names()
    if self.model_id is not None:
      source = f"model_id {self.model_id!r}"
      name = _name_from_id(self.model_id)
      family, version = _split(name, source, families)
      if self.model_name is not None:
        given_name = _checked_name(self.model_name)
        if _split_or_none(given_name, families) != (family, version):
          raise ModelNameError(
              f"model_name {self.model_name!r} disagrees with {source}, which names "
              f"{name!r} ({family}_{version}). Give only one of them, or make them "
              "name the same model."
          )
        name = given_name
    else:
      source = f"model_name {self.model_name!r}"
      name = _checked_name(self.model_name)
      family, version = _split(name, source, families)

    object.__setattr__(self, "model_name", name)
    derived = {
        "model_family": family,
        "model_version": version,
        "model_config_category": families[family],
        "model_config_id": f"{family}_{version}",
    }
    for field, value in derived.items():
      given = getattr(self, field)
      if given is not None and given != value:
        raise ModelNameError(
            f"{field}={given!r} disagrees with {source}, which gives {value!r}. "
            f"Leave {field} out to have it derived."
        )
      object.__setattr__(self, field, value)


def _name_from_id(model_id: object) -> str:
  """The model name of an ``org/name`` HF id, a bare name or a config id."""
  if not isinstance(model_id, str):
    raise ModelNameError(
        f"model_id must be a string like 'Qwen/Qwen3-0.6B', not {type(model_id).__name__}."
    )
  if not model_id:
    raise ModelNameError("model_id is empty; give an id like 'Qwen/Qwen3-0.6B'.")
  if model_id.startswith("/") or model_id.endswith("/"):
    raise ModelNameError(
        f"model_id {model_id!r} starts or ends with '/'; expected 'org/name' "
        "(like 'Qwen/Qwen3-0.6B') or a config id (like 'qwen3_0p6b')."
    )
  segments = model_id.split("/")
  if len(segments) > 2:
    raise ModelNameError(
        f"model_id {model_id!r} has more than one '/'; expected 'org/name' "
        "(like 'Qwen/Qwen3-0.6B') or a config id (like 'qwen3_0p6b')."
    )
  for segment in segments:
    _check_segment(segment, f"model_id {model_id!r}")
  return _normalise(segments[-1])


def _checked_name(model_name: object) -> str:
  """An explicit ``model_name``, validated and normalised."""
  if not isinstance(model_name, str):
    raise ModelNameError(
        f"model_name must be a string like 'qwen3-0.6b', not {type(model_name).__name__}."
    )
  if "/" in model_name:
    raise ModelNameError(
        f"model_name {model_name!r} contains '/'; a name has no organisation. "
        "Pass the HF id as model_id instead."
    )
  _check_segment(model_name, f"model_name {model_name!r}")
  return _normalise(model_name)


def _check_segment(segment: str, source: str) -> None:
  """Raises unless ``segment`` is a valid HF organisation or repository name."""
  if not segment:
    raise ModelNameError(f"{source} has an empty part; expected 'org/name' or 'name'.")
  if any(char.isspace() for char in segment):
    raise ModelNameError(f"{source} contains whitespace; remove it.")
  if ".." in segment or "--" in segment:
    raise ModelNameError(f"{source} contains '..' or '--', which no model id may contain.")
  if not _SEGMENT.fullmatch(segment):
    raise ModelNameError(
        f"{source} is malformed: each part may hold only letters, digits, '-', '_' "
        "and '.', and must start and end with a letter or digit."
    )


def _normalise(name: str) -> str:
  name = name.lower()
  if name.startswith(_META_LLAMA_PREFIX):
    name = "llama-" + name[len(_META_LLAMA_PREFIX) :]
  return name


def _family_spellings(prefix: str) -> tuple[str, str]:
  """The standard spellings a raw family prefix may have.

  ``gemma-2`` is ``gemma2``; a family registered with underscores
  (``deepseek_r1_distill_qwen``) is spelled with hyphens in HF names.
  """
  dotless = prefix.replace(".", "p")
  return dotless.replace("-", ""), dotless.replace("-", "_")


def _prefix_ends(name: str, families: dict[str, str]) -> list[int]:
  """Where a family may end in ``name``: at each separator, up to the longest length a
  raw spelling of a registered family can have (standardising drops at most every
  other character, a hyphen), so the work is bounded however long the name is."""
  longest = 2 * max(map(len, families), default=0) + 1
  return [
      end for end, char in enumerate(name[: longest + 1] + "-")
      if char in _SEPARATORS and end <= min(longest, len(name))
  ]


def _split_or_none(name: str, families: dict[str, str]) -> tuple[str, str] | None:
  """(family, standardised version) of the longest registered family starting ``name``."""
  match = None
  for end in _prefix_ends(name, families):
    family = next((s for s in _family_spellings(name[:end]) if s in families), None)
    if family is not None:
      match = family, name[end + 1 :].replace("-", "_").replace(".", "p")
  return match


def _split(name: str, source: str, families: dict[str, str]) -> tuple[str, str]:
  """(family, version) of ``name``, or a typed error saying what is missing."""
  match = _split_or_none(name, families)
  if match is None:
    raise UnknownModelError(_unknown_family_message(name, source, families))
  family, version = match
  if not version:
    raise ModelNameError(
        f"{source} names the family {family!r} but no version; add one, "
        f"as in '{name}-7b'."
    )
  return match


def _unknown_family_message(name: str, source: str, families: dict[str, str]) -> str:
  known = sorted(families)
  prefixes = [name[:end] for end in _prefix_ends(name, families)]
  scored = [
      (difflib.SequenceMatcher(None, spelling, family).ratio(), family)
      for prefix in prefixes
      for spelling in _family_spellings(prefix)
      for family in known
  ]
  best_ratio, best_family = max(scored, default=(0.0, ""))
  hint = f" Did you mean {best_family!r}?" if best_ratio >= _SUGGESTION_CUTOFF else ""
  return (
      f"{source} starts with no registered model family.{hint} "
      f"Known families: {', '.join(known) or '(none)'}. Another architecture needs its "
      "family registered with tunix_zoo.registry.register_family(names=...)."
  )


# Stricter than the Hub's own check: every repo id we accept is also a safe cache path.
_REPO_PART = r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}"
_REPO_ID = re.compile(rf"{_REPO_PART}(/{_REPO_PART})?")
_REPO_ID_FIX = ("Pass a Hub repo id such as 'Qwen/Qwen3-0.6B'; for a folder on disk use "
                "source=ModelSource.LOCAL with model_path=<folder>.")


def validate_repo_id(repo_id: str) -> str:
  """Returns ``repo_id`` if it is a plain ``name`` or ``owner/name``, else raises.

  Rejects what could address anything but one Hub repo: URLs, absolute or relative
  paths, ``..``, ``--``, spaces and other characters the Hub does not allow. Downloads,
  streams and uploads all check ids here.

  Raises:
    SourceError: ``repo_id`` is not a valid Hub repo id.

  Example::

      validate_repo_id("Qwen/Qwen3-0.6B")  # returns it; "../etc" raises SourceError
  """
  if not isinstance(repo_id, str) or not repo_id:
    raise SourceError(f"[huggingface] {repo_id!r}: the repo id is empty. {_REPO_ID_FIX}")
  if (not _REPO_ID.fullmatch(repo_id) or ".." in repo_id or "--" in repo_id
      or repo_id.endswith((".", "-"))):
    raise SourceError(
        f"[huggingface] {repo_id!r}: this is not a valid Hub repo id (letters, digits, '-', "
        f"'_' and '.' in 'owner/name'; no '..', '--', spaces, URLs or paths). {_REPO_ID_FIX}")
  return repo_id
