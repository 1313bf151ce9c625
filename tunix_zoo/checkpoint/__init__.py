"""Checkpoint files: safetensors reading and writing, sharded loading, export."""
