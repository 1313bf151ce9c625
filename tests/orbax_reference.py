"""Kaggle Flax (orbax) Gemma checkpoints made from the tiny transformers references.

Each case saves a transformers model (tests/reference.py) and writes the same weights as
google-deepmind/gemma lays them out (the inverse of the transforms in
``tunix_zoo/models/gemma*/params.py``), with ``orbax.checkpoint`` as gemma saves them,
into ``<root>/<variation>/`` beside ``<root>/tokenizer.model``, as Kaggle ships them.
Each case's config is registered as the preset ``<case>_orbaxtest``, since orbax
checkpoints carry no config.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import pathlib
from typing import Any

import numpy as np

from tests import reference

VARIATION = "tiny-it"

SENTENCEPIECE_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Gemma models are trained on text, code and mathematics.",
    "def add(a, b):\n    return a + b",
    "Numbers like 12345 and 3.14159 appear too.",
    "  leading spaces and trailing   ",
] * 40


@dataclasses.dataclass(frozen=True)
class OrbaxCase:
  """One orbax layout to write: which reference, and which of gemma's variants."""

  family: str  # a reference.CASES name
  gating_d_by_f: bool  # [2, D, F] (Gemma 1, Gemma 2 2B) or [2, F, D] (Gemma 2 9B+, Gemma 3)
  extra_rows: int = 0  # > 0: unused rows appended; < 0: rows missing (read as zeros)
  nested: bool = False  # {'transformer': {'layer_0': ...}} instead of the flat tree
  overrides: tuple[tuple[str, Any], ...] = ()  # transformers config fields
  vision: bool = False  # add an embedder mm_* leaf, as Gemma 3 4B+ have


CASES = {
    "gemma": OrbaxCase("gemma", gating_d_by_f=True, extra_rows=5),
    # Gemma 7B: as many KV heads as query heads, so one qkv_einsum leaf.
    "gemma_mha": OrbaxCase("gemma", gating_d_by_f=True, nested=True,
                           overrides=(("num_key_value_heads", 4),)),
    "gemma2": OrbaxCase("gemma2", gating_d_by_f=True, extra_rows=5),
    "gemma3": OrbaxCase("gemma3", gating_d_by_f=False, extra_rows=-3, vision=True),
}


def preset_id(case: str) -> str:
  return f"{case}_orbaxtest"


def make_reference(case: str, folder: pathlib.Path):
  """Saves the transformers model of ``case`` as safetensors; returns the torch model."""
  import torch
  import transformers

  spec = CASES[case]
  config_cls, model_cls, kwargs = reference.CASES[spec.family]
  config = getattr(transformers, config_cls)(**{**reference.BASE, **kwargs,
                                                **dict(spec.overrides)})
  torch.manual_seed(0)
  model = getattr(transformers, model_cls)(config).eval()
  with torch.no_grad():
    for name, param in model.named_parameters():
      if "norm" in name:
        param.add_(torch.randn_like(param) * 0.2)
    if spec.extra_rows < 0:
      # Rows the orbax checkpoint lacks are zeros once loaded; HF holds them as zeros too
      # (as Gemma 3's image soft-token rows that text never produces).
      model.get_input_embeddings().weight[spec.extra_rows:] = 0
  model.save_pretrained(folder, safe_serialization=True)
  return model


def gemma_tree(case: str, state: dict[str, np.ndarray], hf_config: dict[str, Any]):
  """The orbax tree gemma saves for these HF weights (flat, or nested)."""
  spec = CASES[case]
  n, k = hf_config["num_attention_heads"], hf_config["num_key_value_heads"]
  h, d = hf_config["head_dim"], hf_config["hidden_size"]
  rng = np.random.RandomState(1)
  embed = state["model.embed_tokens.weight"]
  if spec.extra_rows > 0:
    embed = np.concatenate([embed, rng.randn(spec.extra_rows, d).astype(embed.dtype)])
  elif spec.extra_rows < 0:
    embed = embed[:spec.extra_rows]
  tree: dict[str, dict[str, np.ndarray]] = {
      "transformer/embedder": {"input_embedding": embed},
      "transformer/final_norm": {"scale": state["model.norm.weight"]},
  }
  if spec.vision:
    tree["transformer/embedder/mm_input_projection"] = {"w": rng.randn(8, d).astype(np.float32)}
  sandwich = spec.family != "gemma"
  for i in range(hf_config["num_hidden_layers"]):
    hf, ox = f"model.layers.{i}.", f"transformer/layer_{i}/"

    def heads_in(key, heads):  # [heads*H, D] -> [heads, D, H]
      return state[hf + key].reshape(heads, h, d).transpose(0, 2, 1)

    q = heads_in("self_attn.q_proj.weight", n)
    kv = [heads_in(f"self_attn.{p}_proj.weight", k) for p in "kv"]
    if n == k:
      tree[ox + "attn/qkv_einsum"] = {"w": np.stack([q, *kv])}
    else:
      tree[ox + "attn/q_einsum"] = {"w": q}
      tree[ox + "attn/kv_einsum"] = {"w": np.stack(kv)}
    tree[ox + "attn/attn_vec_einsum"] = {
        "w": state[hf + "self_attn.o_proj.weight"].reshape(d, n, h).transpose(1, 2, 0)}
    if spec.family == "gemma3":
      tree[ox + "attn/_query_norm"] = {"scale": state[hf + "self_attn.q_norm.weight"]}
      tree[ox + "attn/_key_norm"] = {"scale": state[hf + "self_attn.k_norm.weight"]}
    gate, up = state[hf + "mlp.gate_proj.weight"], state[hf + "mlp.up_proj.weight"]
    tree[ox + "mlp/gating_einsum"] = {
        "w": np.stack([gate.T, up.T]) if spec.gating_d_by_f else np.stack([gate, up])}
    tree[ox + "mlp/linear"] = {"w": state[hf + "mlp.down_proj.weight"].T}
    tree[ox + "pre_attention_norm"] = {"scale": state[hf + "input_layernorm.weight"]}
    if sandwich:
      tree[ox + "post_attention_norm"] = {"scale": state[hf + "post_attention_layernorm.weight"]}
      tree[ox + "pre_ffw_norm"] = {"scale": state[hf + "pre_feedforward_layernorm.weight"]}
      tree[ox + "post_ffw_norm"] = {"scale": state[hf + "post_feedforward_layernorm.weight"]}
    else:
      tree[ox + "pre_ffw_norm"] = {"scale": state[hf + "post_attention_layernorm.weight"]}
  tree = {key: {leaf: np.ascontiguousarray(v) for leaf, v in leaves.items()}
          for key, leaves in tree.items()}
  return nest(tree) if spec.nested else tree


