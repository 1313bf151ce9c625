"""The qwen2p5 family: config presets, model, checkpoint key map."""

from tunix_zoo.models.qwen2p5 import config, model, params  # noqa: F401  (registers)
