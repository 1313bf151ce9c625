"""Qwen3 checkpoints use the shared Llama-style layout (with per-head q/k norms)."""

from tunix_zoo.models.decoder_params import LLAMA_STYLE

QWEN3_PARAMS = LLAMA_STYLE
