"""Qwen2.5 checkpoints use the shared Llama-style layout (q/k/v biases included)."""

from tunix_zoo.models.decoder_params import LLAMA_STYLE

QWEN2P5_PARAMS = LLAMA_STYLE
