"""The gemma family: config presets, model, checkpoint key map."""

from tunix_zoo.models.gemma import config, model, params  # noqa: F401  (registers)
