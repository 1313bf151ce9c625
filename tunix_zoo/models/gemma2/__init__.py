"""The gemma2 family: config presets, model, checkpoint key map."""

from tunix_zoo.models.gemma2 import config, model, params  # noqa: F401  (registers)
