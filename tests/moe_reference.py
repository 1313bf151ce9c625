"""Qwen3-MoE reference checkpoints made on the fly with HF transformers, shared by the
MoE parity, scanned-layer and export tests.

Each case is a tiny random ``Qwen3MoeForCausalLM`` saved with ``save_pretrained`` (one
tensor per expert); norm weights are perturbed and routers sharpened as in
:mod:`tests.reference`.
"""

from __future__ import annotations

import pathlib
from typing import Any

from tests import reference

# name -> Qwen3MoeConfig kwargs beyond reference.BASE.
CASES: dict[str, dict[str, Any]] = {
    # Layer 1 dense among sparse ones (mlp_only_layers), probabilities not renormalised.
    "e6_k2_mlp_only": dict(
        num_hidden_layers=3, num_experts=6, num_experts_per_tok=2, mlp_only_layers=[1],
        norm_topk_prob=False,
    ),
    # Every second layer sparse (decoder_sparse_step=2), renormalised top-3 of 16.
    "e16_k3_step2_norm": dict(
        num_hidden_layers=4, num_experts=16, num_experts_per_tok=3, decoder_sparse_step=2,
        norm_topk_prob=True,
    ),
    # An expert count the mesh's fsdp axis (2) does not divide; tied embeddings.
    "e5_k4_tied": dict(
        num_hidden_layers=2, num_experts=5, num_experts_per_tok=4, norm_topk_prob=True,
        tie_word_embeddings=True,
    ),
}


def make_checkpoint(case: str, folder: pathlib.Path, **save_kwargs: Any):
  """Saves a random Qwen3-MoE of ``case`` into ``folder``; returns the torch model."""
  import torch
  import transformers

  config = transformers.Qwen3MoeConfig(**{
      **reference.BASE, "num_attention_heads": 4, "num_key_value_heads": 2,
      "moe_intermediate_size": 24, "rope_theta": 1e6, "tie_word_embeddings": False,
      "router_aux_loss_coef": 0.01, **CASES[case],
  })
  torch.manual_seed(0)
  model = transformers.Qwen3MoeForCausalLM(config).eval()
  with torch.no_grad():
    for name, param in model.named_parameters():
      if "norm" in name:
        param.add_(torch.randn_like(param) * 0.2)
      elif name.endswith("mlp.gate.weight"):
        # Decisive routing: near-uniform router probabilities would make the top-k
        # choice hinge on rounding.
        param.mul_(5.0)
  model.save_pretrained(folder, safe_serialization=True, **save_kwargs)
  return model


class Checkpoints(reference.Checkpoints):
  """case -> (folder, torch model) of :data:`CASES`, each made on first use (the
  ``moe_checkpoints`` session fixture). Read-only: copy a folder before changing it."""

  cases = CASES
  make = staticmethod(make_checkpoint)
