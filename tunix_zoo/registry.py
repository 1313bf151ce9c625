"""Families and config presets: what each architecture is called, as data.

A family is one model architecture (one ``tunix_zoo/models/<category>`` package); a
preset is a factory returning that family's config for one published size. A family
declares its identity next to its config, naming its model class and key map by
``"module:attribute"`` so that nothing heavy (jax, flax) is imported to list, name or
look up families; they are imported when a model is built::

    register_family(names=("qwen3",), model_types=("qwen3",),
                    architectures=("Qwen3ForCausalLM",), config_class=Qwen3Config,
                    model_class="tunix_zoo.models.qwen3.model:Qwen3ForCausalLM",
                    param_table="tunix_zoo.models.qwen3.params:QWEN3_PARAMS")

    register_presets(_qwen3, {"qwen3_0p6b": dict(hidden_size=1024, num_layers=28, ...)})

``register_family`` also decorates a model class (then the class is the model class).
Third-party packages register the same way; to be found without an explicit import
they name a module in the entry-point group ``tunix_zoo.families``.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib
import importlib.metadata
import logging
import threading
from typing import Any, Callable, TypeVar

from tunix_zoo.errors import ConfigError, UnknownModelError

ENTRY_POINT_GROUP = "tunix_zoo.families"
# Suffixes of instruction-tuned, base or dated variants that share the architecture
# of the size they follow ("gemma2_2b_it" is "gemma2_2b").
VARIANT_SUFFIXES = ("_it", "_instruct", "_base", "_chat", "_thinking", "_2507", "_pt")

log = logging.getLogger(__name__)
T = TypeVar("T")


class _ImportedOnUse:
  """A field given as an object or as ``"module:attribute"``, imported when first read.

  Families name their model class and key map this way so that registering, naming and
  listing them imports no jax.
  """

  def __set_name__(self, owner: type, name: str) -> None:
    self._slot = "_" + name

  def __get__(self, spec: Any, owner: type | None = None) -> Any:
    if spec is None:
      raise AttributeError(self._slot)  # Tells dataclasses the field has no default.
    value = getattr(spec, self._slot)
    if isinstance(value, str):
      module, _, attribute = value.partition(":")
      value = getattr(importlib.import_module(module), attribute)
      object.__setattr__(spec, self._slot, value)
    return value

  def __set__(self, spec: Any, value: Any) -> None:
    object.__setattr__(spec, self._slot, value)


@dataclasses.dataclass(frozen=True)
class FamilySpec:
  """Everything the library knows about one registered architecture."""

  category: str
  names: tuple[str, ...]
  model_types: tuple[str, ...]
  architectures: tuple[str, ...]
  config_class: type
  model_class: type = _ImportedOnUse()  # type: ignore[assignment]
  param_table: Any = _ImportedOnUse()
  # The family's Kaggle Flax (orbax) checkpoint layout, where it publishes one.
  orbax_layout: Any = _ImportedOnUse()


_families: dict[str, FamilySpec] = {}
_configs: dict[str, tuple[str, Callable[[], Any]]] = {}
_loaded = False
_load_lock = threading.RLock()


def register_family(
    *,
    names: tuple[str, ...],
    model_types: tuple[str, ...],
    architectures: tuple[str, ...],
    config_class: type,
    param_table: Any,
    category: str | None = None,
    model_class: type | str | None = None,
    orbax_layout: Any = None,
) -> Any:
  """Registers a family; returns its :class:`FamilySpec`, or a class decorator.

  ``names`` are the naming families (``("llama3", "llama3p1", "llama3p2")``);
  ``category`` (default: the first name) is the package holding the config.
  ``model_class``, ``param_table`` and ``orbax_layout`` (the key map of the family's
  orbax checkpoints, if it has any) are objects or ``"module:attribute"`` strings.
  Without ``model_class`` the call decorates the model class.

  Example::

      register_family(names=("toy",), model_types=("toy",), architectures=("ToyLM",),
                      config_class=ToyConfig, model_class="toy.model:ToyLM",
                      param_table="toy.params:TOY_PARAMS")
  """

  def register(model: type | str) -> FamilySpec:
    spec = FamilySpec(
        category=category or names[0],
        names=tuple(names),
        model_types=tuple(model_types),
        architectures=tuple(architectures),
        config_class=config_class,
        model_class=model,
        param_table=param_table,
        orbax_layout=orbax_layout,
    )
    _families[spec.category] = spec
    return spec

  if model_class is not None:
    return register(model_class)

  def decorate(cls: type[T]) -> type[T]:
    register(cls)
    return cls

  return decorate


def register_config(config_id: str, *, family: str | None = None) -> Callable[[T], T]:
  """Decorator registering a zero-argument factory as the preset ``config_id``.

  The family defaults to the longest registered family name that prefixes the id.
  """

  def decorate(factory: T) -> T:
    _configs[config_id] = (family or "", factory)
    return factory

  return decorate


def register_presets(
    factory: Callable[..., Any], table: dict[str, dict[str, Any]], *, family: str | None = None
) -> None:
  """Registers every row of ``table`` as the preset ``factory(**row)``.

  Example::

      register_presets(_qwen3, {"qwen3_0p6b": dict(hidden_size=1024, num_layers=28, ...)})
  """
  for config_id, fields in table.items():
    register_config(config_id, family=family)(functools.partial(factory, **fields))


def ensure_loaded() -> None:
  """Imports the built-in families and the entry-point plug-ins, once."""
  global _loaded
  with _load_lock:
    if _loaded:
      return
    _loaded = True
    importlib.import_module("tunix_zoo.models")
    for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
      try:
        entry_point.load()
      except Exception as e:  # A broken plug-in must not break the built-ins.
        log.warning("tunix_zoo plug-in %r failed to load: %s", entry_point.name, e)


def families() -> dict[str, FamilySpec]:
  """All registered families keyed by config category."""
  ensure_loaded()
  return dict(_families)


def family_names() -> dict[str, str]:
  """Maps every naming family (``llama3p1``) to its config category (``llama3``)."""
  return {name: spec.category for spec in families().values() for name in spec.names}


def get_family(name: str) -> FamilySpec:
  """The family registered under a category or naming family name."""
  by_name = family_names()
  if name not in by_name:
    raise UnknownModelError(_unknown("model family", name, by_name))
  return _families[by_name[name]]


def family_for_hf_config(hf_config: dict[str, Any]) -> FamilySpec:
  """The family that reads a checkpoint's config.json (by model_type, then architectures).

  Raises ConfigError when config.json is not an object or names its architecture with
  values of the wrong type; UnknownModelError when no registered family reads it.
  """
  _check_identity(hf_config)
  specs = families().values()
  model_type = hf_config.get("model_type")
  for spec in specs:
    if model_type in spec.model_types:
      return spec
  for arch in hf_config.get("architectures") or ():
    for spec in specs:
      if arch in spec.architectures:
        return spec
  known = sorted(t for spec in specs for t in spec.model_types)
  raise UnknownModelError(
      _unknown("HF model_type", str(model_type), known)
      + " Only registered architectures load; no remote code is ever run."
  )


def _check_identity(hf_config: Any) -> None:
  """config.json's ``model_type`` / ``architectures`` are strings where given."""
  if not isinstance(hf_config, dict):
    shown = "null" if hf_config is None else type(hf_config).__name__
    raise ConfigError(
        f"config.json holds {shown}, not an object; use the config.json that belongs to "
        "these weights."
    )
  model_type, architectures = hf_config.get("model_type"), hf_config.get("architectures")
  if model_type is not None and not isinstance(model_type, str):
    raise ConfigError(
        f"config.json 'model_type' is {model_type!r}; expected a string such as 'qwen3'."
    )
  if architectures is not None and (
      not isinstance(architectures, list) or not all(isinstance(a, str) for a in architectures)
  ):
    raise ConfigError(
        f"config.json 'architectures' is {architectures!r:.80}; expected a list of class "
        "names such as [\"Qwen3ForCausalLM\"]."
    )


