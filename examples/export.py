"""Load, (fine-tune,) and export an HF checkpoint that transformers / vLLM load.

    python examples/export.py /tmp/exported
"""

import sys

import jax.numpy as jnp

from tunix_zoo import AutoModel, save_pretrained
from tunix_zoo.demo import demo_checkpoint

out_dir = sys.argv[1] if len(sys.argv) > 1 else "/tmp/tunix_zoo_export"
model, path = AutoModel.from_pretrained(str(demo_checkpoint()))
# ... train the model here ...
written = save_pretrained(model, out_dir, dtype=jnp.bfloat16, source_dir=path, overwrite=True)
print("wrote", sorted(p.name for p in written.iterdir()))
