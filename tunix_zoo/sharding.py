"""Logical axis names -> mesh axes, with divisibility fallbacks.

Every parameter declares logical axes (``vocab``, ``embed``, ``heads``, ``kv_heads``,
``mlp``, ``norm``, ...). One rule table maps them onto the mesh axes ``fsdp`` and
``tp``; callers may pass their own table. A dimension a mesh axis does not divide is
replicated on that axis, and that is logged once.

Example::

    rules = {**DEFAULT_RULES, "vocab": None}   # keep the embedding unsharded on vocab
    model, path = AutoModel.from_pretrained(path, mesh, sharding_rules=rules)
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Mapping, Sequence

import jax
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding, PartitionSpec

from tunix_zoo.errors import ShardingError

log = logging.getLogger(__name__)

MeshAxes = str | tuple[str, ...] | None
Rules = Mapping[str, MeshAxes]

DEFAULT_RULES: dict[str, MeshAxes] = {
    "batch": "fsdp",
    "vocab": "tp",
    "embed": "fsdp",
    "heads": "tp",
    "kv_heads": "tp",
    "mlp": "tp",
    "experts": "fsdp",
    "expert_mlp": "tp",
    "norm": None,
    "head_dim": None,
    "sequence": None,
}

_warned: set[tuple[Any, ...]] = set()


def mesh_axes(value: MeshAxes) -> tuple[str, ...]:
  """The mesh axes of one PartitionSpec entry, as a tuple."""
  if value is None:
    return ()
  return (value,) if isinstance(value, str) else tuple(value)


def validate_rules(rules: Rules, mesh: Mesh) -> None:
  """Raises ShardingError when a rule names an axis the mesh does not have."""
  for logical, axes in rules.items():
    for axis in mesh_axes(axes):
      if axis not in mesh.axis_names:
        raise ShardingError(
            f"Sharding rule {logical!r} -> {axis!r} names a mesh axis the mesh lacks "
            f"(mesh axes: {mesh.axis_names}). Fix the rule or build the mesh with that axis."
        )


def rules_for_axes(fsdp: str | None = None, tp: str | None = None,
                   rules: Rules | None = None) -> dict[str, MeshAxes]:
  """``rules`` (default :data:`DEFAULT_RULES`) with ``fsdp`` / ``tp`` renamed to the
  mesh's own axis names.

  Example::

      mesh = jax.make_mesh((2, 4), ("data", "model"))
      rules = rules_for_axes(fsdp="data", tp="model")
      model, path = AutoModel.from_pretrained(path, mesh, sharding_rules=rules)
  """
  names = {"fsdp": fsdp, "tp": tp}
  return {logical: tuple(names.get(a) or a for a in mesh_axes(axes)) or None
          for logical, axes in (DEFAULT_RULES if rules is None else rules).items()}


def check_mesh_axes(mesh: Mesh, rules: Rules | None) -> None:
  """Raises ShardingError when the rules in force shard nothing on a multi-device mesh.

  With the default rules a mesh whose axes are not ``fsdp`` / ``tp`` (``('data',
  'model')``) would replicate every parameter on every device.
  """
  used = {a for axes in (DEFAULT_RULES if rules is None else rules).values()
          for a in mesh_axes(axes)}
  if mesh.size == 1 or any(mesh.shape.get(a, 1) > 1 for a in used):
    return
  names = tuple(mesh.axis_names)
  example = (f"sharding_rules=tunix_zoo.sharding.rules_for_axes(fsdp={names[0]!r}, "
             f"tp={names[-1]!r})" if len(names) >= 2 else
             f"sharding_rules=tunix_zoo.sharding.rules_for_axes(tp={names[0]!r})")
  raise ShardingError(
      f"The mesh's axes {names} (sizes {dict(mesh.shape)}) are not named by the sharding "
      f"rules, which use {sorted(used)}: every parameter would be replicated on all "
      f"{mesh.size} devices. Pass {example}, or build the mesh with axes ('fsdp', 'tp').")


def partition_spec(
    logical_axes: Sequence[str | None],
    shape: Sequence[int],
    mesh: Mesh,
    rules: Rules | None = None,
    counts: Mapping[str, int] | None = None,
    what: str = "",
    keep_unit_axes: bool = False,
) -> PartitionSpec:
  """The PartitionSpec of an array with these logical axes on ``mesh``.

  ``counts`` gives, per logical axis, the number that must divide evenly (e.g. the
  number of heads for a flattened ``heads * head_dim`` dimension); by default the
  dimension itself. Axes that do not divide are replicated (logged once per logical
  axis and size). Mesh axes of size 1 are left out unless ``keep_unit_axes``.
  """
  rules = DEFAULT_RULES if rules is None else rules
  counts = counts or {}
  used: set[str] = set()
  spec: list[MeshAxes] = []
  for dim, logical in zip(shape, logical_axes):
    # Axes of size 1 shard nothing; leaving them out keeps Explicit types simple.
    axes = tuple(
        a for a in mesh_axes(rules.get(logical) if logical else None)
        if a in mesh.shape and (keep_unit_axes or mesh.shape[a] > 1) and a not in used
    )
    size = 1
    for a in axes:
      size *= mesh.shape[a]
    count = counts.get(logical, dim) if logical else dim
    if axes and (count % size or dim % size):
      # Once per logical axis and size, not per parameter: every layer's k_proj and
      # v_proj share the one cause.
      key = (logical, axes, count)
      if key not in _warned:
        _warned.add(key)
        log.warning(
            "%s of size %d is not divisible by mesh axes %s (size %d); replicating every "
            "such dimension on them (first seen on %s).",
            logical, count, axes, size, what or "an activation",
        )
      axes = ()
    used.update(axes)
    spec.append(axes[0] if len(axes) == 1 else (axes or None))
  return PartitionSpec(*spec)


def named_sharding(
    logical_axes: Sequence[str | None],
    shape: Sequence[int],
    mesh: Mesh,
    rules: Rules | None = None,
    counts: Mapping[str, int] | None = None,
    what: str = "",
    keep_unit_axes: bool = False,
) -> NamedSharding:
  """:func:`partition_spec` wrapped in a NamedSharding on ``mesh``."""
  return NamedSharding(
      mesh, partition_spec(logical_axes, shape, mesh, rules, counts, what, keep_unit_axes)
  )


def mesh_of(x: Any) -> Mesh | AbstractMesh | None:
  """The mesh ``x`` is sharded over: concrete for an array, abstract inside a trace;
  None off a mesh (one device, or a shape without sharding)."""
  if isinstance(x, jax.core.Tracer):
    mesh = jax.typeof(x).sharding.mesh
    return None if mesh.empty else mesh
  placement = getattr(x, "sharding", None)
  return placement.mesh if isinstance(placement, NamedSharding) else None


def batch_axes(x: Any) -> MeshAxes:
  """The mesh axes ``x``'s leading (batch) dimension is typed with; None if unsharded."""
  spec = jax.typeof(x).sharding.spec
  return spec[0] if len(spec) else None


