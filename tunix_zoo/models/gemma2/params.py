"""Gemma 2 checkpoints name four norms per layer; map them to the sandwich norms."""

from tunix_zoo.checkpoint.keymap import OrbaxRule, Rule
from tunix_zoo.models.decoder_params import LAYER, LLAMA_STYLE
from tunix_zoo.models.gemma.params import GEMMA_ORBAX, ORBAX_LAYER

SANDWICH_NORMS = [
    Rule(f"{LAYER}input_layernorm.weight", "layers.{i}.pre_attn_norm.weight"),
    # Unlike Llama, Gemma 2's "post_attention_layernorm" follows the attention.
    Rule(f"{LAYER}post_attention_layernorm.weight", "layers.{i}.post_attn_norm.weight"),
    Rule(f"{LAYER}pre_feedforward_layernorm.weight", "layers.{i}.pre_mlp_norm.weight"),
    Rule(f"{LAYER}post_feedforward_layernorm.weight", "layers.{i}.post_mlp_norm.weight"),
]

GEMMA2_PARAMS = LLAMA_STYLE.extend(SANDWICH_NORMS)

ORBAX_SANDWICH_NORMS = [
    OrbaxRule(f"{LAYER}{hf}.weight", f"{ORBAX_LAYER}{orbax}/scale")
    for hf, orbax in (
        ("input_layernorm", "pre_attention_norm"),
        ("post_attention_layernorm", "post_attention_norm"),
        ("pre_feedforward_layernorm", "pre_ffw_norm"),
        ("post_feedforward_layernorm", "post_ffw_norm"),
    )
]

# Gemma 2 2B stores gating as [2, D, F], 9B and 27B as [2, F, D]; the shapes decide.
GEMMA2_ORBAX = GEMMA_ORBAX.extend(ORBAX_SANDWICH_NORMS)
