"""Load a checkpoint sharded over every local device and check it against one device.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python examples/load_on_mesh.py
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np

from tunix_zoo import AutoModel
from tunix_zoo.demo import demo_checkpoint

model_id = sys.argv[1] if len(sys.argv) > 1 else str(demo_checkpoint())
devices = len(jax.devices())
tp = 2 if devices % 2 == 0 else 1
mesh = jax.make_mesh((devices // tp, tp), ("fsdp", "tp"))  # fsdp x tp over all devices

model, _ = AutoModel.from_pretrained(model_id, mesh)
print("q_proj sharding:", model.layers[0].attn.q_proj.weight[...].sharding.spec)

tokens = jnp.array([[1, 2, 3, 4, 5, 6, 7, 8]] * (devices // tp))
sharded_logits, _ = model(tokens)
single, _ = AutoModel.from_pretrained(model_id)
single_logits, _ = single(tokens)
print("max |sharded - single|:", float(np.abs(np.asarray(sharded_logits) - single_logits).max()))
