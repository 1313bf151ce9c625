"""Gemma 2 checkpoints name four norms per layer; map them to the sandwich norms."""

from tunix_zoo.checkpoint.keymap import Rule
from tunix_zoo.models.decoder_params import LAYER, LLAMA_STYLE

SANDWICH_NORMS = [
    Rule(f"{LAYER}input_layernorm.weight", "layers.{i}.pre_attn_norm.weight"),
    # Unlike Llama, Gemma 2's "post_attention_layernorm" follows the attention.
    Rule(f"{LAYER}post_attention_layernorm.weight", "layers.{i}.post_attn_norm.weight"),
    Rule(f"{LAYER}pre_feedforward_layernorm.weight", "layers.{i}.pre_mlp_norm.weight"),
    Rule(f"{LAYER}post_feedforward_layernorm.weight", "layers.{i}.post_mlp_norm.weight"),
]

GEMMA2_PARAMS = LLAMA_STYLE.extend(SANDWICH_NORMS)
