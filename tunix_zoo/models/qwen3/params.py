"""Qwen3 checkpoints: the shared Llama-style layout (with per-head q/k norms), plus
Qwen3-MoE's router ``mlp.gate`` and one tensor per expert, gathered into the model's
stacked ``mlp.experts`` parameters (``[experts, out, in]``).
"""

from tunix_zoo.checkpoint.keymap import Rule
from tunix_zoo.models.decoder_params import LAYER, LLAMA_STYLE

QWEN3_PARAMS = LLAMA_STYLE.extend([
    Rule(f"{LAYER}mlp.gate.weight", "layers.{i}.mlp.gate.weight"),
    *(
        Rule(f"{LAYER}mlp.experts.{{e}}.{proj}.weight", f"layers.{{i}}.mlp.experts.{proj}")
        for proj in ("gate_proj", "up_proj", "down_proj")
    ),
])
