"""Declarative tables from checkpoint keys to module paths.

A rule pairs a checkpoint key template with a module path template; ``{i}`` stands for
a layer number. The same table drives loading (module path -> checkpoint key) and
export (the reverse), so a round trip is exact by construction.

A placeholder that only the checkpoint template names (``{e}``) makes a *stacked* rule:
the parameter's leading axis gathers one checkpoint tensor per index, as a model holds
its experts ``[experts, out, in]`` while checkpoints store one tensor per expert. The
loader reads slice ``e`` of the parameter from key ``e`` of :meth:`KeyMap.stacked_keys`;
export writes ``param[e]`` under the same key, so the split is exact.

Example::

    table = KeyMap([
        Rule("model.layers.{i}.self_attn.q_proj.weight", "layers.{i}.attn.q_proj.weight"),
        Rule("model.layers.{i}.mlp.experts.{e}.up_proj.weight",
             "layers.{i}.mlp.experts.up_proj"),
    ])
    table.checkpoint_key("layers.3.attn.q_proj.weight")
    # 'model.layers.3.self_attn.q_proj.weight'
    table.stacked_keys("layers.3.mlp.experts.up_proj", 2)
    # ['model.layers.3.mlp.experts.0.up_proj.weight', 'model.layers.3.mlp.experts.1.up_proj.weight']
    table.stacked_keys("layers.3.attn.q_proj.weight", 64)  # None: one checkpoint tensor
"""

from __future__ import annotations

import dataclasses
import math
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
  """One checkpoint key template and the module path template it fills.

  ``stack`` is the placeholder only ``checkpoint`` names (None for a plain rule): it
  indexes the parameter's leading axis.
  """

  checkpoint: str
  module: str
  stack: str | None = dataclasses.field(init=False, default=None)

  def __post_init__(self) -> None:
    object.__setattr__(self, "_checkpoint_re", _pattern(self.checkpoint))
    object.__setattr__(self, "_module_re", _pattern(self.module))
    in_checkpoint = set(_PLACEHOLDER.findall(self.checkpoint))
    in_module = set(_PLACEHOLDER.findall(self.module))
    # A table is code, not user input: a malformed rule is a bug in the family.
    if in_module - in_checkpoint or len(in_checkpoint - in_module) > 1:
      raise ValueError(
          f"Rule {self.checkpoint!r} -> {self.module!r}: every module placeholder must be in "
          "the checkpoint template, which may name at most one more (the stacked axis)."
      )
    object.__setattr__(self, "stack", next(iter(in_checkpoint - in_module), None))


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

  def _rule_for(self, module_path: str) -> tuple[Rule, dict[str, str]]:
    for rule in self.rules:
      match = rule._module_re.match(module_path)
      if match:
        return rule, match.groupdict()
    raise CheckpointError(
        f"No checkpoint key is mapped to model parameter {module_path!r}; the family's "
        "params.py table is missing a rule for it."
    )

  def checkpoint_key(self, module_path: str) -> str:
    """The checkpoint key holding the parameter at ``module_path``.

    For a stacked parameter, the key template with the stacked placeholder left in
    (``'model.layers.0.mlp.experts.{e}.up_proj.weight'``); see :meth:`stacked_keys`.
    """
    rule, values = self._rule_for(module_path)
    if rule.stack is not None:
      values[rule.stack] = "{" + rule.stack + "}"
    return rule.checkpoint.format(**values)

  def stacked_keys(self, module_path: str, size: int) -> list[str] | None:
    """The keys of a stacked parameter's ``size`` slices along its leading axis.

    None when the parameter is one checkpoint tensor (:meth:`checkpoint_key`).
    """
    rule, values = self._rule_for(module_path)
    if rule.stack is None:
      return None
    return [rule.checkpoint.format(**values, **{rule.stack: n}) for n in range(size)]

  def module_path(self, checkpoint_key: str) -> str | None:
    """The module path a checkpoint key fills, or None when no rule maps it.

    A key of a stacked rule fills one slice of that path (:meth:`stack_index`).
    """
    for rule in self.rules:
      match = rule._checkpoint_re.match(checkpoint_key)
      if match:
        return rule.module.format(**match.groupdict())
    return None

  def stack_index(self, checkpoint_key: str) -> int | None:
    """The slice of a stacked parameter a checkpoint key fills; None for other keys."""
    for rule in self.rules:
      match = rule._checkpoint_re.match(checkpoint_key)
      if match:
        return None if rule.stack is None else int(match[rule.stack])
    return None

  def is_ignored(self, checkpoint_key: str) -> bool:
    return any(re.fullmatch(pattern, checkpoint_key) for pattern in self.ignored)


