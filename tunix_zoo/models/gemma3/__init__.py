"""The gemma3 family: config presets, model, checkpoint key map."""

from tunix_zoo.models.gemma3 import config, model, params  # noqa: F401  (registers)
