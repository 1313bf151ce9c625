"""The llama3 family: config presets, model, checkpoint key map."""

from tunix_zoo.models.llama3 import config, model, params  # noqa: F401  (registers)
