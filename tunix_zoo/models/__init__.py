"""Built-in families; importing this package registers them."""

from tunix_zoo.models import gemma, gemma2, gemma3, llama3, qwen2p5, qwen3  # noqa: F401
