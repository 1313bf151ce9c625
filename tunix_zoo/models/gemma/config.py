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

from tunix_zoo.config import (
    LLAMA_FIELDS,
    DecoderConfig,
    HFField,
    read_str,
    replacing,
    with_defaults,
)
from tunix_zoo.registry import register_family, register_presets

GELU_TANH = "gelu_pytorch_tanh"


def read_gemma1_activation(value: Any, key: str) -> str:
  """Gemma 1 checkpoints say "gelu" but were trained with tanh GELU (transformers agrees)."""
  act = read_str(value, key)
  return GELU_TANH if act == "gelu" else act


# transformers 4 reads ``hidden_activation``, transformers 5 ``hidden_act``: read the
# former first, write both.
GEMMA_ACTIVATION = HFField("hidden_act", "hidden_act", read_gemma1_activation, default=GELU_TANH,
                           aliases=("hidden_activation",), also_write=("hidden_activation",))
GEMMA_FIELDS = replacing(
    with_defaults(LLAMA_FIELDS, num_key_value_heads=16, head_dim=256, tie_word_embeddings=True),
    GEMMA_ACTIVATION,
)
# Gemma switches the shared layers cannot honour: fail instead of loading wrong math.
GEMMA_UNSUPPORTED = {
    "attention_bias": "biases on q/k/v/o, which no published Gemma uses and tunix_zoo "
    "does not implement; load a checkpoint without them.",
    "use_bidirectional_attention": "an embedding model, not a causal LM; tunix_zoo loads "
    "causal decoders only.",
}


@dataclasses.dataclass(frozen=True)
class GemmaConfig(DecoderConfig):
  """Gemma 1 (``GemmaForCausalLM``)."""

  model_type: ClassVar[str] = "gemma"
  architecture: ClassVar[str] = "GemmaForCausalLM"
  HF_FIELDS: ClassVar = GEMMA_FIELDS
  HF_UNSUPPORTED: ClassVar = GEMMA_UNSUPPORTED

  norm_offset: float = 1.0
  scale_embeddings: bool = True
  tie_word_embeddings: bool = True
  hidden_act: str = GELU_TANH


FAMILY = register_family(
    names=("gemma",),
    model_types=("gemma",),
    architectures=("GemmaForCausalLM",),
    config_class=GemmaConfig,
    model_class="tunix_zoo.layers.decoder:DecoderLM",
    param_table="tunix_zoo.models.gemma.params:GEMMA_PARAMS",
    orbax_layout="tunix_zoo.models.gemma.params:GEMMA_ORBAX",
)


register_presets(GemmaConfig, {
    # google/gemma-2b: 2.51B parameters.
    "gemma_2b": dict(vocab_size=256_000, hidden_size=2048, num_layers=18, num_heads=8,
                     num_kv_heads=1, head_dim=256, intermediate_size=16_384),
    # google/gemma-7b: 8.54B parameters.
    "gemma_7b": dict(vocab_size=256_000, hidden_size=3072, num_layers=28, num_heads=16,
                     num_kv_heads=16, head_dim=256, intermediate_size=24_576),
})
