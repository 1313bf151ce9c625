"""tunix_zoo: HF checkpoints straight into sharded Flax NNX models.

Example::

    import jax
    from tunix_zoo import AutoModel, Tokenizer, generate
    mesh = jax.make_mesh((1, len(jax.devices())), ("fsdp", "tp"))
    model, path = AutoModel.from_pretrained("Qwen/Qwen3-0.6B", mesh)
    out = generate(model, ["Hello"], 32, tokenizer=Tokenizer.from_pretrained(path))
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Public name -> the module defining it. Resolved on first use (PEP 562), so that
# ``import tunix_zoo.naming`` or ``tunix-zoo list`` does not pay for importing jax.
_EXPORTS = {
    "AutoModel": "tunix_zoo.automodel",
    "ModelNaming": "tunix_zoo.naming",
    "ModelSource": "tunix_zoo.sources",
    "Tokenizer": "tunix_zoo.tokenizer",
    "generate": "tunix_zoo.generation",
    "register_config": "tunix_zoo.registry",
    "register_family": "tunix_zoo.registry",
    "save_pretrained": "tunix_zoo.checkpoint.export",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
  from tunix_zoo.automodel import AutoModel
  from tunix_zoo.checkpoint.export import save_pretrained
  from tunix_zoo.generation import generate
  from tunix_zoo.naming import ModelNaming
  from tunix_zoo.registry import register_config, register_family
  from tunix_zoo.sources import ModelSource
  from tunix_zoo.tokenizer import Tokenizer


def __getattr__(name: str) -> Any:
  if name not in _EXPORTS:
    raise AttributeError(f"module 'tunix_zoo' has no attribute {name!r}")
  value = getattr(importlib.import_module(_EXPORTS[name]), name)
  globals()[name] = value
  return value


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(_EXPORTS))
