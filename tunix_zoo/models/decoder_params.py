"""The checkpoint layout every Llama-style HF decoder shares.

Families extend this table with what differs (Gemma 2/3 name their norms differently).
Rules for modules a model lacks (``q_norm`` without QK-norm, ``lm_head`` when tied)
are simply never asked for.
"""

from tunix_zoo.checkpoint.keymap import KeyMap, Rule

LAYER = "model.layers.{i}."

LLAMA_STYLE = KeyMap(
    [
        Rule("model.embed_tokens.weight", "embed_tokens.weight"),
        *(
            Rule(f"{LAYER}self_attn.{proj}.{kind}", f"layers.{{i}}.attn.{proj}.{kind}")
            for proj in ("q_proj", "k_proj", "v_proj", "o_proj")
            for kind in ("weight", "bias")
        ),
        Rule(f"{LAYER}self_attn.q_norm.weight", "layers.{i}.attn.q_norm.weight"),
        Rule(f"{LAYER}self_attn.k_norm.weight", "layers.{i}.attn.k_norm.weight"),
        *(
            Rule(f"{LAYER}mlp.{proj}.weight", f"layers.{{i}}.mlp.{proj}.weight")
            for proj in ("gate_proj", "up_proj", "down_proj")
        ),
        Rule(f"{LAYER}input_layernorm.weight", "layers.{i}.pre_attn_norm.weight"),
        # In Llama-style checkpoints "post_attention_layernorm" is the norm before the MLP.
        Rule(f"{LAYER}post_attention_layernorm.weight", "layers.{i}.pre_mlp_norm.weight"),
        Rule("model.norm.weight", "final_norm.weight"),
        Rule("lm_head.weight", "lm_head.weight"),
    ],
    ignored=[
        r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",
        r"model\.rotary_emb\.inv_freq",
    ],
)
