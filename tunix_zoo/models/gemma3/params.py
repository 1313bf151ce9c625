"""Gemma 3 text checkpoints: Gemma 2's layout plus QK-norms (already in the shared table).

Multimodal checkpoints (``Gemma3ForConditionalGeneration``) hold the same decoder under
``language_model.model.`` (as published) or ``model.language_model.`` (as transformers
5 names it in memory); their vision tower and projector are left unread. Orbax
checkpoints of the 4B-27B models hold the SigLIP tower and the embedder's ``mm_*``
projection beside the decoder; they are left unread too.
"""

from tunix_zoo.checkpoint.keymap import OrbaxRule
from tunix_zoo.models.decoder_params import LAYER, LLAMA_STYLE
from tunix_zoo.models.gemma.params import ORBAX_LAYER, orbax_mlp
from tunix_zoo.models.gemma2.params import GEMMA2_ORBAX, SANDWICH_NORMS

VISION_KEYS = (
    r"(model\.)?vision_tower\..*",
    r"(model\.)?multi_modal_projector\..*",
)
ORBAX_VISION_LEAVES = (r"transformer/embedder/mm_.*", r"SigLiPFromPatches_\d+/.*")

GEMMA3_PARAMS = LLAMA_STYLE.extend(
    SANDWICH_NORMS,
    ignored=VISION_KEYS,
    aliases=[
        ("model.", "language_model.model."),
        ("model.", "model.language_model."),
        ("lm_head.", "language_model.lm_head."),
    ],
)

GEMMA3_ORBAX = GEMMA2_ORBAX.extend(
    [
        *orbax_mlp(d_by_f_first=False),
        OrbaxRule(f"{LAYER}self_attn.q_norm.weight", f"{ORBAX_LAYER}attn/_query_norm/scale"),
        OrbaxRule(f"{LAYER}self_attn.k_norm.weight", f"{ORBAX_LAYER}attn/_key_norm/scale"),
    ],
    ignored=ORBAX_VISION_LEAVES,
)
