"""tunix_zoo: HF checkpoints straight into sharded Flax NNX models.

Example::

    import jax
    from tunix_zoo import AutoModel, Tokenizer, generate
    mesh = jax.make_mesh((1, len(jax.devices())), ("fsdp", "tp"))
    model, path = AutoModel.from_pretrained("Qwen/Qwen3-0.6B", mesh)
    out = generate(model, ["Hello"], 32, tokenizer=Tokenizer.from_pretrained(path))
"""

from tunix_zoo.automodel import AutoModel, ModelSource
from tunix_zoo.checkpoint.export import save_pretrained
from tunix_zoo.generate import generate
from tunix_zoo.naming import ModelNaming
from tunix_zoo.registry import register_config, register_family
from tunix_zoo.tokenizer import Tokenizer

__all__ = [
    "AutoModel", "ModelNaming", "ModelSource", "Tokenizer", "generate", "register_config",
    "register_family", "save_pretrained",
]
