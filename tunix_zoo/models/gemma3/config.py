"""Gemma 3 config (text decoder): Gemma 2 with QK-norm, two ropes and 5:1 local/global.

Five sliding-window layers (rope base 10k) alternate with one full-attention layer
(rope base 1M, linearly scaled by 8 on 4B/12B/27B); logits are not soft-capped.
The multimodal checkpoints (``Gemma3ForConditionalGeneration``, ``model_type`` gemma3)
nest the decoder under ``text_config``; it parses to the same config, with the
defaults of transformers' ``Gemma3TextConfig`` for every key the nested dict omits.

Example::

    cfg = Gemma3Config.from_hf_config(json.load(open("gemma-3-4b-it/config.json")))
    cfg.layer_rope(0).theta, cfg.layer_rope(5).theta  # (10000.0, 1000000.0)
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping

from tunix_zoo.config import (
    FULL_ATTENTION,
    SLIDING_ATTENTION,
    LayerPattern,
    RopeConfig,
    TokenIds,
    alternating_layer_types,
    read_positive_float,
    read_rope,
    with_defaults,
)
from tunix_zoo.models.gemma2.config import Gemma2Config
from tunix_zoo.registry import register_family, register_presets

GLOBAL_THETA = 1_000_000.0
LOCAL_THETA = 10_000.0
SLIDING_WINDOW_PATTERN = 6


@dataclasses.dataclass(frozen=True)
class Gemma3Ropes:
  """The global and the local (sliding-window) rope: ``rope_parameters`` per layer type
  (transformers 5), or ``rope_theta`` / ``rope_scaling`` and ``rope_local_base_freq``."""

  def read(self, hf: Mapping[str, Any], top: Mapping[str, Any], fields: dict[str, Any]) -> None:
    local_theta = read_positive_float(
        hf.get("rope_local_base_freq", LOCAL_THETA), "rope_local_base_freq"
    )
    params = hf.get("rope_parameters")
    if isinstance(params, Mapping) and (FULL_ATTENTION in params or SLIDING_ATTENTION in params):
      theta = read_positive_float(hf.get("rope_theta", GLOBAL_THETA), "rope_theta")
      fields["rope"] = RopeConfig.from_hf(
          params.get(FULL_ATTENTION), theta, f"rope_parameters.{FULL_ATTENTION}"
      )
      fields["local_rope"] = RopeConfig.from_hf(
          params.get(SLIDING_ATTENTION), local_theta, f"rope_parameters.{SLIDING_ATTENTION}"
      )
    else:
      fields["rope"] = read_rope(hf, GLOBAL_THETA)
      fields["local_rope"] = RopeConfig(theta=local_theta)

  def write(self, config: "Gemma3Config", out: dict[str, Any]) -> None:
    local_rope = config.local_rope or config.rope
    out.update(rope_theta=config.rope.theta, rope_scaling=config.rope.to_hf(),
               rope_local_base_freq=local_rope.theta)
    if local_rope.kind != "default":
      # The Hub spelling has no key for a scaled local rope; transformers 5 reads this one.
      out["rope_parameters"] = {
          FULL_ATTENTION: {**(config.rope.to_hf() or {"rope_type": "default"}),
                           "rope_theta": config.rope.theta},
          SLIDING_ATTENTION: {**local_rope.to_hf(), "rope_theta": local_rope.theta},
      }


@dataclasses.dataclass(frozen=True)
class Gemma3Config(Gemma2Config):
  """Gemma 3 text decoder (``Gemma3ForCausalLM``; also read from the multimodal config)."""

  model_type: ClassVar[str] = "gemma3_text"
  architecture: ClassVar[str] = "Gemma3ForCausalLM"
  # Every config.json spelling this family reads (the multimodal one nests the decoder).
  model_types: ClassVar[tuple[str, ...]] = ("gemma3_text", "gemma3")
  architectures: ClassVar[tuple[str, ...]] = (
      "Gemma3ForCausalLM",
      "Gemma3ForConditionalGeneration",
  )
  # transformers' Gemma3TextConfig defaults: multimodal config.json files rely on them.
  HF_FIELDS: ClassVar = with_defaults(
      Gemma2Config.HF_FIELDS,
      vocab_size=262_208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=131_072,
      attn_logit_softcapping=None, final_logit_softcapping=None,
  )
  HF_TRANSFORMS: ClassVar = (
      TokenIds(), Gemma3Ropes(),
      LayerPattern(period=SLIDING_WINDOW_PATTERN, period_key="sliding_window_pattern"),
  )

  qk_norm: bool = True
  local_rope: RopeConfig | None = RopeConfig(theta=LOCAL_THETA)


FAMILY = register_family(
    names=("gemma3",),
    model_types=Gemma3Config.model_types,
    architectures=Gemma3Config.architectures,
    config_class=Gemma3Config,
    model_class="tunix_zoo.layers.decoder:DecoderLM",
    param_table="tunix_zoo.models.gemma3.params:GEMMA3_PARAMS",
    orbax_layout="tunix_zoo.models.gemma3.params:GEMMA3_ORBAX",
)


def _gemma3(**fields: Any) -> Gemma3Config:
  return Gemma3Config(
      head_dim=fields.pop("head_dim", 256),
      query_pre_attn_scalar=fields.pop("query_pre_attn_scalar", 256.0),
      layer_types=alternating_layer_types(fields["num_layers"], SLIDING_WINDOW_PATTERN),
      rope=fields.pop("rope", RopeConfig(theta=GLOBAL_THETA)),
      local_rope=RopeConfig(theta=LOCAL_THETA),
      **fields,
  )


# The 4B/12B/27B checkpoints are multimodal; their decoder has 64 extra (image) tokens
# in its vocabulary and a global rope stretched 8x for 128k context.
_LONG_ROPE = RopeConfig(theta=GLOBAL_THETA, kind="linear", factor=8.0)


register_presets(_gemma3, {
    # google/gemma-3-270m: 268M parameters.
    "gemma3_270m": dict(
        vocab_size=262_144, hidden_size=640, num_layers=18, num_heads=4, num_kv_heads=1,
        intermediate_size=2048, sliding_window=512, max_position_embeddings=32_768,
    ),
    # google/gemma-3-1b-pt: 1.0B parameters.
    "gemma3_1b": dict(
        vocab_size=262_144, hidden_size=1152, num_layers=26, num_heads=4, num_kv_heads=1,
        intermediate_size=6912, sliding_window=512, max_position_embeddings=32_768,
    ),
    # google/gemma-3-4b-pt text decoder: 3.88B parameters (4.3B with the vision tower).
    "gemma3_4b": dict(
        vocab_size=262_208, hidden_size=2560, num_layers=34, num_heads=8, num_kv_heads=4,
        intermediate_size=10_240, sliding_window=1024, max_position_embeddings=131_072,
        rope=_LONG_ROPE,
    ),
    # google/gemma-3-12b-pt text decoder: 11.8B parameters (12.2B with the vision tower).
    "gemma3_12b": dict(
        vocab_size=262_208, hidden_size=3840, num_layers=48, num_heads=16, num_kv_heads=8,
        intermediate_size=15_360, sliding_window=1024, max_position_embeddings=131_072,
        rope=_LONG_ROPE,
    ),
    # google/gemma-3-27b-pt text decoder: 27.0B parameters (27.4B with the vision tower).
    "gemma3_27b": dict(
        vocab_size=262_208, hidden_size=5376, num_layers=62, num_heads=32, num_kv_heads=16,
        head_dim=128, intermediate_size=21_504, query_pre_attn_scalar=168.0,
        sliding_window=1024, max_position_embeddings=131_072, rope=_LONG_ROPE,
    ),
})
