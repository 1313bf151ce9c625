"""transformers as a peer in the prefill, decode and training benchmarks: a randomly
initialised model of a tunix_zoo preset's shapes, bf16, sdpa attention, on the GPU."""

from __future__ import annotations


def random_model(config_id: str, config=None, device: str = "cuda", dtype=None):
  """``(our config, the transformers model)`` for the preset ``config_id``, or for
  ``config`` (a preset with fields overridden) when given; in eval mode."""
  import torch
  import transformers

  from tunix_zoo import registry

  config = config or registry.get_config(config_id)
  hf_config = transformers.AutoConfig.for_model(**config.to_hf_config())
  with torch.device(device):  # Initialise on the GPU: CPU init of 8B takes minutes.
    model = transformers.AutoModelForCausalLM.from_config(
        hf_config, dtype=dtype or torch.bfloat16, attn_implementation="sdpa"
    ).eval()
  return config, model
