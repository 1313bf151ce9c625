"""The gemma2 family: config, presets and registration; its key map is params.py."""

from tunix_zoo.models.gemma2 import config  # noqa: F401  (registers)
