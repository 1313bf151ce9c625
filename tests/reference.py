"""Shared test helpers: reference checkpoints made on the fly with HF transformers
(PyTorch), the meshes tests load them on, and the tolerance against transformers.

Every family gets tiny random configs saved with ``save_pretrained``; norm weights are
perturbed so a wrong norm formula cannot pass unnoticed.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Mapping
from typing import Any

import numpy as np

# Float32 logits against transformers: max absolute difference over real tokens.
MAX_ABS = 1e-4
VOCAB = 131
LLAMA3_ROPE = {
    "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}
SLIDING_WINDOW = 6

# name -> (transformers config class, model class, config kwargs)
CASES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "llama3": ("LlamaConfig", "LlamaForCausalLM", dict(
        num_attention_heads=4, num_key_value_heads=2, rope_scaling=LLAMA3_ROPE,
        tie_word_embeddings=False)),
    "llama3_tied_mha": ("LlamaConfig", "LlamaForCausalLM", dict(
        num_attention_heads=4, num_key_value_heads=4, rope_scaling=LLAMA3_ROPE,
        tie_word_embeddings=True)),
    "qwen2p5": ("Qwen2Config", "Qwen2ForCausalLM", dict(
        num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True)),
    # Three layers: tests/test_quantization.py needs the quantized layers to outweigh the
    # float embeddings (int4 bytes per device under half of float32's).
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(
        num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=False,
        rope_theta=1e6, num_hidden_layers=3)),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(
        num_attention_heads=4, num_key_value_heads=1)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(
        num_attention_heads=4, num_key_value_heads=2, sliding_window=SLIDING_WINDOW,
        query_pre_attn_scalar=24, attn_logit_softcapping=50.0, final_logit_softcapping=5.0)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        num_attention_heads=4, num_key_value_heads=2, sliding_window=SLIDING_WINDOW,
        query_pre_attn_scalar=24, num_hidden_layers=6,
        layer_types=["sliding_attention"] * 2 + ["full_attention"]
        + ["sliding_attention"] * 2 + ["full_attention"],
        rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
        })),
}

# Two layers: enough for every family's layer kinds (Gemma 2: one local, one global);
# Gemma 3 keeps six for two repeats of its local, local, global pattern, Qwen3 three.
# Compiling the unrolled layers dominates the parity tests' time.
BASE = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, head_dim=16,
    max_position_embeddings=512, pad_token_id=0, bos_token_id=1,
    # No EOS: generate() must run every requested step, as our loop does.
    eos_token_id=None,
)


def tiny_moe_config():
  """A two-layer Qwen3-MoE config of 4 experts (top 2), every layer sparse."""
  from tunix_zoo import registry

  return registry.get_config("qwen3_30b_a3b").replace(
      vocab_size=VOCAB, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
      num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, num_experts=4, num_experts_per_tok=2,
  )


def make_checkpoint(case: str, folder: pathlib.Path, *, seed: int = 0, layers: int | None = None,
                    **save_kwargs: Any):
  """Saves a random transformers model of ``case`` into ``folder``; returns the model.
  ``layers`` keeps the case's first ``layers`` layers (and their layer types)."""
  import torch
  import transformers

  config_cls, model_cls, kwargs = CASES[case]
  kwargs = {**BASE, **kwargs}
  if layers is not None:
    kwargs["num_hidden_layers"] = layers
    if "layer_types" in kwargs:
      kwargs["layer_types"] = kwargs["layer_types"][:layers]
  config = getattr(transformers, config_cls)(**kwargs)
  torch.manual_seed(seed)
  model = getattr(transformers, model_cls)(config).eval()
  with torch.no_grad():
    for name, param in model.named_parameters():
      if "norm" in name or "bias" in name:
        param.add_(torch.randn_like(param) * 0.2)
  model.save_pretrained(folder, safe_serialization=True, **save_kwargs)
  return model


