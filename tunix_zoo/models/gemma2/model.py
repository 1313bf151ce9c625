"""Gemma 2: Gemma plus sandwich norms, attention and final logit soft-capping,
alternating sliding-window and global layers, and ``query_pre_attn_scalar`` — all
config fields of the shared decoder.

Example::

    model = Gemma2ForCausalLM(registry.get_config("gemma2_2b"), rngs=nnx.Rngs(0))
"""

from tunix_zoo.layers.decoder import DecoderLM
from tunix_zoo.models.gemma2.config import Gemma2Config
from tunix_zoo.models.gemma2.params import GEMMA2_PARAMS
from tunix_zoo.registry import register_family


@register_family(
    names=("gemma2",),
    model_types=("gemma2",),
    architectures=("Gemma2ForCausalLM",),
    config_class=Gemma2Config,
    param_table=GEMMA2_PARAMS,
)
class Gemma2ForCausalLM(DecoderLM):
  """Gemma 2 decoder (``Gemma2ForCausalLM``)."""
