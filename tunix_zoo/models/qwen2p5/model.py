"""Qwen2.5: the shared decoder with biases on the q/k/v projections (a config field).

Example::

    model = Qwen2p5ForCausalLM(registry.get_config("qwen2p5_0p5b"), rngs=nnx.Rngs(0))
"""

from tunix_zoo.layers.decoder import DecoderLM
from tunix_zoo.models.qwen2p5.config import Qwen2p5Config
from tunix_zoo.models.qwen2p5.params import QWEN2P5_PARAMS
from tunix_zoo.registry import register_family


@register_family(
    names=("qwen2p5",),
    model_types=("qwen2",),
    architectures=("Qwen2ForCausalLM",),
    config_class=Qwen2p5Config,
    param_table=QWEN2P5_PARAMS,
)
class Qwen2p5ForCausalLM(DecoderLM):
  """Qwen2.5 decoder (``Qwen2ForCausalLM``)."""
