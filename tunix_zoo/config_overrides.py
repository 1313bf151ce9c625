"""A config with some fields changed, checked so that the result is still a model.

``--set key=value`` on the command line and :func:`config_with_overrides` in Python take
the dataclass field names of :class:`tunix_zoo.config.DecoderConfig` (``num_layers``,
not config.json's ``num_hidden_layers``); ``rope.theta`` reaches into the rope. Values
given as text are read as JSON where they parse (``4``, ``1e6``, ``true``, ``null``,
``[0, 3]``) and as plain strings otherwise (``gelu_pytorch_tanh``)::

    config = config_with_overrides(registry.get_config("qwen3_0p6b"),
                                   {"num_layers": "4", "hidden_size": 256})
    config = config_with_overrides(config, parse_overrides(["rope.theta=1e6"]))

Changing ``num_layers`` keeps the preset's repeating pattern of ``layer_types`` (Gemma
2/3's sliding and full layers) and drops ``mlp_only_layers`` beyond the last layer,
unless those fields are set too.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from typing import Any, Iterable, Mapping

from tunix_zoo.config import FULL_ATTENTION, SLIDING_ATTENTION, DecoderConfig, RopeConfig
from tunix_zoo.errors import ConfigError

__all__ = ["config_with_overrides", "parse_overrides"]

_ROPE_KINDS = ("default", "linear", "llama3")
_POSITIVE_INTS = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                  "head_dim", "intermediate_size", "max_position_embeddings")


def parse_overrides(items: Iterable[str]) -> dict[str, str]:
  """``["num_layers=4", "rope.theta=1e6"]`` -> ``{"num_layers": "4", "rope.theta": "1e6"}``.

  Raises:
    ConfigError: an item without ``=`` or with an empty key.
  """
  out: dict[str, str] = {}
  for item in items:
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
      raise ConfigError(f"--set {item!r} is not key=value; write e.g. --set num_layers=4.")
    out[key.strip()] = value.strip()
  return out


def config_with_overrides(config: DecoderConfig,
                          overrides: Mapping[str, Any]) -> DecoderConfig:
  """``config`` with the ``overrides`` fields replaced, each value converted and checked.

  Args:
    config: any family's config dataclass.
    overrides: field name (or ``rope.<field>`` / ``local_rope.<field>``) -> value; a
      string value is read as JSON when it parses, else taken as text.

  Returns:
    A new config of the same class.

  Raises:
    ConfigError: an unknown field (with the closest names), a value of the wrong type,
      or a combination no model can have (e.g. ``num_heads`` not a multiple of
      ``num_kv_heads``), naming the fields involved.

  Example::

      tiny = config_with_overrides(registry.get_config("gemma3_1b"),
                                   {"num_layers": 6, "hidden_size": 64, "vocab_size": 128})
  """
  if not overrides:
    return config
  hints = typing.get_type_hints(type(config))
  fields = {f.name for f in dataclasses.fields(config)}
  top: dict[str, Any] = {}
  nested: dict[str, dict[str, Any]] = {}
  for key, raw in overrides.items():
    head, dot, rest = key.partition(".")
    if head not in fields:
      raise ConfigError(_unknown_key(key, fields, type(config).__name__))
    if dot:
      if head not in ("rope", "local_rope"):
        raise ConfigError(f"--set {key}: {head} has no sub-fields; write --set {head}=VALUE.")
      rope_fields = {f.name for f in dataclasses.fields(RopeConfig)}
      if rest not in rope_fields:
        raise ConfigError(_unknown_key(rest, rope_fields, f"{head} (RopeConfig)", prefix=head))
      nested.setdefault(head, {})[rest] = _convert(
          key, raw, typing.get_type_hints(RopeConfig)[rest])
    else:
      top[head] = _convert(key, raw, hints[head])
  for head, changes in nested.items():
    base = top.get(head, getattr(config, head)) or RopeConfig()
    top[head] = dataclasses.replace(base, **changes)
  too_small = [f"{n}={top[n]}" for n in _POSITIVE_INTS if n in top and top[n] < 1]
  if too_small:
    raise ConfigError(f"--set {', '.join(too_small)}: each must be at least 1.")
  _follow_num_layers(config, top)
  try:
    new = config.replace(**top)
  except (ValueError, TypeError) as e:
    raise ConfigError(f"overrides {sorted(overrides)} do not make a valid "
                      f"{type(config).__name__}: {e}") from e
  _check(new, set(overrides))
  return new


def _unknown_key(key: str, known: set[str], owner: str, prefix: str = "") -> str:
  close = difflib.get_close_matches(key, sorted(known), n=3, cutoff=0.5)
  hint = f" Did you mean {', '.join((prefix + '.' if prefix else '') + c for c in close)}?" \
      if close else ""
  return (f"--set {(prefix + '.') if prefix else ''}{key}: {owner} has no field {key!r}."
          f"{hint} Fields: {', '.join(sorted(known))}.")


def _read(raw: Any) -> Any:
  if not isinstance(raw, str):
    return raw
  try:
    return json.loads(raw)
  except ValueError:
    return raw


def _convert(key: str, raw: Any, hint: Any) -> Any:
  """``raw`` as a value of the annotated type ``hint``, or ConfigError."""
  value = _read(raw)
  options = typing.get_args(hint) if _is_union(hint) else (hint,)
  if value is None:
    if type(None) in options:
      return None
    raise ConfigError(f"--set {key}=null: {key} cannot be empty (it is {_name(hint)}).")
  for option in options:
    if option is type(None):
      continue
    converted = _as(value, option)
    if converted is not _NO:
      return converted
  raise ConfigError(f"--set {key}={raw}: expected {_name(hint)}, got {value!r}.")


_NO = object()


def _as(value: Any, kind: Any) -> Any:
  origin = typing.get_origin(kind)
  if kind is bool:
    return value if isinstance(value, bool) else _NO
  if kind is int:
    return value if isinstance(value, int) and not isinstance(value, bool) else _NO
  if kind is float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) \
        else _NO
  if kind is str:
    return value if isinstance(value, str) else _NO
  if origin is tuple:
    if not isinstance(value, list):
      return _NO
    item = typing.get_args(kind)[0]
    items = [_as(v, item) for v in value]
    return _NO if any(i is _NO for i in items) else tuple(items)
  return _NO  # RopeConfig and other structures are set field by field (rope.theta=...)


def _is_union(hint: Any) -> bool:
  return typing.get_origin(hint) in (typing.Union, types.UnionType)


def _name(hint: Any) -> str:
  return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _period(items: tuple[str, ...]) -> tuple[str, ...]:
  """The shortest prefix that ``items`` repeats (all of it when none does)."""
  for p in range(1, len(items) + 1):
    if all(items[i] == items[i % p] for i in range(len(items))):
      return items[:p]
  return items


def _follow_num_layers(config: DecoderConfig, top: dict[str, Any]) -> None:
  """Fits the per-layer fields to a new ``num_layers`` unless they are overridden too."""
  layers = top.get("num_layers")
  if layers is None:
    return
  if "layer_types" not in top and config.layer_types:
    pattern = _period(config.layer_types)
    top["layer_types"] = tuple(pattern[i % len(pattern)] for i in range(layers))
  if "mlp_only_layers" not in top and config.mlp_only_layers:
    top["mlp_only_layers"] = tuple(i for i in config.mlp_only_layers if i < layers)


def _check(config: DecoderConfig, changed: set[str]) -> None:
  """Raises ConfigError naming the fields of any combination a model cannot be built from."""
  problems = []
  for name in _POSITIVE_INTS:
    if getattr(config, name) < 1:
      problems.append(f"{name}={getattr(config, name)} must be at least 1")
  if config.num_kv_heads >= 1 and config.num_heads % config.num_kv_heads:
    problems.append(f"num_heads={config.num_heads} must be a multiple of "
                    f"num_kv_heads={config.num_kv_heads}")
  if config.norm_eps <= 0:
    problems.append(f"norm_eps={config.norm_eps} must be positive")
  if config.sliding_window is not None and config.sliding_window < 1:
    problems.append(f"sliding_window={config.sliding_window} must be at least 1")
  bad_types = sorted(set(config.layer_types) - {FULL_ATTENTION, SLIDING_ATTENTION})
  if bad_types:
    problems.append(f"layer_types has {bad_types}; each entry is {FULL_ATTENTION!r} or "
                    f"{SLIDING_ATTENTION!r}")
  if SLIDING_ATTENTION in config.layer_types and config.sliding_window is None:
    problems.append("layer_types has sliding layers but sliding_window is null")
  if config.num_experts < 0 or (config.num_experts and not
                                0 < config.num_experts_per_tok <= config.num_experts):
    problems.append(f"num_experts_per_tok={config.num_experts_per_tok} must be between 1 "
                    f"and num_experts={config.num_experts}")
  if config.num_experts and config.moe_intermediate_size < 1:
    problems.append(f"moe_intermediate_size={config.moe_intermediate_size} must be at least "
                    "1 for a mixture of experts")
  if config.num_experts and config.decoder_sparse_step < 1:
    problems.append(f"decoder_sparse_step={config.decoder_sparse_step} must be at least 1")
  outside = [i for i in config.mlp_only_layers if not 0 <= i < config.num_layers]
  if outside:
    problems.append(f"mlp_only_layers {outside} are not layers of num_layers="
                    f"{config.num_layers}")
  for name in ("rope", "local_rope"):
    rope = getattr(config, name)
    if rope is not None and (rope.kind not in _ROPE_KINDS or rope.theta <= 0):
      problems.append(f"{name}.kind={rope.kind!r} must be one of {', '.join(_ROPE_KINDS)} "
                      f"and {name}.theta={rope.theta} positive")
  if problems:
    raise ConfigError(f"the overrides of {', '.join(sorted(changed))} do not make a valid "
                      f"{type(config).__name__}: " + "; ".join(problems) + ".")
