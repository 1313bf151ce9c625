"""Llama 3 / 3.1 / 3.2 config: the plain decoder every other family varies.

Llama 3.1 and 3.2 differ from Llama 3 only by the ``llama3`` rope scaling (factor 8
and 32) that stretches 8k-token training to 128k positions; 3.2 also ties the LM head.

Example::

    cfg = Llama3Config.from_hf_config(json.load(open("Llama-3.1-8B/config.json")))
    cfg.rope.kind, cfg.rope.factor  # ("llama3", 8.0)
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from tunix_zoo.config import LLAMA_FIELDS, DecoderConfig, RopeConfig, with_defaults
from tunix_zoo.registry import register_family, register_presets


@dataclasses.dataclass(frozen=True)
class Llama3Config(DecoderConfig):
  """Llama 3.x (``LlamaForCausalLM``)."""

  model_type: ClassVar[str] = "llama"
  architecture: ClassVar[str] = "LlamaForCausalLM"
  # transformers' LlamaConfig defaults for keys a config.json may leave out.
  HF_FIELDS: ClassVar = with_defaults(LLAMA_FIELDS, max_position_embeddings=2048)
  HF_UNSUPPORTED: ClassVar = {
      flag: "no published Llama 3 has projection biases and tunix_zoo does not implement "
      "them; load a checkpoint without them."
      for flag in ("attention_bias", "mlp_bias")
  }


FAMILY = register_family(
    names=("llama3", "llama3p1", "llama3p2"),
    model_types=("llama",),
    architectures=("LlamaForCausalLM",),
    config_class=Llama3Config,
    model_class="tunix_zoo.layers.decoder:DecoderLM",
    param_table="tunix_zoo.models.llama3.params:LLAMA3_PARAMS",
)


def _llama3(**fields: Any) -> Llama3Config:
  return Llama3Config(
      vocab_size=128_256,
      head_dim=fields["hidden_size"] // fields["num_heads"],
      norm_eps=1e-5,
      **fields,
  )


_LLAMA3_ROPE = RopeConfig(theta=500_000.0)


def _llama3p1_rope(factor: float) -> RopeConfig:
  return RopeConfig(
      theta=500_000.0,
      kind="llama3",
      factor=factor,
      low_freq_factor=1.0,
      high_freq_factor=4.0,
      original_max_position_embeddings=8192,
  )


PRESETS = {
    # meta-llama/Meta-Llama-3-8B: 8.03B parameters.
    "llama3_8b": dict(
        hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8,
        intermediate_size=14_336, rope=_LLAMA3_ROPE, max_position_embeddings=8192,
    ),
    # meta-llama/Meta-Llama-3-70B: 70.6B parameters.
    "llama3_70b": dict(
        hidden_size=8192, num_layers=80, num_heads=64, num_kv_heads=8,
        intermediate_size=28_672, rope=_LLAMA3_ROPE, max_position_embeddings=8192,
    ),
    # meta-llama/Llama-3.1-8B: 8.03B parameters.
    "llama3p1_8b": dict(
        hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8,
        intermediate_size=14_336, rope=_llama3p1_rope(8.0), max_position_embeddings=131_072,
    ),
    # meta-llama/Llama-3.1-70B: 70.6B parameters.
    "llama3p1_70b": dict(
        hidden_size=8192, num_layers=80, num_heads=64, num_kv_heads=8,
        intermediate_size=28_672, rope=_llama3p1_rope(8.0), max_position_embeddings=131_072,
    ),
    # meta-llama/Llama-3.1-405B: 405.9B parameters.
    "llama3p1_405b": dict(
        hidden_size=16_384, num_layers=126, num_heads=128, num_kv_heads=8,
        intermediate_size=53_248, rope=_llama3p1_rope(8.0), max_position_embeddings=131_072,
    ),
    # meta-llama/Llama-3.2-1B: 1.24B parameters (tied LM head).
    "llama3p2_1b": dict(
        hidden_size=2048, num_layers=16, num_heads=32, num_kv_heads=8, intermediate_size=8192,
        rope=_llama3p1_rope(32.0), max_position_embeddings=131_072, tie_word_embeddings=True,
    ),
    # meta-llama/Llama-3.2-3B: 3.21B parameters (tied LM head).
    "llama3p2_3b": dict(
        hidden_size=3072, num_layers=28, num_heads=24, num_kv_heads=8, intermediate_size=8192,
        rope=_llama3p1_rope(32.0), max_position_embeddings=131_072, tie_word_embeddings=True,
    ),
}
register_presets(_llama3, PRESETS)