@dataclasses.dataclass(frozen=True)
class OrbaxRule:
  """An HF checkpoint tensor as a view of one leaf of an orbax (Flax Gemma) checkpoint.

  The HF tensor is ``leaf[select]`` (or the whole leaf when ``select`` is None),
  transposed by ``perm``, then reshaped by merging consecutive axes: ``merge`` gives how
  many transposed axes make each HF axis (``(2, 1)``: ``[N, H, D] -> [N*H, D]``).
  ``leaf`` is the '/'-joined path of module and leaf name, ``{i}`` the layer.
  ``resize_rows`` marks an embedding whose row count may differ from the model's vocab:
  extra rows are dropped, missing ones read as zeros.

  Several rules may name one HF key: the first whose leaf exists and whose view has the
  model's shape wins (Gemma 7B's ``qkv_einsum`` against ``q_einsum``+``kv_einsum``; the
  ``[2, D, F]`` against ``[2, F, D]`` gating orientations).
  """

  hf: str
  leaf: str
  select: int | None = None
  perm: tuple[int, ...] | None = None
  merge: tuple[int, ...] | None = None
  resize_rows: bool = False

  def __post_init__(self) -> None:
    object.__setattr__(self, "_hf_re", _pattern(self.hf))
    if set(_PLACEHOLDER.findall(self.hf)) != set(_PLACEHOLDER.findall(self.leaf)):
      raise ValueError(f"OrbaxRule {self.hf!r} <- {self.leaf!r}: placeholders differ.")

  def leaf_for(self, hf_key: str) -> str | None:
    """The leaf this rule reads ``hf_key`` from, or None when it does not make that key."""
    found = self._hf_re.match(hf_key)
    return None if found is None else self.leaf.format(**found.groupdict())

  def view_shape(self, leaf_shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """The HF shape this rule makes of a leaf of ``leaf_shape``; None if it cannot."""
    shape = tuple(leaf_shape)
    if self.select is not None:
      if not shape or not 0 <= self.select < shape[0]:
        return None
      shape = shape[1:]
    perm = self.perm or tuple(range(len(shape)))
    if sorted(perm) != list(range(len(shape))):
      return None
    shape = tuple(shape[p] for p in perm)
    merge = self.merge or (1,) * len(shape)
    if sum(merge) != len(shape):
      return None
    out, start = [], 0
    for count in merge:
      out.append(math.prod(shape[start:start + count]))
      start += count
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class OrbaxTable:
  """A family's orbax layout: :class:`OrbaxRule` per HF key, and leaves left unread.

  Example::

      table = OrbaxTable([OrbaxRule("model.norm.weight", "transformer/final_norm/scale")],
                         ignored=[r"transformer/embedder/mm_.*"])
  """

  rules: tuple[OrbaxRule, ...]
  ignored: tuple[str, ...] = ()

  def __init__(self, rules: Iterable[OrbaxRule], ignored: Iterable[str] = ()):
    object.__setattr__(self, "rules", tuple(rules))
    object.__setattr__(self, "ignored", tuple(ignored))

  def extend(self, rules: Iterable[OrbaxRule] = (), ignored: Iterable[str] = ()) -> "OrbaxTable":
    """A new table; new rules for an HF key replace the old ones for it."""
    new_rules = tuple(rules)
    replaced = {r.hf for r in new_rules}
    kept = tuple(r for r in self.rules if r.hf not in replaced)
    return OrbaxTable(kept + new_rules, self.ignored + tuple(ignored))

  def is_ignored(self, leaf: str) -> bool:
    return any(re.fullmatch(pattern, leaf) for pattern in self.ignored)
