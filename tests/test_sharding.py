"""Sharding rules: partition specs, user rule tables, and models on awkward meshes.

Unit tests state ``partition_spec``'s contract on abstract meshes (no devices). Model
tests load tiny qwen3 checkpoints onto 8 CPU devices and check the parameters' specs and
that the jitted forward equals the one-device forward, for meshes where heads or KV heads
do not divide ``tp``, an fsdp-only ``(8, 1)`` and a tp-only ``(1, 8)`` mesh, and a user's
rule table.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AbstractMesh, AxisType, PartitionSpec as P

from tests import reference
from tunix_zoo import sharding
from tunix_zoo.automodel import AutoModel, load_folder
from tunix_zoo.errors import ShardingError
from tunix_zoo.models.qwen3.config import Qwen3Config

MAX_ABS = 1e-5
# 12 query heads divide tp=4; 3 KV heads do not.
QWEN3_3KV = (
    "Qwen3Config", "Qwen3ForCausalLM",
    dict(num_attention_heads=12, num_key_value_heads=3, tie_word_embeddings=False),
)


def abstract_mesh(fsdp: int, tp: int) -> AbstractMesh:
  return AbstractMesh((fsdp, tp), ("fsdp", "tp"), axis_types=(AxisType.Auto,) * 2)


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
  """Each test sees the once-only divisibility warnings afresh."""
  monkeypatch.setattr(sharding, "_warned", set())


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, reference_checkpoints):
  """name -> folder: the reference qwen3 case, and one with 3 KV heads."""
  folders = {"qwen3": reference_checkpoints["qwen3"][0],
             "qwen3_3kv": tmp_path_factory.mktemp("qwen3_3kv")}
  with pytest.MonkeyPatch.context() as patch:
    patch.setitem(reference.CASES, "qwen3_3kv", QWEN3_3KV)
    reference.make_checkpoint("qwen3_3kv", folders["qwen3_3kv"])
  return folders


@functools.cache
def one_device_logits(folder) -> np.ndarray:
  tokens, mask, _ = reference.left_padded_batch(seed=5, batch=2)
  model = load_folder(folder, jax.make_mesh((1, 1), ("fsdp", "tp"), devices=jax.devices()[:1]))
  return np.asarray(model(jnp.asarray(tokens), attention_mask=jnp.asarray(mask))[0])


def assert_forward_equals_one_device(model, folder) -> None:
  tokens, mask, _ = reference.left_padded_batch(seed=5, batch=2)
  got, _ = nnx.jit(lambda m, t, k: m(t, attention_mask=k))(
      model, jnp.asarray(tokens), jnp.asarray(mask)
  )
  expected = one_device_logits(folder)
  diff = np.abs(np.asarray(got) - expected)[mask.astype(bool)].max()
  assert diff <= MAX_ABS, f"max abs logit diff {diff}"


def params(model) -> dict[str, jax.Array]:
  return {
      ".".join(map(str, path)): var[...]
      for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))
  }


def specs(model) -> dict[str, P]:
  return {name: value.sharding.spec for name, value in params(model).items()}


def shard_shapes(model) -> dict[str, tuple[int, ...]]:
  return {name: value.sharding.shard_shape(value.shape) for name, value in params(model).items()}


# -- partition_spec -------------------------------------------------------------------------

def test_default_rules_shard_weights_on_both_axes():
  mesh = abstract_mesh(2, 4)
  spec = sharding.partition_spec(("heads", "embed"), (128, 64), mesh, counts={"heads": 8})
  assert spec == P("tp", "fsdp")
  assert sharding.partition_spec(("embed", "mlp"), (64, 96), mesh) == P("fsdp", "tp")
  assert sharding.partition_spec(("norm",), (64,), mesh) == P(None)
  assert sharding.partition_spec((None, None), (64, 96), mesh) == P(None, None)


def test_counts_decide_divisibility_of_flattened_heads(caplog):
  mesh = abstract_mesh(2, 4)
  # 6 heads of 16: the flattened dim 96 divides by 4, but the heads do not.
  with caplog.at_level(logging.WARNING, logger="tunix_zoo.sharding"):
    spec = sharding.partition_spec(
        ("heads", "embed"), (96, 64), mesh, counts={"heads": 6}, what="q_proj")
  assert spec == P(None, "fsdp")
  assert "heads of size 6 is not divisible" in caplog.text
  # 8 heads of 12: every tp device gets 2 whole heads.
  assert sharding.partition_spec(
      ("heads", "embed"), (96, 64), mesh, counts={"heads": 8}) == P("tp", "fsdp")
  # Without counts, the dimension itself decides.
  assert sharding.partition_spec(("heads", "embed"), (96, 64), mesh) == P("tp", "fsdp")


def test_a_mesh_axis_is_used_at_most_once():
  mesh = abstract_mesh(2, 4)
  rules = {**sharding.DEFAULT_RULES, "mlp": ("fsdp", "tp")}
  spec = sharding.partition_spec(("mlp", "embed"), (96, 64), mesh, rules)
  assert spec == P(("fsdp", "tp"), None)
  assert sharding.partition_spec(("embed", "mlp"), (64, 96), mesh, rules) == P("fsdp", "tp")
  # Two logical axes on one mesh axis: the first dimension takes it.
  assert sharding.partition_spec(("heads", "kv_heads"), (8, 8), mesh) == P("tp", None)


def test_axes_of_size_one_and_absent_axes_are_harmless():
  # Size-1 axes shard nothing, so specs leave them out.
  spec = sharding.partition_spec(("vocab", "embed"), (131, 64), abstract_mesh(1, 1))
  assert spec == P(None, None)
  spec = sharding.partition_spec(("heads", "embed"), (128, 64), abstract_mesh(8, 1))
  assert spec == P(None, "fsdp")
  fsdp_only = AbstractMesh((8,), ("fsdp",), axis_types=(AxisType.Auto,))
  # Default rules name tp; a mesh without it shards on what it has.
  assert sharding.partition_spec(("heads", "embed"), (128, 64), fsdp_only) == P(None, "fsdp")


def test_non_dividing_axis_warns_once_per_logical_axis(caplog):
  mesh = abstract_mesh(2, 4)
  with caplog.at_level(logging.WARNING, logger="tunix_zoo.sharding"):
    for layer in range(3):
      for proj in ("k_proj", "v_proj"):
        spec = sharding.partition_spec(
            ("kv_heads", "embed"), (48, 64), mesh, counts={"kv_heads": 3},
            what=f"layers.{layer}.attn.{proj}.weight")
        assert spec == P(None, "fsdp")
  warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
  assert len(warnings) == 1, [r.getMessage() for r in warnings]
  message = warnings[0].getMessage()
  assert "kv_heads" in message and "3" in message and "layers.0.attn.k_proj.weight" in message


def test_validate_rules_rejects_axes_the_mesh_lacks():
  mesh = abstract_mesh(2, 4)
  sharding.validate_rules({**sharding.DEFAULT_RULES, "mlp": ("fsdp", "tp")}, mesh)
  with pytest.raises(ShardingError, match="'expert'.*mesh axes"):
    sharding.validate_rules({**sharding.DEFAULT_RULES, "experts": "expert"}, mesh)
  with pytest.raises(ShardingError, match="'data'"):
    sharding.validate_rules({"batch": ("data", "fsdp")}, mesh)


# -- models ---------------------------------------------------------------------------------

def test_kv_heads_not_dividing_tp_are_replicated_with_one_warning(checkpoints, caplog):
  mesh = jax.make_mesh((2, 4), ("fsdp", "tp"))
  with caplog.at_level(logging.WARNING, logger="tunix_zoo.sharding"):
    model = load_folder(checkpoints["qwen3_3kv"], mesh)
  got = specs(model)
  for layer in range(model.config.num_layers):
    assert got[f"layers.{layer}.attn.q_proj.weight"] == P("tp", "fsdp")
    assert got[f"layers.{layer}.attn.o_proj.weight"] == P("fsdp", "tp")
    assert got[f"layers.{layer}.attn.k_proj.weight"] == P(None, "fsdp")
    assert got[f"layers.{layer}.attn.v_proj.weight"] == P(None, "fsdp")
  kv_warnings = [r for r in caplog.records if "kv_heads" in r.getMessage()]
  assert len(kv_warnings) == 1, [r.getMessage() for r in kv_warnings]
  assert_forward_equals_one_device(model, checkpoints["qwen3_3kv"])


def test_heads_not_dividing_tp_are_replicated():
  # 6 query heads, 3 KV heads on tp=4: the whole attention is replicated on tp.
  config = Qwen3Config(
      vocab_size=128, hidden_size=64, num_layers=1, num_heads=6, num_kv_heads=3, head_dim=16,
      intermediate_size=96)
  model = AutoModel.from_config(config, jax.make_mesh((2, 4), ("fsdp", "tp")))
  got = specs(model)
  assert got["layers.0.attn.q_proj.weight"] == P(None, "fsdp")
  assert got["layers.0.attn.o_proj.weight"] == P("fsdp", None)
  assert got["layers.0.mlp.up_proj.weight"] == P("tp", "fsdp")
  assert got["embed_tokens.weight"] == P("tp", "fsdp")


@pytest.mark.parametrize(
    "shape, expected",
    [
        ((8, 1), {"layers.0.attn.q_proj.weight": (128, 8),
                  "layers.0.attn.k_proj.weight": (32, 8),
                  "layers.0.mlp.down_proj.weight": (8, 96),
                  "embed_tokens.weight": (131, 8)}),
        ((1, 8), {"layers.0.attn.q_proj.weight": (16, 64),
                  "layers.0.attn.k_proj.weight": (32, 64),  # 2 KV heads: replicated
                  "layers.0.mlp.down_proj.weight": (64, 12),
                  "embed_tokens.weight": (131, 64)}),  # vocab 131: replicated
    ],
    ids=["fsdp_only", "tp_only"],
)
def test_single_axis_meshes(checkpoints, shape, expected):
  model = load_folder(checkpoints["qwen3"], jax.make_mesh(shape, ("fsdp", "tp")))
  got = shard_shapes(model)
  assert {name: got[name] for name in expected} == expected
  assert_forward_equals_one_device(model, checkpoints["qwen3"])


@pytest.mark.parametrize("axis_type", [AxisType.Explicit, AxisType.Auto], ids=["explicit", "auto"])
def test_user_rule_table(checkpoints, axis_type):
  rules = {**sharding.DEFAULT_RULES, "vocab": None, "mlp": ("fsdp", "tp")}
  mesh = jax.make_mesh((2, 4), ("fsdp", "tp"), axis_types=(axis_type,) * 2)
  model, _ = AutoModel.from_pretrained(str(checkpoints["qwen3"]), mesh, sharding_rules=rules)
  got = specs(model)
  assert got["embed_tokens.weight"] == P(None, "fsdp")
  assert got["lm_head.weight"] == P(None, "fsdp")
  # mlp takes both axes where it comes first; after embed took fsdp, only tp is left.
  assert got["layers.0.mlp.gate_proj.weight"] == P(("fsdp", "tp"), None)
  assert got["layers.0.mlp.up_proj.weight"] == P(("fsdp", "tp"), None)
  assert got["layers.0.mlp.down_proj.weight"] == P("fsdp", "tp")
  assert got["layers.0.attn.q_proj.weight"] == P("tp", "fsdp")
  assert_forward_equals_one_device(model, checkpoints["qwen3"])


def test_rules_naming_a_missing_mesh_axis_raise(checkpoints):
  mesh = jax.make_mesh((2, 4), ("fsdp", "tp"))
  rules = {**sharding.DEFAULT_RULES, "mlp": "model"}
  with pytest.raises(ShardingError, match="'model'"):
    load_folder(checkpoints["qwen3"], mesh, sharding_rules=rules)
  config = Qwen3Config(
      vocab_size=128, hidden_size=64, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=16,
      intermediate_size=96)
  with pytest.raises(ShardingError, match="'model'"):
    AutoModel.from_config(config, mesh, sharding_rules=rules)
