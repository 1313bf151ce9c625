"""Gemma (1) config: a Llama-style decoder with Gemma's norms, embeddings and GELU.

Gemma scales its norms by ``1 + w``, multiplies embeddings by ``sqrt(hidden_size)``,
ties the LM head to the embedding and uses the tanh approximation of GELU.

Example::

    cfg = GemmaConfig.from_hf_config(json.load(open("gemma-2b/config.json")))
    cfg == registry.get_config("gemma_2b")
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from tunix_zoo.config import DecoderConfig, text_config
from tunix_zoo.errors import ConfigMismatchError
from tunix_zoo.registry import register_config, register_family

GELU_TANH = "gelu_pytorch_tanh"


@dataclasses.dataclass(frozen=True)
class GemmaConfig(DecoderConfig):
  """Gemma 1 (``GemmaForCausalLM``)."""

  model_type: ClassVar[str] = "gemma"
  architecture: ClassVar[str] = "GemmaForCausalLM"
  # What transformers assumes for keys a config.json may leave out.
  hf_defaults: ClassVar[dict[str, Any]] = {
      "head_dim": 256,
      "rms_norm_eps": 1e-6,
      "rope_theta": 10_000.0,
      "max_position_embeddings": 8192,
      "tie_word_embeddings": True,
  }

  norm_offset: float = 1.0
  scale_embeddings: bool = True
  tie_word_embeddings: bool = True
  hidden_act: str = GELU_TANH

  @classmethod
  def hf_fields(cls, hf: dict[str, Any]) -> dict[str, Any]:
    hf = {**cls.hf_defaults, **text_config(hf)}
    _reject_unsupported(hf)
    fields = super().hf_fields(hf)
    fields.update(norm_offset=1.0, scale_embeddings=True, hidden_act=cls.read_activation(hf))
    return fields

  @classmethod
  def read_activation(cls, hf: dict[str, Any]) -> str:
    """Gemma 1 checkpoints say "gelu" but were trained with tanh GELU (transformers agrees)."""
    act = hf.get("hidden_activation") or hf.get("hidden_act") or GELU_TANH
    return GELU_TANH if act == "gelu" else act

  def to_hf_config(self) -> dict[str, Any]:
    # transformers 4 reads ``hidden_activation``, transformers 5 ``hidden_act``.
    return {**super().to_hf_config(), "hidden_activation": self.hidden_act}


FAMILY = register_family(
    names=("gemma",),
    model_types=("gemma",),
    architectures=("GemmaForCausalLM",),
    config_class=GemmaConfig,
    model_class="tunix_zoo.layers.decoder:DecoderLM",
    param_table="tunix_zoo.models.gemma.params:GEMMA_PARAMS",
)


def _reject_unsupported(hf: dict[str, Any]) -> None:
  """Gemma switches the shared layers cannot honour: fail instead of loading wrong math."""
  if hf.get("attention_bias"):
    raise ConfigMismatchError(
        "This Gemma config.json sets attention_bias=true (biases on q/k/v/o), which no "
        "published Gemma uses and tunix_zoo does not implement; load a checkpoint without it."
    )
  if hf.get("use_bidirectional_attention"):
    raise ConfigMismatchError(
        "This config.json sets use_bidirectional_attention=true (an embedding model, not a "
        "causal LM); tunix_zoo loads causal decoders only."
    )


@register_config("gemma_2b")
def gemma_2b() -> GemmaConfig:
  """google/gemma-2b: 2.51B parameters."""
  return GemmaConfig(
      vocab_size=256_000,
      hidden_size=2048,
      num_layers=18,
      num_heads=8,
      num_kv_heads=1,
      head_dim=256,
      intermediate_size=16_384,
  )


@register_config("gemma_7b")
def gemma_7b() -> GemmaConfig:
  """google/gemma-7b: 8.54B parameters."""
  return GemmaConfig(
      vocab_size=256_000,
      hidden_size=3072,
      num_layers=28,
      num_heads=16,
      num_kv_heads=16,
      head_dim=256,
      intermediate_size=24_576,
  )
