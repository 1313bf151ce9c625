"""``tiny-demo``: a tiny checkpoint the project makes itself, offline, in seconds.

A byte-level BPE tokenizer and a two-layer Qwen3 are trained on a few paragraphs
embedded here, then written as an ordinary HF checkpoint folder (config.json,
model.safetensors, tokenizer.json, tokenizer_config.json), which everything else loads
exactly like a downloaded one. The model memorises the text, so greedy decoding of a
prompt from it continues it.

Example::

    folder = demo_checkpoint()
    model, _ = AutoModel.from_pretrained(str(folder))
"""

from __future__ import annotations

import json
import pathlib
import tempfile

DEMO_ID = "tiny-demo"
DEMO_PROMPT = "JAX is"
DEMO_TEXT = """\
JAX is a Python library for accelerator-oriented array computation and program \
transformation, designed for high-performance numerical computing and large-scale \
machine learning. Flax NNX is a neural network library for JAX that makes modules \
plain Python objects. tunix_zoo loads checkpoints from the Hugging Face Hub, Kaggle, \
Google Cloud Storage or a local folder, and maps their safetensors straight into \
Flax NNX models whose parameters are already sharded over a device mesh. A mesh has \
two axes: fsdp shards the parameters, tp splits the attention heads and the MLP. \
Every model family is checked against Hugging Face transformers, so the logits match \
and greedy decoding gives the same tokens. Post-training with supervised fine-tuning \
or reinforcement learning starts from a model that loads in one call.
"""
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
VOCAB_SIZE = 512
TRAIN_STEPS = 300
WINDOW = 48


def demo_folder() -> pathlib.Path:
  from tunix_zoo.sources import cache_root

  return cache_root() / DEMO_ID


def demo_checkpoint(folder: pathlib.Path | None = None) -> pathlib.Path:
  """The demo checkpoint folder, built on first use (then reused)."""
  folder = folder or demo_folder()
  if not (folder / "config.json").exists():
    build_demo_checkpoint(folder)
  return folder


def _train_tokenizer(folder: pathlib.Path):
  import tokenizers
  from tokenizers import decoders, models, pre_tokenizers, trainers

  tokenizer = tokenizers.Tokenizer(models.BPE())
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
  )
  tokenizer.train_from_iterator([DEMO_TEXT], trainer)
  tokenizer.save(str(folder / "tokenizer.json"))
  (folder / "tokenizer_config.json").write_text(json.dumps({
      "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
      "chat_template": CHAT_TEMPLATE,
  }, indent=1))
  return tokenizer


def build_demo_checkpoint(folder: pathlib.Path) -> pathlib.Path:
  """Trains the tiny tokenizer and model and writes them to ``folder`` (atomically)."""
  # jax is imported here, not at the top: the CLI reads DEMO_ID to resolve any model id,
  # and a mistyped id should fail in a second, not after importing jax.
  import jax
  import numpy as np
  import optax

  from tunix_zoo.automodel import AutoModel
  from tunix_zoo.checkpoint.export import save_pretrained
  from tunix_zoo.models.qwen3.config import Qwen3Config
  from tunix_zoo.training import train

  with tempfile.TemporaryDirectory() as tokenizer_dir:
    tokenizer = _train_tokenizer(pathlib.Path(tokenizer_dir))
    ids = np.array(tokenizer.encode(DEMO_TEXT).ids, np.int32)
    config = Qwen3Config(
        vocab_size=tokenizer.get_vocab_size(), hidden_size=96, num_layers=2, num_heads=4,
        num_kv_heads=2, head_dim=24, intermediate_size=256, tie_word_embeddings=True,
        max_position_embeddings=512,
    )
    model = AutoModel.from_config(config, rngs=0)
    rng = np.random.default_rng(0)

    def batches():
      while True:
        starts = rng.integers(0, len(ids) - WINDOW, size=8)
        yield jax.numpy.asarray(np.stack([ids[s:s + WINDOW] for s in starts]))

    train(model, batches(), optax.adamw(3e-3), steps=TRAIN_STEPS)
    save_pretrained(model, folder, source_dir=tokenizer_dir, overwrite=True)
  return folder


__all__ = ["DEMO_ID", "DEMO_PROMPT", "build_demo_checkpoint", "demo_checkpoint"]
