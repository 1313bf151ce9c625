"""Names of a scanned model's layer parameters (:class:`tunix_zoo.layers.decoder.LayerStack`)
in the unrolled model's terms, which the family's key map, LoRA regexes and PEFT use.

A stacked parameter (``layers.blocks.{p}...``, leading axis = layers) records the layer
numbers of its slices as ``stacked_layers`` metadata; a left-over layer's parameter
(``layers.rest.{j}...``) its number as ``layer_number``.

Example::

    unrolled_paths("layers.blocks.0.attn.q_proj.weight", {"stacked_layers": (0, 2)})
    # ['layers.0.attn.q_proj.weight', 'layers.2.attn.q_proj.weight']
"""

from __future__ import annotations

import re
from typing import Any, Mapping

_SCANNED_LAYER = re.compile(r"layers\.(?:blocks|rest)\.\d+\.")
STACKED_LAYERS = "stacked_layers"
LAYER_NUMBER = "layer_number"


def unrolled_paths(name: str, metadata: Mapping[str, Any]) -> list[str] | None:
  """The unrolled model's path of each slice of a stacked layer parameter's leading axis
  (``layers.blocks.0.attn.q_proj.weight`` -> ``['layers.0.attn...', 'layers.1.attn...']``);
  None for any other parameter.

  Example::

      unrolled_paths(module_path(path), var.get_metadata())
  """
  numbers = metadata.get(STACKED_LAYERS)
  if numbers is None:
    return None
  return [_SCANNED_LAYER.sub(f"layers.{n}.", name, count=1) for n in numbers]


def unrolled_path(name: str, metadata: Mapping[str, Any]) -> str:
  """The unrolled model's path of a parameter that is not stacked: a scanned model's
  left-over layer ``layers.rest.0.mlp.up_proj.weight`` -> ``layers.30.mlp.up_proj.weight``;
  any other path is returned as it is."""
  number = metadata.get(LAYER_NUMBER)
  return name if number is None else _SCANNED_LAYER.sub(f"layers.{number}.", name, count=1)
