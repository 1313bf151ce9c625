"""The qwen2p5 family: config, presets and registration; its key map is params.py."""

from tunix_zoo.models.qwen2p5 import config  # noqa: F401  (registers)
