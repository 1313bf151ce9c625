"""Gemma 3 text checkpoints: Gemma 2's layout plus QK-norms (already in the shared table).

Multimodal checkpoints (``Gemma3ForConditionalGeneration``) hold the same decoder under
``language_model.model.`` (as published) or ``model.language_model.`` (as transformers
5 names it in memory); their vision tower and projector are left unread.
"""

from tunix_zoo.models.gemma2.params import SANDWICH_NORMS
from tunix_zoo.models.decoder_params import LLAMA_STYLE

VISION_KEYS = (
    r"(model\.)?vision_tower\..*",
    r"(model\.)?multi_modal_projector\..*",
)

GEMMA3_PARAMS = LLAMA_STYLE.extend(
    SANDWICH_NORMS,
    ignored=VISION_KEYS,
    aliases=[
        ("model.", "language_model.model."),
        ("model.", "model.language_model."),
        ("lm_head.", "language_model.lm_head."),
    ],
)
