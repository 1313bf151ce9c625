"""transformers as a peer in the prefill and decode benchmarks: a randomly initialised
model of a tunix_zoo preset's shapes, bf16, sdpa attention, on the GPU."""

from __future__ import annotations


def random_model(config_id: str):
  """``(our config, the transformers model)`` for the preset ``config_id``."""
  import torch
  import transformers

  from tunix_zoo import registry

  config = registry.get_config(config_id)
  hf_config = transformers.AutoConfig.for_model(**config.to_hf_config())
  with torch.device("cuda"):  # Initialise on the GPU: CPU init of 8B takes minutes.
    model = transformers.AutoModelForCausalLM.from_config(
        hf_config, dtype=torch.bfloat16, attn_implementation="sdpa"
    ).eval()
  return config, model
