"""Gemma 3 (text decoder): Gemma 2's layout with QK-norm, a 5:1 local/global pattern
with separate rope bases, and no soft-capping — all config fields.

Multimodal checkpoints load their language model; the vision weights are skipped.

Example::

    model = Gemma3ForCausalLM(registry.get_config("gemma3_1b"), rngs=nnx.Rngs(0))
"""

from tunix_zoo.layers.decoder import DecoderLM
from tunix_zoo.models.gemma3.config import Gemma3Config
from tunix_zoo.models.gemma3.params import GEMMA3_PARAMS
from tunix_zoo.registry import register_family


@register_family(
    names=("gemma3",),
    model_types=("gemma3_text", "gemma3"),
    architectures=("Gemma3ForCausalLM", "Gemma3ForConditionalGeneration"),
    config_class=Gemma3Config,
    param_table=GEMMA3_PARAMS,
)
class Gemma3ForCausalLM(DecoderLM):
  """Gemma 3 text decoder (``Gemma3ForCausalLM``)."""
