"""Qwen3, dense and mixture-of-experts: the shared decoder with per-head RMSNorm on q and k.

One class serves ``Qwen3ForCausalLM`` and ``Qwen3MoeForCausalLM``: in a Qwen3-MoE model
the layers ``config.is_sparse_layer`` names replace the MLP by a router over
``num_experts`` gated MLPs (:class:`tunix_zoo.layers.moe.MoE`); the others keep a dense
MLP of ``intermediate_size``.

Example::

    model = Qwen3ForCausalLM(registry.get_config("qwen3_0p6b"), rngs=nnx.Rngs(0))
    logits, cache = model(tokens)
    # Mixture of experts: the router logits, for the auxiliary load-balancing loss.
    logits, _, router_logits = moe_model.forward_with_router_logits(tokens, attention_mask=mask)
    aux = load_balancing_loss(router_logits, cfg.num_experts, cfg.num_experts_per_tok, mask)
"""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx
from jax.sharding import PartitionSpec

from tunix_zoo import sharding
from tunix_zoo.layers.decoder import Cache, DecoderLayer, DecoderLM
from tunix_zoo.layers.moe import MoE
from tunix_zoo.models.qwen3.config import Qwen3Config


class Qwen3DecoderLayer(DecoderLayer):
  """A Qwen3 layer: mixture of experts where the config says so, else a dense MLP."""

  def make_mlp(self, config: Qwen3Config, layer: int, **kw: Any) -> nnx.Module:
    if not config.is_sparse_layer(layer):
      return super().make_mlp(config, layer, **kw)
    return MoE(
        config.hidden_size, config.moe_intermediate_size, num_experts=config.num_experts,
        top_k=config.num_experts_per_tok, act=config.hidden_act,
        norm_topk_prob=config.norm_topk_prob, **kw,
        # The attention block, built first, holds the layer's rules: the experts' kernel
        # splits itself over the mesh by them.
        sharding_rules=self.attn.sharding_rules,
    )


class Qwen3ForCausalLM(DecoderLM):
  """Qwen3 dense (``Qwen3ForCausalLM``) and Qwen3-MoE (``Qwen3MoeForCausalLM``)."""

  layer_class = Qwen3DecoderLayer

  def forward_with_router_logits(
      self,
      input_tokens: jax.Array,
      positions: jax.Array | None = None,
      cache: Cache | None = None,
      attention_mask: jax.Array | None = None,
  ) -> tuple[jax.Array, Cache | None, tuple[jax.Array, ...]]:
    """``__call__``'s logits and cache, and each sparse layer's router logits.

    The router logits are ``[B, T, num_experts]`` in the compute dtype, one per sparse
    layer in layer order (what transformers returns with ``output_router_logits``);
    :func:`tunix_zoo.layers.moe.load_balancing_loss` turns them into the auxiliary loss.
    A dense model returns none.
    """

    def forward(model: Qwen3ForCausalLM, *args: Any):
      hidden, new_cache, router_logits = model.hidden_states_and_router_logits(*args)
      return model.logits(hidden), new_cache, router_logits

    args = (input_tokens, positions, cache, attention_mask)
    if not sharding.has_explicit_axes(self.mesh):
      return forward(self, *args)
    c = self.config
    sparse_layers = sum(c.is_sparse_layer(i) for i in range(c.num_layers))
    logits_spec, cache_specs = self._output_specs(input_tokens, cache)
    router_spec = PartitionSpec(logits_spec[0], None, None)
    return self.call_with_auto_axes(
        forward, (logits_spec, cache_specs, (router_spec,) * sparse_layers), *args
    )
