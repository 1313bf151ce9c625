"""Model FLOPs and bytes the rollout and training benchmarks count (no recomputation)."""

from __future__ import annotations

PEAK_BF16_FLOPS = 989e12  # H100 / H200 SXM dense bf16


def matmul_parameters(config) -> int:
  """Parameters used in products: all but an untied input embedding (a lookup)."""
  from tunix_zoo.config import count_parameters

  embed = config.vocab_size * config.hidden_size
  return count_parameters(config) - (0 if config.tie_word_embeddings else embed)


def keys_attended(config, position: int) -> list[int]:
  """Per layer, the keys a query at ``position`` attends to (sliding windows cut it)."""
  return [min(position + 1, config.layer_window(i) or position + 1)
          for i in range(config.num_layers)]


def attention_flops(config, length: int) -> int:
  """Forward FLOPs of causal attention (QK^T and PV) over one sequence of ``length``."""
  width = config.num_heads * config.head_dim
  keys = 0
  for layer in range(config.num_layers):
    window = config.layer_window(layer) or length
    keys += sum(min(p + 1, window) for p in range(length))
  return 4 * width * keys
