"""Declarative tables from checkpoint keys to module paths.

A rule pairs a checkpoint key template with a module path template; ``{i}`` stands for
a layer number. The same table drives loading (module path -> checkpoint key) and
export (the reverse), so a round trip is exact by construction.

Example::

    table = KeyMap([Rule("model.layers.{i}.self_attn.q_proj.weight",
                         "layers.{i}.attn.q_proj.weight")])
    table.checkpoint_key("layers.3.attn.q_proj.weight")
    # 'model.layers.3.self_attn.q_proj.weight'
"""

from __future__ import annotations

import dataclasses
import re
from typing import Iterable

from tunix_zoo.errors import CheckpointError

_PLACEHOLDER = re.compile(r"\{(\w+)\}")


def _pattern(template: str) -> re.Pattern[str]:
  parts = _PLACEHOLDER.split(template)
  # split() alternates literal text and placeholder names.
  regex = "".join(
      re.escape(part) if n % 2 == 0 else f"(?P<{part}>\\d+)" for n, part in enumerate(parts)
  )
  return re.compile(regex + r"\Z")


@dataclasses.dataclass(frozen=True)
class Rule:
  """One checkpoint key template and the module path template it fills."""

  checkpoint: str
  module: str

  def __post_init__(self) -> None:
    object.__setattr__(self, "_checkpoint_re", _pattern(self.checkpoint))
    object.__setattr__(self, "_module_re", _pattern(self.module))


@dataclasses.dataclass(frozen=True)
class KeyMap:
  """A family's checkpoint layout.

  ``ignored`` are regexes of checkpoint keys that are legitimately left unread (rotary
  buffers, vision towers of multimodal checkpoints); ``aliases`` are ``(prefix,
  replacement)`` pairs giving other spellings of a key, tried when the key itself is
  absent (a multimodal checkpoint stores ``model.layers.0...`` as
  ``language_model.model.layers.0...``).
  """

  rules: tuple[Rule, ...]
  ignored: tuple[str, ...] = ()
  aliases: tuple[tuple[str, str], ...] = ()

  def __init__(
      self,
      rules: Iterable[Rule],
      ignored: Iterable[str] = (),
      aliases: Iterable[tuple[str, str]] = (),
  ):
    object.__setattr__(self, "rules", tuple(rules))
    object.__setattr__(self, "ignored", tuple(ignored))
    object.__setattr__(self, "aliases", tuple(aliases))

  def extend(
      self,
      rules: Iterable[Rule] = (),
      ignored: Iterable[str] = (),
      aliases: Iterable[tuple[str, str]] = (),
  ) -> "KeyMap":
    """A new table with more rules; a new rule for a module path replaces the old one."""
    new_rules = tuple(rules)
    replaced = {r.module for r in new_rules}
    kept = tuple(r for r in self.rules if r.module not in replaced)
    return KeyMap(kept + new_rules, self.ignored + tuple(ignored), self.aliases + tuple(aliases))

  def spellings(self, key: str) -> list[str]:
    """``key`` and its aliased spellings, in the order they are tried."""
    return [key] + [new + key[len(old):] for old, new in self.aliases if key.startswith(old)]

  def checkpoint_key(self, module_path: str) -> str:
    """The checkpoint key holding the parameter at ``module_path``."""
    for rule in self.rules:
      match = rule._module_re.match(module_path)
      if match:
        return rule.checkpoint.format(**match.groupdict())
    raise CheckpointError(
        f"No checkpoint key is mapped to model parameter {module_path!r}; the family's "
        "params.py table is missing a rule for it."
    )

  def module_path(self, checkpoint_key: str) -> str | None:
    """The module path a checkpoint key fills, or None when no rule maps it."""
    for rule in self.rules:
      match = rule._checkpoint_re.match(checkpoint_key)
      if match:
        return rule.module.format(**match.groupdict())
    return None

  def is_ignored(self, checkpoint_key: str) -> bool:
    return any(re.fullmatch(pattern, checkpoint_key) for pattern in self.ignored)
