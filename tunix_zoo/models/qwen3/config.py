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
from typing import Any, ClassVar

from tunix_zoo.config import (
    DecoderConfig,
    RopeConfig,
    read_sliding_window,
    sliding_window_hf,
    text_config,
)
from tunix_zoo.errors import ConfigMismatchError
from tunix_zoo.registry import register_config, register_family

MOE_MODEL_TYPE = "qwen3_moe"
MOE_ARCHITECTURE = "Qwen3MoeForCausalLM"


@dataclasses.dataclass(frozen=True)
class Qwen3Config(DecoderConfig):
  """Qwen3 (``Qwen3ForCausalLM``) and Qwen3-MoE (``Qwen3MoeForCausalLM``)."""

  model_type: ClassVar[str] = "qwen3"
  architecture: ClassVar[str] = "Qwen3ForCausalLM"
  # Every config.json spelling this one dataclass reads.
  model_types: ClassVar[tuple[str, ...]] = ("qwen3", MOE_MODEL_TYPE)
  architectures: ClassVar[tuple[str, ...]] = ("Qwen3ForCausalLM", MOE_ARCHITECTURE)
  # What transformers' Qwen3Config / Qwen3MoeConfig assume for omitted keys.
  hf_defaults: ClassVar[dict[str, Any]] = {
      "rms_norm_eps": 1e-6,
      "rope_theta": 10_000.0,
      "max_position_embeddings": 32_768,
      "tie_word_embeddings": False,
  }
  hf_moe_defaults: ClassVar[dict[str, Any]] = {
      "num_experts": 128,
      "num_experts_per_tok": 8,
      "moe_intermediate_size": 768,
      "decoder_sparse_step": 1,
      "mlp_only_layers": [],
      "norm_topk_prob": False,
      "router_aux_loss_coef": 0.001,
  }

  qk_norm: bool = True

  @classmethod
  def hf_fields(cls, hf: dict[str, Any]) -> dict[str, Any]:
    hf = text_config(hf)
    moe = _is_moe(hf)
    # Dense Qwen3 defaults head_dim to 128; Qwen3-MoE to hidden_size / heads.
    defaults = {**cls.hf_defaults, **(cls.hf_moe_defaults if moe else {"head_dim": 128})}
    hf = {**defaults, **hf}
    if hf.get("attention_bias"):
      raise ConfigMismatchError(
          "This Qwen3 config.json sets attention_bias=true (biases on q/k/v/o), which no "
          "published Qwen3 uses and tunix_zoo does not implement."
      )
    fields = super().hf_fields(hf)
    fields.update(qk_norm=True, **read_sliding_window(hf, fields["num_layers"], every_layer=moe))
    if moe:
      fields.update(
          num_experts=int(hf.get("num_local_experts") or hf["num_experts"]),
          num_experts_per_tok=int(hf["num_experts_per_tok"]),
          moe_intermediate_size=int(hf["moe_intermediate_size"]),
          decoder_sparse_step=int(hf["decoder_sparse_step"]),
          mlp_only_layers=tuple(hf["mlp_only_layers"] or ()),
          norm_topk_prob=bool(hf["norm_topk_prob"]),
          router_aux_loss_coef=float(hf["router_aux_loss_coef"]),
      )
    return fields

  def to_hf_config(self) -> dict[str, Any]:
    out = {**super().to_hf_config(), "attention_bias": False, **sliding_window_hf(self)}
    if not self.num_experts:
      return out
    # Qwen3-MoE's config has no layer_types: its window, when on, covers every layer.
    out.pop("layer_types", None)
    out.pop("max_window_layers")
    out.update(
        architectures=[MOE_ARCHITECTURE],
        model_type=MOE_MODEL_TYPE,
        num_experts=self.num_experts,
        num_experts_per_tok=self.num_experts_per_tok,
        moe_intermediate_size=self.moe_intermediate_size,
        decoder_sparse_step=self.decoder_sparse_step,
        mlp_only_layers=list(self.mlp_only_layers),
        norm_topk_prob=self.norm_topk_prob,
        router_aux_loss_coef=self.router_aux_loss_coef,
    )
    return out


FAMILY = register_family(
    names=("qwen3",),
    model_types=Qwen3Config.model_types,
    architectures=Qwen3Config.architectures,
    config_class=Qwen3Config,
    model_class="tunix_zoo.models.qwen3.model:Qwen3ForCausalLM",
    param_table="tunix_zoo.models.qwen3.params:QWEN3_PARAMS",
)


