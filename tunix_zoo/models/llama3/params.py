"""Llama 3 checkpoints use the shared Llama-style layout unchanged."""

from tunix_zoo.models.decoder_params import LLAMA_STYLE

LLAMA3_PARAMS = LLAMA_STYLE
