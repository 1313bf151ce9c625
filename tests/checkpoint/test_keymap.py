"""The KeyMap on its own: rule placeholders (layer and stacked), lookups both ways,
extension, aliases, ignored keys, orbax views; and for every family the round trip
load <-> export: the checkpoint keys its table gives a model's parameters are exactly
transformers' keys, and each maps back to its parameter (and slice)."""

from __future__ import annotations

import json
import pathlib

import pytest
from flax import nnx

from tests import reference
from tunix_zoo import registry
from tunix_zoo.build import abstract_model, module_path
from tunix_zoo.checkpoint.keymap import KeyMap, OrbaxRule, OrbaxTable, Rule
from tunix_zoo.errors import CheckpointError
from tunix_zoo.models.gemma.params import GEMMA_ORBAX
from tunix_zoo.models.gemma3.params import GEMMA3_PARAMS

TABLE = KeyMap(
    [
        Rule("model.embed_tokens.weight", "embed_tokens.weight"),
        Rule("model.layers.{i}.self_attn.q_proj.weight", "layers.{i}.attn.q_proj.weight"),
        Rule("model.layers.{i}.mlp.experts.{e}.up_proj.weight", "layers.{i}.mlp.experts.up_proj"),
    ],
    ignored=[r"model\.rotary_emb\.inv_freq"],
)


def test_a_layer_placeholder_maps_both_ways():
  assert TABLE.checkpoint_key("layers.12.attn.q_proj.weight") == (
      "model.layers.12.self_attn.q_proj.weight")
  assert TABLE.module_path("model.layers.12.self_attn.q_proj.weight") == (
      "layers.12.attn.q_proj.weight")
  assert TABLE.stack_index("model.layers.12.self_attn.q_proj.weight") is None
  assert TABLE.stacked_keys("layers.12.attn.q_proj.weight", 4) is None
  # Placeholders stand for numbers only, and the whole key must match.
  assert TABLE.module_path("model.layers.x.self_attn.q_proj.weight") is None
  assert TABLE.module_path("model.layers.1.self_attn.q_proj.weight.extra") is None


def test_a_stacked_placeholder_indexes_the_leading_axis():
  rule = TABLE.rules[2]
  assert rule.stack == "e"
  assert TABLE.checkpoint_key("layers.3.mlp.experts.up_proj") == (
      "model.layers.3.mlp.experts.{e}.up_proj.weight")
  keys = TABLE.stacked_keys("layers.3.mlp.experts.up_proj", 3)
  assert keys == [f"model.layers.3.mlp.experts.{e}.up_proj.weight" for e in range(3)]
  assert [TABLE.module_path(k) for k in keys] == ["layers.3.mlp.experts.up_proj"] * 3
  assert [TABLE.stack_index(k) for k in keys] == [0, 1, 2]


@pytest.mark.parametrize(
    "checkpoint, module",
    [
        ("model.layers.{i}.mlp.experts.{e}.up_proj.weight", "layers.{j}.mlp.experts.up_proj"),
        ("model.layers.{i}.mlp.experts.{e}.{p}.weight", "layers.{i}.mlp.up_proj"),
    ],
    ids=["module_only_placeholder", "two_stacked_axes"],
)
def test_malformed_stacked_rule_is_refused(checkpoint, module):
  with pytest.raises(ValueError, match="stacked axis"):
    Rule(checkpoint, module)


def test_an_unmapped_parameter_is_a_checkpoint_error_naming_it():
  with pytest.raises(CheckpointError, match=r"'layers\.0\.attn\.k_proj\.weight'.*params\.py"):
    TABLE.checkpoint_key("layers.0.attn.k_proj.weight")
  assert TABLE.module_path("model.layers.0.self_attn.k_proj.weight") is None


def test_extend_replaces_the_rule_of_a_module_and_keeps_the_rest():
  extended = TABLE.extend(
      [Rule("model.layers.{i}.attn.wq", "layers.{i}.attn.q_proj.weight")],
      ignored=[r"vision\..*"], aliases=[("model.", "lm.model.")],
  )
  assert extended.checkpoint_key("layers.0.attn.q_proj.weight") == "model.layers.0.attn.wq"
  assert extended.checkpoint_key("embed_tokens.weight") == "model.embed_tokens.weight"
  assert TABLE.checkpoint_key("layers.0.attn.q_proj.weight") == (
      "model.layers.0.self_attn.q_proj.weight")  # The original is unchanged.
  assert extended.is_ignored("vision.tower.weight") and extended.is_ignored(
      "model.rotary_emb.inv_freq")
  assert not extended.is_ignored("model.rotary_emb.inv_freq.x")
  assert extended.spellings("model.norm.weight") == ["model.norm.weight", "lm.model.norm.weight"]


