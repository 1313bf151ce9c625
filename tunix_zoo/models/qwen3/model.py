"""Qwen3 (dense): the shared decoder with per-head RMSNorm on queries and keys.

Example::

    model = Qwen3ForCausalLM(registry.get_config("qwen3_0p6b"), rngs=nnx.Rngs(0))
"""

from tunix_zoo.layers.decoder import DecoderLM
from tunix_zoo.models.qwen3.config import Qwen3Config
from tunix_zoo.models.qwen3.params import QWEN3_PARAMS
from tunix_zoo.registry import register_family


@register_family(
    names=("qwen3",),
    model_types=("qwen3",),
    architectures=("Qwen3ForCausalLM",),
    config_class=Qwen3Config,
    param_table=QWEN3_PARAMS,
)
class Qwen3ForCausalLM(DecoderLM):
  """Qwen3 dense decoder (``Qwen3ForCausalLM``)."""
