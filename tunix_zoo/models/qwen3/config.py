"""Qwen3 config, dense and mixture-of-experts: the Llama decoder with per-head QK-norm.

One dataclass reads both ``qwen3`` and ``qwen3_moe`` config.json files: a config with
``num_experts > 0`` is the MoE model, whose sparse layers route each token to
``num_experts_per_tok`` of ``num_experts`` gated MLPs of width ``moe_intermediate_size``.

Example::

    cfg = Qwen3Config.from_hf_config(json.load(open("Qwen3-30B-A3B/config.json")))
    cfg.num_experts, cfg.is_sparse_layer(0)  # (128, True)
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping

from tunix_zoo.config import (
    LLAMA_FIELDS,
    DecoderConfig,
    HFField,
    QwenSlidingWindow,
    Rope,
    RopeConfig,
    TokenIds,
    read_bool,
    read_float,
    read_int_list,
    read_positive_int,
    replacing,
    with_defaults,
)
from tunix_zoo.registry import register_family, register_presets

MOE_MODEL_TYPE = "qwen3_moe"
MOE_ARCHITECTURE = "Qwen3MoeForCausalLM"


def is_moe(hf: Mapping[str, Any]) -> bool:
  """Whether a Qwen3 config.json is the mixture-of-experts model."""
  return (
      hf.get("model_type") == MOE_MODEL_TYPE
      or MOE_ARCHITECTURE in (hf.get("architectures") or ())
      or bool(hf.get("num_experts") or hf.get("num_local_experts"))
  )


# transformers' Qwen3MoeConfig defaults for the MoE keys a config.json may leave out.
MOE_FIELDS = (
    HFField("num_experts", "num_experts", read_positive_int, default=128,
            aliases=("num_local_experts",)),
    HFField("num_experts_per_tok", "num_experts_per_tok", read_positive_int, default=8),
    HFField("moe_intermediate_size", "moe_intermediate_size", read_positive_int, default=768),
    HFField("decoder_sparse_step", "decoder_sparse_step", read_positive_int, default=1),
    HFField("mlp_only_layers", "mlp_only_layers", read_int_list, default=[]),
    HFField("norm_topk_prob", "norm_topk_prob", read_bool, default=False),
    HFField("router_aux_loss_coef", "router_aux_loss_coef", read_float, default=0.001),
)


@dataclasses.dataclass(frozen=True)
class Qwen3Moe:
  """Qwen3-MoE: the expert keys, and its own model type and architecture, when the
  config.json is the MoE model; a dense Qwen3 config.json has none of them."""

  def read(self, hf: Mapping[str, Any], top: Mapping[str, Any], fields: dict[str, Any]) -> None:
    if is_moe(hf):
      for row in MOE_FIELDS:
        fields[row.field] = row.read_from(hf, fields)

  def write(self, config: "Qwen3Config", out: dict[str, Any]) -> None:
    if not config.num_experts:
      return
    # Qwen3-MoE's config has no layer_types: its window, when on, covers every layer.
    out.pop("layer_types", None)
    out.pop("max_window_layers")
    out.update(architectures=[MOE_ARCHITECTURE], model_type=MOE_MODEL_TYPE)
    for row in MOE_FIELDS:
      out[row.key] = row.write(getattr(config, row.field))


@dataclasses.dataclass(frozen=True)
class Qwen3Config(DecoderConfig):
  """Qwen3 (``Qwen3ForCausalLM``) and Qwen3-MoE (``Qwen3MoeForCausalLM``)."""

  model_type: ClassVar[str] = "qwen3"
  architecture: ClassVar[str] = "Qwen3ForCausalLM"
  # Every config.json spelling this one dataclass reads.
  model_types: ClassVar[tuple[str, ...]] = ("qwen3", MOE_MODEL_TYPE)
  architectures: ClassVar[tuple[str, ...]] = ("Qwen3ForCausalLM", MOE_ARCHITECTURE)
  HF_FIELDS: ClassVar = replacing(
      with_defaults(LLAMA_FIELDS, max_position_embeddings=32_768),
      # transformers' defaults differ between dense Qwen3 and Qwen3-MoE.
      HFField("num_key_value_heads", "num_kv_heads", read_positive_int,
              derive=lambda hf, fields: 4 if is_moe(hf) else 32),
      HFField("head_dim", "head_dim", read_positive_int, derive=lambda hf, fields: (
          fields["hidden_size"] // fields["num_heads"] if is_moe(hf) else 128)),
  )
  HF_TRANSFORMS: ClassVar = (TokenIds(), Rope(), QwenSlidingWindow(every_layer=is_moe), Qwen3Moe())
  HF_UNSUPPORTED: ClassVar = {
      "attention_bias": "biases on q/k/v/o, which no published Qwen3 uses and tunix_zoo "
      "does not implement.",
  }
  HF_CONSTANTS: ClassVar = {"attention_bias": False}

  qk_norm: bool = True


FAMILY = register_family(
    names=("qwen3",),
    model_types=Qwen3Config.model_types,
    architectures=Qwen3Config.architectures,
    config_class=Qwen3Config,
    model_class="tunix_zoo.models.qwen3.model:Qwen3ForCausalLM",
    param_table="tunix_zoo.models.qwen3.params:QWEN3_PARAMS",
)


def _qwen3(**fields: Any) -> Qwen3Config:
  return Qwen3Config(
      vocab_size=151_936,
      head_dim=128,
      rope=fields.pop("rope", RopeConfig(theta=1_000_000.0)),
      max_position_embeddings=fields.pop("max_position_embeddings", 40_960),
      **fields,
  )


def _qwen3_moe(**fields: Any) -> Qwen3Config:
  return _qwen3(
      num_experts=128,
      num_experts_per_tok=8,
      norm_topk_prob=True,
      router_aux_loss_coef=0.001,
      **fields,
  )


# The July 2025 (2507) updates: same weights' shapes, longer native context (256k)
# reached with a larger rope base.
_ROPE_2507_5M = dict(rope=RopeConfig(theta=5_000_000.0), max_position_embeddings=262_144)
_ROPE_2507_10M = dict(rope=RopeConfig(theta=10_000_000.0), max_position_embeddings=262_144)
# Tied LM heads (0.6B, 1.7B, 4B).
_QWEN3_0P6B = dict(hidden_size=1024, num_layers=28, num_heads=16, num_kv_heads=8,
                   intermediate_size=3072, tie_word_embeddings=True)
_QWEN3_1P7B = dict(hidden_size=2048, num_layers=28, num_heads=16, num_kv_heads=8,
                   intermediate_size=6144, tie_word_embeddings=True)
_QWEN3_4B = dict(hidden_size=2560, num_layers=36, num_heads=32, num_kv_heads=8,
                 intermediate_size=9728, tie_word_embeddings=True)
_QWEN3_8B = dict(hidden_size=4096, num_layers=36, num_heads=32, num_kv_heads=8,
                 intermediate_size=12_288)
_QWEN3_14B = dict(hidden_size=5120, num_layers=40, num_heads=40, num_kv_heads=8,
                  intermediate_size=17_408)
_QWEN3_32B = dict(hidden_size=5120, num_layers=64, num_heads=64, num_kv_heads=8,
                  intermediate_size=25_600)
# Mixtures of experts: 30.5B (3.3B active per token) and 235B (22B active).
_QWEN3_30B_A3B = dict(hidden_size=2048, num_layers=48, num_heads=32, num_kv_heads=4,
                      intermediate_size=6144, moe_intermediate_size=768)
_QWEN3_235B_A22B = dict(hidden_size=4096, num_layers=94, num_heads=64, num_kv_heads=4,
                        intermediate_size=12_288, moe_intermediate_size=1536)

register_presets(_qwen3, {  # Qwen/Qwen3-<size>[-Instruct-2507 | -Thinking-2507]
    "qwen3_0p6b": _QWEN3_0P6B,
    "qwen3_1p7b": _QWEN3_1P7B,
    "qwen3_4b": _QWEN3_4B,
    "qwen3_4b_instruct_2507": {**_QWEN3_4B, **_ROPE_2507_5M},
    "qwen3_4b_thinking_2507": {**_QWEN3_4B, **_ROPE_2507_5M},
    "qwen3_8b": _QWEN3_8B,
    "qwen3_14b": _QWEN3_14B,
    "qwen3_32b": _QWEN3_32B,
})
register_presets(_qwen3_moe, {
    "qwen3_30b_a3b": _QWEN3_30B_A3B,
    "qwen3_30b_a3b_instruct_2507": {**_QWEN3_30B_A3B, **_ROPE_2507_10M},
    "qwen3_30b_a3b_thinking_2507": {**_QWEN3_30B_A3B, **_ROPE_2507_10M},
    "qwen3_235b_a22b": _QWEN3_235B_A22B,
    "qwen3_235b_a22b_instruct_2507": {**_QWEN3_235B_A22B, **_ROPE_2507_5M},
    "qwen3_235b_a22b_thinking_2507": {**_QWEN3_235B_A22B, **_ROPE_2507_5M},
})
