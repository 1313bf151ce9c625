"""Gemma 2 config: Gemma plus sandwich norms, logit soft-capping and local/global layers.

Layers alternate sliding-window (even layers, from the first) and full attention;
attention scores are scaled by ``query_pre_attn_scalar ** -0.5`` instead of the head
dimension, and soft-capped with ``tanh`` like the final logits.

Example::

    cfg = Gemma2Config.from_hf_config(json.load(open("gemma-2-9b-it/config.json")))
    cfg.layer_window(0), cfg.layer_window(1)  # (4096, None)
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from tunix_zoo.config import (
    HFField,
    LayerPattern,
    Rope,
    TokenIds,
    alternating_layer_types,
    int_if_whole,
    read_positive_float,
    read_positive_int,
    read_str,
    replacing,
    with_defaults,
)
from tunix_zoo.models.gemma.config import GELU_TANH, GemmaConfig
from tunix_zoo.registry import register_family, register_presets

GEMMA2_FIELDS = replacing(
    tuple(row for row in with_defaults(GemmaConfig.HF_FIELDS, num_key_value_heads=4)
          if row.field != "hidden_act"),
    # Gemma 2 and 3 compute with ``hidden_activation`` alone (transformers ignores their
    # ``hidden_act``) and take "gelu" at its word.
    HFField("hidden_activation", "hidden_act", read_str, default=GELU_TANH,
            also_write=("hidden_act",)),
    HFField("query_pre_attn_scalar", "query_pre_attn_scalar", read_positive_float,
            default=256, nullable=True, write=int_if_whole),
    HFField("attn_logit_softcapping", "attn_logit_softcap", read_positive_float,
            default=50.0, nullable=True),
    HFField("final_logit_softcapping", "final_logit_softcap", read_positive_float,
            default=30.0, nullable=True),
    HFField("sliding_window", "sliding_window", read_positive_int, default=4096,
            nullable=True),
)


@dataclasses.dataclass(frozen=True)
class Gemma2Config(GemmaConfig):
  """Gemma 2 (``Gemma2ForCausalLM``)."""

  model_type: ClassVar[str] = "gemma2"
  architecture: ClassVar[str] = "Gemma2ForCausalLM"
  HF_FIELDS: ClassVar = GEMMA2_FIELDS
  # Sliding-window layers first, every second layer global (transformers' rule).
  HF_TRANSFORMS: ClassVar = (TokenIds(), Rope(), LayerPattern(period=2))

  sandwich_norms: bool = True


FAMILY = register_family(
    names=("gemma2",),
    model_types=("gemma2",),
    architectures=("Gemma2ForCausalLM",),
    config_class=Gemma2Config,
    model_class="tunix_zoo.layers.decoder:DecoderLM",
    param_table="tunix_zoo.models.gemma2.params:GEMMA2_PARAMS",
    orbax_layout="tunix_zoo.models.gemma2.params:GEMMA2_ORBAX",
)


def _gemma2(**fields: Any) -> Gemma2Config:
  return Gemma2Config(
      vocab_size=256_000,
      head_dim=fields.pop("head_dim", 256),
      sliding_window=4096,
      attn_logit_softcap=50.0,
      final_logit_softcap=30.0,
      layer_types=alternating_layer_types(fields["num_layers"], period=2),
      **fields,
  )


register_presets(_gemma2, {
    # google/gemma-2-2b: 2.61B parameters.
    "gemma2_2b": dict(hidden_size=2304, num_layers=26, num_heads=8, num_kv_heads=4,
                      intermediate_size=9216, query_pre_attn_scalar=256.0),
    # google/gemma-2-9b: 9.24B parameters.
    "gemma2_9b": dict(hidden_size=3584, num_layers=42, num_heads=16, num_kv_heads=8,
                      intermediate_size=14_336, query_pre_attn_scalar=256.0),
    # google/gemma-2-27b: 27.2B parameters; queries scale by hidden_size / num_heads.
    "gemma2_27b": dict(hidden_size=4608, num_layers=46, num_heads=32, num_kv_heads=16,
                       head_dim=128, intermediate_size=36_864, query_pre_attn_scalar=144.0),
})