def typed_on(mesh: Mesh | AbstractMesh, x: jax.Array | None) -> jax.Array | None:
  """``x`` typed replicated on ``mesh`` when its type names no mesh (made outside any
  ``jax.set_mesh``); else ``x`` itself."""
  if x is None or not jax.typeof(x).sharding.mesh.empty:
    return x
  return jax.sharding.reshard(x, NamedSharding(mesh, PartitionSpec()))


def has_explicit_axes(mesh: Mesh | AbstractMesh | None) -> bool:
  return mesh is not None and any(t == AxisType.Explicit for t in mesh.axis_types)


def constrain(
    x: jax.Array,
    logical_axes: Sequence[str | None],
    mesh: Mesh | None,
    rules: Rules | None = None,
    counts: Mapping[str, int] | None = None,
) -> jax.Array:
  """A sharding constraint on an activation; a no-op without a mesh.

  Inside :func:`run_with_auto_axes` the context mesh is the Auto view of an Explicit
  mesh, and the constraint is stated on it.
  """
  if mesh is None or mesh.size == 1:
    return x
  spec = partition_spec(logical_axes, x.shape, mesh, rules, counts)
  context = jax.sharding.get_abstract_mesh()
  if not context.empty and not has_explicit_axes(context):
    return jax.lax.with_sharding_constraint(x, NamedSharding(context, spec))
  if has_explicit_axes(mesh):
    return x
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def run_with_auto_axes(fn: Callable[..., Any], mesh: Mesh | None, out_sharding: Any) -> Callable:
  """Runs ``fn`` with the mesh's Explicit axes treated as Auto.

  Models are written for Auto sharding (the compiler places collectives); parameters
  on an Explicit mesh keep their types outside, and ``out_sharding`` says where the
  outputs land.
  """
  if not has_explicit_axes(mesh):
    return fn
  explicit = tuple(
      name for name, t in zip(mesh.axis_names, mesh.axis_types) if t == AxisType.Explicit
  )
  return jax.sharding.auto_axes(fn, axes=explicit, out_sharding=out_sharding)
