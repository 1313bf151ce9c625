"""Gemma checkpoints use the shared Llama-style layout (tied embeddings, no lm_head).

``GEMMA_ORBAX`` states the same tensors as views of a Kaggle Flax (orbax) checkpoint's
leaves, as google-deepmind/gemma names them (N heads, K KV heads, H head_dim, D hidden,
F MLP width): ``q_einsum [N, D, H]``, ``kv_einsum [2, K, D, H]`` (or ``qkv_einsum
[3, N, D, H]`` when N == K, as in Gemma 7B), ``attn_vec_einsum [N, H, D]``,
``gating_einsum [2, D, F]`` or ``[2, F, D]`` (the shapes decide), ``linear [F, D]``.
"""

from tunix_zoo.checkpoint.keymap import OrbaxRule, OrbaxTable
from tunix_zoo.models.decoder_params import LAYER, LLAMA_STYLE

GEMMA_PARAMS = LLAMA_STYLE

ORBAX_LAYER = "transformer/layer_{i}/"
ATTN = f"{LAYER}self_attn."
MLP = f"{LAYER}mlp."
# [N, D, H] -> [N, H, D] -> [N*H, D]
_HEADS_IN = dict(perm=(0, 2, 1), merge=(2, 1))

ORBAX_ATTENTION = [
    OrbaxRule(f"{ATTN}q_proj.weight", f"{ORBAX_LAYER}attn/q_einsum/w", **_HEADS_IN),
    OrbaxRule(f"{ATTN}k_proj.weight", f"{ORBAX_LAYER}attn/kv_einsum/w", select=0, **_HEADS_IN),
    OrbaxRule(f"{ATTN}v_proj.weight", f"{ORBAX_LAYER}attn/kv_einsum/w", select=1, **_HEADS_IN),
    *(
        OrbaxRule(f"{ATTN}{proj}.weight", f"{ORBAX_LAYER}attn/qkv_einsum/w", select=n,
                  **_HEADS_IN)
        for n, proj in enumerate(("q_proj", "k_proj", "v_proj"))
    ),
    # [N, H, D] -> [D, N, H] -> [D, N*H]
    OrbaxRule(f"{ATTN}o_proj.weight", f"{ORBAX_LAYER}attn/attn_vec_einsum/w",
              perm=(2, 0, 1), merge=(1, 2)),
]


def orbax_mlp(d_by_f_first: bool) -> list[OrbaxRule]:
  """The MLP's rules; the orientation listed first wins only when D == F."""
  gating = f"{ORBAX_LAYER}mlp/gating_einsum/w"
  orientations = [(1, 0), None] if d_by_f_first else [None, (1, 0)]
  return [
      *(OrbaxRule(f"{MLP}{proj}.weight", gating, select=n, perm=perm)
        for perm in orientations for n, proj in enumerate(("gate_proj", "up_proj"))),
      OrbaxRule(f"{MLP}down_proj.weight", f"{ORBAX_LAYER}mlp/linear/w", perm=(1, 0)),
  ]


GEMMA_ORBAX = OrbaxTable(
    [
        OrbaxRule("model.embed_tokens.weight", "transformer/embedder/input_embedding",
                  resize_rows=True),
        OrbaxRule("model.norm.weight", "transformer/final_norm/scale"),
        *ORBAX_ATTENTION,
        *orbax_mlp(d_by_f_first=True),
        OrbaxRule(f"{LAYER}input_layernorm.weight", f"{ORBAX_LAYER}pre_attention_norm/scale"),
        # Gemma 1 has no post-attention norm: HF's "post_attention_layernorm" is pre-MLP.
        OrbaxRule(f"{LAYER}post_attention_layernorm.weight", f"{ORBAX_LAYER}pre_ffw_norm/scale"),
    ],
)