def test_gemma3_aliases_spell_the_multimodal_layouts_in_order():
  assert GEMMA3_PARAMS.spellings("model.layers.0.mlp.up_proj.weight") == [
      "model.layers.0.mlp.up_proj.weight",
      "language_model.model.layers.0.mlp.up_proj.weight",
      "model.language_model.layers.0.mlp.up_proj.weight",
  ]
  assert GEMMA3_PARAMS.spellings("lm_head.weight") == [
      "lm_head.weight", "language_model.lm_head.weight"]
  assert GEMMA3_PARAMS.is_ignored("model.vision_tower.encoder.weight")
  assert GEMMA3_PARAMS.is_ignored("multi_modal_projector.mm_input_projection_weight")


def test_orbax_rules_fill_the_leaf_and_view_it_in_hf_shape():
  """Gemma's leaves (N=4 heads, K=1 KV head, H=16, D=64, F=96) viewed as HF tensors."""
  n, k, h, d, f = 4, 1, 16, 64, 96
  leaves = {
      "attn/q_einsum/w": (n, d, h), "attn/kv_einsum/w": (2, k, d, h),
      "attn/attn_vec_einsum/w": (n, h, d), "mlp/gating_einsum/w": (2, d, f),
      "mlp/linear/w": (f, d),
  }
  expected = {
      "self_attn.q_proj.weight": (n * h, d), "self_attn.k_proj.weight": (k * h, d),
      "self_attn.v_proj.weight": (k * h, d), "self_attn.o_proj.weight": (d, n * h),
      "mlp.gate_proj.weight": (f, d), "mlp.up_proj.weight": (f, d),
      "mlp.down_proj.weight": (d, f),
  }
  for suffix, shape in expected.items():
    key = f"model.layers.2.{suffix}"
    views = []
    for rule in GEMMA_ORBAX.rules:
      leaf = rule.leaf_for(key)
      if leaf is None:
        continue
      assert leaf.startswith("transformer/layer_2/")
      leaf_shape = leaves.get(leaf.removeprefix("transformer/layer_2/"))
      if leaf_shape is not None:
        views.append(rule.view_shape(leaf_shape))
    # The first rule whose leaf exists and whose view has the model's shape wins.
    assert shape in views, (key, views)
  rule = OrbaxRule("a.{i}", "leaf_{i}", select=2, perm=(1, 0))
  assert rule.view_shape((2, 3, 4)) is None  # select beyond the leading axis
  assert OrbaxRule("a.{i}", "leaf_{i}", perm=(0, 2)).view_shape((3, 4)) is None
  with pytest.raises(ValueError, match="placeholders differ"):
    OrbaxRule("model.layers.{i}.x", "transformer/final_norm/scale")
  table = OrbaxTable([rule], ignored=[r"SigLiP.*"]).extend([OrbaxRule("a.{i}", "other_{i}")])
  assert [r.leaf for r in table.rules] == ["other_{i}"] and table.is_ignored("SigLiP_0/w")


def saved_keys(folder: pathlib.Path) -> set[str]:
  from safetensors import safe_open

  keys = set()
  for path in folder.glob("*.safetensors"):
    with safe_open(path, "np") as f:
      keys.update(f.keys())
  return keys


@pytest.fixture(scope="module")
def moe_checkpoint(tmp_path_factory):
  """A tiny Qwen3-MoE saved by transformers (one tensor per expert on disk, fused in
  memory) and its config.json."""
  import torch
  import transformers

  config = transformers.Qwen3MoeConfig(**{
      **reference.BASE, "num_attention_heads": 4, "num_key_value_heads": 2,
      "moe_intermediate_size": 24, "num_experts": 6, "num_experts_per_tok": 2,
      "mlp_only_layers": [1]})
  folder = tmp_path_factory.mktemp("qwen3_moe_keys")
  torch.manual_seed(0)
  transformers.Qwen3MoeForCausalLM(config).save_pretrained(folder)
  return folder


@pytest.mark.parametrize("case", sorted(reference.CASES) + ["qwen3_moe"])
def test_every_family_round_trips_load_and_export_keys(case, request):
  """Export writes ``checkpoint_key`` / ``stacked_keys`` of each parameter; loading maps
  each checkpoint key back. Both must cover the keys transformers saved exactly."""
  if case == "qwen3_moe":
    folder = request.getfixturevalue("moe_checkpoint")
  else:
    folder, _ = request.getfixturevalue("reference_checkpoints")[case]
  hf = json.loads((folder / "config.json").read_text())
  spec = registry.family_for_hf_config(hf)
  model = abstract_model(spec.config_class.from_hf_config(hf))
  table = spec.param_table
  exported = {}
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    name = module_path(path)
    stacked = table.stacked_keys(name, var.shape[0])
    if stacked is None:
      exported[table.checkpoint_key(name)] = (name, None)
    else:
      exported.update((key, (name, e)) for e, key in enumerate(stacked))
  assert set(exported) == saved_keys(folder)
  for key, (name, index) in exported.items():
    assert table.module_path(key) == name
    assert table.stack_index(key) == index
