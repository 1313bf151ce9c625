"""tunix_zoo: HF checkpoints straight into sharded Flax NNX models.

Example::

    import jax
    from tunix_zoo import AutoModel
    mesh = jax.make_mesh((1, len(jax.devices())), ("fsdp", "tp"))
    model, path = AutoModel.from_pretrained("Qwen/Qwen3-0.6B", mesh)
"""
