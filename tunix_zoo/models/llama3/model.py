"""Llama 3, 3.1 and 3.2: the shared decoder as it is.

What makes them Llama 3 lives in the config (llama3 rope scaling, GQA ratios, tied
embeddings on 3.2 1B/3B).

Example::

    model = Llama3ForCausalLM(registry.get_config("llama3p2_1b"), rngs=nnx.Rngs(0))
"""

from tunix_zoo.layers.decoder import DecoderLM
from tunix_zoo.models.llama3.config import Llama3Config
from tunix_zoo.models.llama3.params import LLAMA3_PARAMS
from tunix_zoo.registry import register_family


@register_family(
    names=("llama3", "llama3p1", "llama3p2"),
    model_types=("llama",),
    architectures=("LlamaForCausalLM",),
    config_class=Llama3Config,
    param_table=LLAMA3_PARAMS,
)
class Llama3ForCausalLM(DecoderLM):
  """Llama 3.x decoder (``LlamaForCausalLM``)."""
