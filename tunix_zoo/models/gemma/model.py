"""Gemma: the shared decoder with embeddings scaled by sqrt(hidden), ``(1 + w)`` norms,
GELU-tanh MLP and tied embeddings — all config fields.

Example::

    model = GemmaForCausalLM(registry.get_config("gemma_2b"), rngs=nnx.Rngs(0))
"""

from tunix_zoo.layers.decoder import DecoderLM
from tunix_zoo.models.gemma.config import GemmaConfig
from tunix_zoo.models.gemma.params import GEMMA_PARAMS
from tunix_zoo.registry import register_family


@register_family(
    names=("gemma",),
    model_types=("gemma",),
    architectures=("GemmaForCausalLM",),
    config_class=GemmaConfig,
    param_table=GEMMA_PARAMS,
)
class GemmaForCausalLM(DecoderLM):
  """Gemma (1) decoder (``GemmaForCausalLM``)."""
