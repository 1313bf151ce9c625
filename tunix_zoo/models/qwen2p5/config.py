"""Qwen2.5 config: the Llama decoder with biases on the q, k and v projections.

Qwen2's config.json always carries a ``sliding_window``, but the window applies only
when ``use_sliding_window`` is true (never, in the published checkpoints), and then
only to the layers from ``max_window_layers`` on.

Example::

    cfg = Qwen2p5Config.from_hf_config(json.load(open("Qwen2.5-7B/config.json")))
    cfg.attention_bias, cfg.sliding_window  # (True, None)
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from tunix_zoo.config import (
    LLAMA_FIELDS,
    DecoderConfig,
    QwenSlidingWindow,
    Rope,
    RopeConfig,
    TokenIds,
    with_defaults,
)
from tunix_zoo.registry import register_family, register_presets


@dataclasses.dataclass(frozen=True)
class Qwen2p5Config(DecoderConfig):
  """Qwen2 / Qwen2.5 (``Qwen2ForCausalLM``)."""

  model_type: ClassVar[str] = "qwen2"
  architecture: ClassVar[str] = "Qwen2ForCausalLM"
  # transformers' Qwen2Config defaults for keys a config.json may leave out.
  HF_FIELDS: ClassVar = with_defaults(
      LLAMA_FIELDS, num_key_value_heads=32, max_position_embeddings=32_768
  )
  HF_TRANSFORMS: ClassVar = (TokenIds(), Rope(), QwenSlidingWindow())

  # Qwen2 has no switch for it: q/k/v always carry a bias, o never does.
  attention_bias: bool = True


FAMILY = register_family(
    names=("qwen2p5",),
    model_types=("qwen2",),
    architectures=("Qwen2ForCausalLM",),
    config_class=Qwen2p5Config,
    model_class="tunix_zoo.layers.decoder:DecoderLM",
    param_table="tunix_zoo.models.qwen2p5.params:QWEN2P5_PARAMS",
)


def _qwen2p5(**fields: Any) -> Qwen2p5Config:
  return Qwen2p5Config(
      head_dim=fields["hidden_size"] // fields["num_heads"],
      rope=RopeConfig(theta=1_000_000.0),
      **fields,
  )


PRESETS = {
    # Qwen/Qwen2.5-0.5B: 0.49B parameters.
    "qwen2p5_0p5b": dict(
        vocab_size=151_936, hidden_size=896, num_layers=24, num_heads=14, num_kv_heads=2,
        intermediate_size=4864, max_position_embeddings=32_768, tie_word_embeddings=True,
    ),
    # Qwen/Qwen2.5-1.5B: 1.54B parameters.
    "qwen2p5_1p5b": dict(
        vocab_size=151_936, hidden_size=1536, num_layers=28, num_heads=12, num_kv_heads=2,
        intermediate_size=8960, max_position_embeddings=32_768, tie_word_embeddings=True,
    ),
    # Qwen/Qwen2.5-3B: 3.09B parameters.
    "qwen2p5_3b": dict(
        vocab_size=151_936, hidden_size=2048, num_layers=36, num_heads=16, num_kv_heads=2,
        intermediate_size=11_008, max_position_embeddings=32_768, tie_word_embeddings=True,
    ),
    # Qwen/Qwen2.5-7B: 7.62B parameters.
    "qwen2p5_7b": dict(
        vocab_size=152_064, hidden_size=3584, num_layers=28, num_heads=28, num_kv_heads=4,
        intermediate_size=18_944, max_position_embeddings=131_072,
    ),
    # Qwen/Qwen2.5-14B: 14.7B parameters.
    "qwen2p5_14b": dict(
        vocab_size=152_064, hidden_size=5120, num_layers=48, num_heads=40, num_kv_heads=8,
        intermediate_size=13_824, max_position_embeddings=131_072,
    ),
    # Qwen/Qwen2.5-32B: 32.8B parameters.
    "qwen2p5_32b": dict(
        vocab_size=152_064, hidden_size=5120, num_layers=64, num_heads=40, num_kv_heads=8,
        intermediate_size=27_648, max_position_embeddings=131_072,
    ),
    # Qwen/Qwen2.5-72B: 72.7B parameters.
    "qwen2p5_72b": dict(
        vocab_size=152_064, hidden_size=8192, num_layers=80, num_heads=64, num_kv_heads=8,
        intermediate_size=29_568, max_position_embeddings=131_072,
    ),
}
register_presets(_qwen2p5, PRESETS)
