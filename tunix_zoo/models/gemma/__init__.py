"""The gemma family: config, presets and registration; its key map is params.py."""

from tunix_zoo.models.gemma import config  # noqa: F401  (registers)