class Checkpoints(Mapping):
  """case -> (folder, torch model), each made on first use in pytest's temporary folders.

  One instance serves the whole test session (the ``reference_checkpoints`` fixture):
  tests read these folders and must copy them before changing anything.
  """

  cases: Mapping[str, Any] = CASES
  make = staticmethod(make_checkpoint)

  def __init__(self, tmp_path_factory):
    self._tmp_path_factory = tmp_path_factory
    self._made: dict[str, tuple[pathlib.Path, Any]] = {}

  def __getitem__(self, case: str) -> tuple[pathlib.Path, Any]:
    if case not in self.cases:
      raise KeyError(case)
    if case not in self._made:
      folder = self._tmp_path_factory.mktemp(case)
      self._made[case] = folder, self.make(case, folder)
    return self._made[case]

  def __iter__(self):
    return iter(sorted(self.cases))

  def __len__(self) -> int:
    return len(self.cases)


def to_hub_spelling(folder: pathlib.Path) -> None:
  """Rewrites a transformers-5 config.json into the spelling published checkpoints use."""
  path = folder / "config.json"
  cfg = json.loads(path.read_text())
  rope = cfg.pop("rope_parameters", None) or {}
  if "full_attention" in rope:
    local = rope.get("sliding_attention", {})
    cfg["rope_local_base_freq"] = local.get("rope_theta", 10_000.0)
    rope = rope["full_attention"]
  rope = dict(rope)
  cfg["rope_theta"] = rope.pop("rope_theta", 10_000.0)
  cfg["rope_scaling"] = None if rope.get("rope_type", "default") == "default" else rope
  layer_types = cfg.pop("layer_types", None)
  if layer_types and cfg.get("model_type") == "gemma3_text":
    cfg["sliding_window_pattern"] = layer_types.index("full_attention") + 1
  cfg["torch_dtype"] = cfg.pop("dtype", None) or "float32"
  cfg.pop("_sliding_window_pattern", None)
  path.write_text(json.dumps(cfg, indent=2))


def left_padded_batch(seed: int = 0, batch: int = 3, length: int = 12):
  """Tokens, a left-padding mask (rows padded by 0, 4 and 7) and HF position ids."""
  rng = np.random.RandomState(seed)
  tokens = rng.randint(3, VOCAB, (batch, length))
  mask = np.ones((batch, length), np.int64)
  for row, pad in enumerate((0, 4, 7)[:batch]):
    mask[row, :pad] = 0
    tokens[row, :pad] = 0
  positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
  return tokens, mask, positions


def reference_logits(model, tokens, mask, positions) -> np.ndarray:
  import torch

  with torch.no_grad():
    return model(
        input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask),
        position_ids=torch.tensor(positions),
    ).logits.float().numpy()


def reference_greedy(model, tokens, mask, new_tokens: int, pad_token_id: int = 0,
                     **generate_kwargs) -> np.ndarray:
  """transformers' greedy ``[B, new_tokens]`` continuation; rows that stop early (e.g. at
  ``eos_token_id``) are padded with ``pad_token_id``, as tunix_zoo's generate pads them."""
  import torch

  with torch.no_grad():
    out = model.generate(
        input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask),
        max_new_tokens=new_tokens, do_sample=False, pad_token_id=pad_token_id,
        **generate_kwargs,
    )[:, tokens.shape[1]:].numpy()
  padded = np.full((out.shape[0], new_tokens), pad_token_id, out.dtype)
  padded[:, :out.shape[1]] = out
  return padded


def one_device_mesh():
  """A (1, 1) ``fsdp`` x ``tp`` mesh on the first device (Explicit axes, jax's default)."""
  import jax

  return jax.make_mesh((1, 1), ("fsdp", "tp"), devices=jax.devices()[:1])


def mesh_2x4(axis_type):
  """A (2, 4) ``fsdp`` x ``tp`` mesh of the 8 test devices with ``axis_type`` axes."""
  import jax

  return jax.make_mesh((2, 4), ("fsdp", "tp"), axis_types=(axis_type,) * 2)


def greedy(model, tokens, mask, new_tokens: int) -> np.ndarray:
  """tunix_zoo's greedy ``[B, new_tokens]`` continuation: a jitted prefill, then one
  on-device loop over the KV cache."""
  from tunix_zoo.generation import generate

  return generate(model, tokens, new_tokens, attention_mask=mask).tokens