def _is_moe(hf: dict[str, Any]) -> bool:
  return (
      hf.get("model_type") == MOE_MODEL_TYPE
      or MOE_ARCHITECTURE in (hf.get("architectures") or ())
      or bool(hf.get("num_experts") or hf.get("num_local_experts"))
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


@register_config("qwen3_0p6b")
def qwen3_0p6b() -> Qwen3Config:
  """Qwen/Qwen3-0.6B: 0.6B parameters (tied LM head)."""
  return _qwen3(
      hidden_size=1024, num_layers=28, num_heads=16, num_kv_heads=8, intermediate_size=3072,
      tie_word_embeddings=True,
  )


@register_config("qwen3_1p7b")
def qwen3_1p7b() -> Qwen3Config:
  """Qwen/Qwen3-1.7B: 1.7B parameters (tied LM head)."""
  return _qwen3(
      hidden_size=2048, num_layers=28, num_heads=16, num_kv_heads=8, intermediate_size=6144,
      tie_word_embeddings=True,
  )


@register_config("qwen3_4b")
def qwen3_4b() -> Qwen3Config:
  """Qwen/Qwen3-4B: 4.0B parameters (tied LM head)."""
  return _qwen3(
      hidden_size=2560, num_layers=36, num_heads=32, num_kv_heads=8, intermediate_size=9728,
      tie_word_embeddings=True,
  )


@register_config("qwen3_4b_instruct_2507")
def qwen3_4b_instruct_2507() -> Qwen3Config:
  """Qwen/Qwen3-4B-Instruct-2507: Qwen3-4B with rope base 5M and 256k positions."""
  return qwen3_4b().replace(**_ROPE_2507_5M)


@register_config("qwen3_4b_thinking_2507")
def qwen3_4b_thinking_2507() -> Qwen3Config:
  """Qwen/Qwen3-4B-Thinking-2507: as Qwen3-4B-Instruct-2507."""
  return qwen3_4b_instruct_2507()


@register_config("qwen3_8b")
def qwen3_8b() -> Qwen3Config:
  """Qwen/Qwen3-8B: 8.2B parameters."""
  return _qwen3(
      hidden_size=4096, num_layers=36, num_heads=32, num_kv_heads=8, intermediate_size=12_288,
  )


@register_config("qwen3_14b")
def qwen3_14b() -> Qwen3Config:
  """Qwen/Qwen3-14B: 14.8B parameters."""
  return _qwen3(
      hidden_size=5120, num_layers=40, num_heads=40, num_kv_heads=8, intermediate_size=17_408,
  )


@register_config("qwen3_32b")
def qwen3_32b() -> Qwen3Config:
  """Qwen/Qwen3-32B: 32.8B parameters."""
  return _qwen3(
      hidden_size=5120, num_layers=64, num_heads=64, num_kv_heads=8, intermediate_size=25_600,
  )


@register_config("qwen3_30b_a3b")
def qwen3_30b_a3b() -> Qwen3Config:
  """Qwen/Qwen3-30B-A3B: 30.5B parameters, 3.3B active per token."""
  return _qwen3_moe(
      hidden_size=2048, num_layers=48, num_heads=32, num_kv_heads=4, intermediate_size=6144,
      moe_intermediate_size=768,
  )


@register_config("qwen3_30b_a3b_instruct_2507")
def qwen3_30b_a3b_instruct_2507() -> Qwen3Config:
  """Qwen/Qwen3-30B-A3B-Instruct-2507: Qwen3-30B-A3B with rope base 10M, 256k positions."""
  return qwen3_30b_a3b().replace(**_ROPE_2507_10M)


@register_config("qwen3_30b_a3b_thinking_2507")
def qwen3_30b_a3b_thinking_2507() -> Qwen3Config:
  """Qwen/Qwen3-30B-A3B-Thinking-2507: as Qwen3-30B-A3B-Instruct-2507."""
  return qwen3_30b_a3b_instruct_2507()


@register_config("qwen3_235b_a22b")
def qwen3_235b_a22b() -> Qwen3Config:
  """Qwen/Qwen3-235B-A22B: 235B parameters, 22B active per token."""
  return _qwen3_moe(
      hidden_size=4096, num_layers=94, num_heads=64, num_kv_heads=4, intermediate_size=12_288,
      moe_intermediate_size=1536,
  )


@register_config("qwen3_235b_a22b_instruct_2507")
def qwen3_235b_a22b_instruct_2507() -> Qwen3Config:
  """Qwen/Qwen3-235B-A22B-Instruct-2507: Qwen3-235B-A22B with rope base 5M, 256k positions."""
  return qwen3_235b_a22b().replace(**_ROPE_2507_5M)


@register_config("qwen3_235b_a22b_thinking_2507")
def qwen3_235b_a22b_thinking_2507() -> Qwen3Config:
  """Qwen/Qwen3-235B-A22B-Thinking-2507: as Qwen3-235B-A22B-Instruct-2507."""
  return qwen3_235b_a22b_instruct_2507()