def family_for_config_class(config_class: type) -> FamilySpec:
  """The family whose config dataclass is ``config_class``."""
  for spec in families().values():
    if spec.config_class is config_class:
      return spec
  raise UnknownModelError(
      f"{config_class.__name__} is the config of no registered family; build configs with "
      "a family's config class or registry.get_config(id)."
  )


def config_ids() -> list[str]:
  """Every registered preset id, sorted."""
  ensure_loaded()
  return sorted(_configs)


def resolve_config_id(config_id: str) -> str:
  """The registered id serving ``config_id``: itself, or it without variant suffixes."""
  ensure_loaded()
  candidate = config_id
  while candidate not in _configs:
    stripped = next(
        (candidate[: -len(s)] for s in VARIANT_SUFFIXES if candidate.endswith(s)), None
    )
    if stripped is None:
      raise UnknownModelError(_unknown("config id", config_id, _configs))
    candidate = stripped
  return candidate


def get_config(config_id: str) -> Any:
  """A fresh config for a preset id (variants resolve to their architecture's preset)."""
  return _configs[resolve_config_id(config_id)][1]()


def family_of_config(config_id: str) -> FamilySpec:
  """The family a preset id belongs to."""
  resolved = resolve_config_id(config_id)
  explicit = _configs[resolved][0]
  if explicit:
    return get_family(explicit)
  names = family_names()
  for name in sorted(names, key=len, reverse=True):
    if resolved.startswith(name + "_"):
      return _families[names[name]]
  raise UnknownModelError(f"Config id {config_id!r} belongs to no registered family.")


def _unknown(what: str, value: str, known: Any) -> str:
  known = sorted(known)
  value = value[:100]  # A suggestion is for a typo, not for pages of text: bound the work.
  close = difflib.get_close_matches(value, known, n=1, cutoff=0.5)
  hint = f" Did you mean {close[0]!r}?" if close else ""
  return f"Unknown {what} {value!r}.{hint} Known: {', '.join(known)}."
