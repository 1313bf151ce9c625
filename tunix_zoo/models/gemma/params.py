"""Gemma checkpoints use the shared Llama-style layout (tied embeddings, no lm_head)."""

from tunix_zoo.models.decoder_params import LLAMA_STYLE

GEMMA_PARAMS = LLAMA_STYLE
