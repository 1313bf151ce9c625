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

from tunix_zoo.config import FULL_ATTENTION, SLIDING_ATTENTION, text_config
from tunix_zoo.models.gemma.config import GELU_TANH, GemmaConfig
from tunix_zoo.registry import register_config, register_family


@dataclasses.dataclass(frozen=True)
class Gemma2Config(GemmaConfig):
  """Gemma 2 (``Gemma2ForCausalLM``)."""

  model_type: ClassVar[str] = "gemma2"
  architecture: ClassVar[str] = "Gemma2ForCausalLM"
  hf_defaults: ClassVar[dict[str, Any]] = {
      **GemmaConfig.hf_defaults,
      "query_pre_attn_scalar": 256,
      "attn_logit_softcapping": 50.0,
      "final_logit_softcapping": 30.0,
      "sliding_window": 4096,
  }

  sandwich_norms: bool = True

  @classmethod
  def hf_fields(cls, hf: dict[str, Any]) -> dict[str, Any]:
    hf = {**cls.hf_defaults, **text_config(hf)}
    fields = super().hf_fields(hf)
    fields.update(
        sandwich_norms=True,
        query_pre_attn_scalar=_optional_float(hf["query_pre_attn_scalar"]),
        attn_logit_softcap=_optional_float(hf["attn_logit_softcapping"]),
        final_logit_softcap=_optional_float(hf["final_logit_softcapping"]),
        sliding_window=hf["sliding_window"],
        layer_types=cls.read_layer_types(hf, fields["num_layers"]),
    )
    return fields

  @classmethod
  def read_activation(cls, hf: dict[str, Any]) -> str:
    # Gemma 2 and 3 read ``hidden_activation`` and take "gelu" at its word.
    return hf.get("hidden_activation") or hf.get("hidden_act") or GELU_TANH

  @classmethod
  def read_layer_types(cls, hf: dict[str, Any], num_layers: int) -> tuple[str, ...]:
    """``layer_types`` as written, else transformers' alternation (sliding first)."""
    types = hf.get("layer_types") or alternating_layer_types(num_layers, period=2)
    return normalized_layer_types(types)

  def to_hf_config(self) -> dict[str, Any]:
    out = super().to_hf_config()
    out.update(
        # transformers 5 validates this field as an int.
        query_pre_attn_scalar=_int_if_whole(self.query_pre_attn_scalar),
        attn_logit_softcapping=self.attn_logit_softcap,
        final_logit_softcapping=self.final_logit_softcap,
        sliding_window=self.sliding_window,
        layer_types=list(self.layer_types or [FULL_ATTENTION] * self.num_layers),
    )
    return out


FAMILY = register_family(
    names=("gemma2",),
    model_types=("gemma2",),
    architectures=("Gemma2ForCausalLM",),
    config_class=Gemma2Config,
    model_class="tunix_zoo.layers.decoder:DecoderLM",
    param_table="tunix_zoo.models.gemma2.params:GEMMA2_PARAMS",
)


def alternating_layer_types(num_layers: int, period: int) -> tuple[str, ...]:
  """Every ``period``-th layer (1-based) is full attention, the rest slide: transformers' rule."""
  return tuple(
      SLIDING_ATTENTION if (i + 1) % period else FULL_ATTENTION for i in range(num_layers)
  )


def normalized_layer_types(types: Any) -> tuple[str, ...]:
  """``()`` when every layer is full attention, so both spellings compare equal."""
  types = tuple(types)
  return () if all(t == FULL_ATTENTION for t in types) else types


def _optional_float(value: Any) -> float | None:
  return None if value is None else float(value)


def _int_if_whole(value: float | None) -> float | int | None:
  return int(value) if value is not None and float(value).is_integer() else value


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


@register_config("gemma2_2b")
def gemma2_2b() -> Gemma2Config:
  """google/gemma-2-2b: 2.61B parameters."""
  return _gemma2(
      hidden_size=2304,
      num_layers=26,
      num_heads=8,
      num_kv_heads=4,
      intermediate_size=9216,
      query_pre_attn_scalar=256.0,
  )


@register_config("gemma2_9b")
def gemma2_9b() -> Gemma2Config:
  """google/gemma-2-9b: 9.24B parameters."""
  return _gemma2(
      hidden_size=3584,
      num_layers=42,
      num_heads=16,
      num_kv_heads=8,
      intermediate_size=14_336,
      query_pre_attn_scalar=256.0,
  )


@register_config("gemma2_27b")
def gemma2_27b() -> Gemma2Config:
  """google/gemma-2-27b: 27.2B parameters; queries scale by hidden_size / num_heads."""
  return _gemma2(
      hidden_size=4608,
      num_layers=46,
      num_heads=32,
      num_kv_heads=16,
      head_dim=128,
      intermediate_size=36_864,
      query_pre_attn_scalar=144.0,
  )