def nest(flat: dict[str, dict[str, Any]]) -> dict[str, Any]:
  """``{'a/b': {'w': x}}`` -> ``{'a': {'b': {'w': x}}}``."""
  out: dict[str, Any] = {}
  for key, leaves in flat.items():
    node = out
    for part in key.split("/"):
      node = node.setdefault(part, {})
    node.update(leaves)
  return out


def save_orbax(tree: dict[str, Any], folder: pathlib.Path) -> None:
  """Writes ``tree`` as gemma's ``save_params`` does (orbax, OCDBT)."""
  import orbax.checkpoint as ocp

  checkpointer = ocp.PyTreeCheckpointer()
  checkpointer.save(folder.absolute(), tree)


def register_preset(case: str, hf_folder: pathlib.Path) -> str:
  """Registers the reference's config as preset ``<case>_orbaxtest``; returns the id."""
  from tunix_zoo import registry

  hf_config = json.loads((hf_folder / "config.json").read_text())
  spec = registry.family_for_hf_config(hf_config)
  registry.register_config(preset_id(case), family=spec.category)(
      lambda: spec.config_class.from_hf_config(hf_config))
  return preset_id(case)


def make_case(case: str, root: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path, Any]:
  """``(hf_folder, orbax_root, torch model)``: the download root holds ``tiny-it/``."""
  from safetensors.numpy import load_file

  hf_folder, orbax_root = root / "hf", root / "orbax"
  model = make_reference(case, hf_folder)
  hf_config = json.loads((hf_folder / "config.json").read_text())
  state = load_file(hf_folder / "model.safetensors")
  save_orbax(gemma_tree(case, state, hf_config), orbax_root / VARIATION)
  train_sentencepiece(orbax_root / "tokenizer.model")
  register_preset(case, hf_folder)
  return hf_folder, orbax_root, model


def train_sentencepiece(path: pathlib.Path) -> None:
  """A small BPE SentencePiece model with Gemma's special pieces and byte fallback."""
  import sentencepiece

  model = io.BytesIO()
  sentencepiece.SentencePieceTrainer.train(
      sentence_iterator=iter(SENTENCEPIECE_CORPUS), model_writer=model, model_type="bpe",
      vocab_size=400, pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>",
      eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>", byte_fallback=True,
      user_defined_symbols=["<start_of_turn>", "<end_of_turn>"], add_dummy_prefix=False,
      remove_extra_whitespaces=False, normalization_rule_name="identity", split_digits=True,
      minloglevel=2)
  path.write_bytes(model.getvalue())


@functools.cache
def _jitted_logits():
  from flax import nnx

  return nnx.jit(lambda model, tokens, mask: model(tokens, attention_mask=mask)[0])


def assert_logits_match(model, torch_model, case: str) -> None:
  """The model's float32 logits on a left-padded batch equal transformers' within
  ``reference.MAX_ABS`` over real tokens."""
  import jax.numpy as jnp

  tokens, mask, positions = reference.left_padded_batch()
  expected = reference.reference_logits(torch_model, tokens, mask, positions)
  # Jitted: one program per model and mesh; eager op-by-op dispatch compiles far more.
  logits = _jitted_logits()(model, jnp.asarray(tokens), jnp.asarray(mask))
  diff = np.abs(np.asarray(logits) - expected)[mask.astype(bool)].max()
  assert diff <= reference.MAX_ABS, f"{case}: max abs logit diff {diff}"


def assert_greedy_matches(model, torch_model, new_tokens: int = 16) -> None:
  """Greedy decoding with the KV cache is token-identical to transformers' generate."""
  from tunix_zoo.generation import generate

  tokens, mask, _ = reference.left_padded_batch(seed=1)
  expected = reference.reference_greedy(torch_model, tokens, mask, new_tokens)
  got = generate(model, tokens, new_tokens, attention_mask=mask).tokens
  np.testing.assert_array_equal(got, expected)
