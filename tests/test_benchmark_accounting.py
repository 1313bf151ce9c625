"""The FLOPs and bytes the rollout and training benchmarks divide by: checked against a
built model's own parameters and against the formulas written out by hand."""

from __future__ import annotations

import pathlib
import sys

import jax
import pytest
from flax import nnx

from tunix_zoo import registry
from tunix_zoo.automodel import AutoModel
from tunix_zoo.lora import apply_lora

# Appended: the scripts import their siblings by name, which shadow nothing installed.
sys.path.append(str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import flops  # noqa: E402
import rollout  # noqa: E402
import train_step  # noqa: E402

WIDTHS = dict(hidden_size=64, intermediate_size=128, num_heads=2, num_kv_heads=1, head_dim=32,
              vocab_size=512)


def tiny(config_id: str, **fields):
  config = registry.get_config(config_id).replace(**WIDTHS, **fields)
  return config.replace(num_layers=3, layer_types=config.layer_types[:3])


@pytest.fixture(scope="module")
def qwen3():
  config = tiny("qwen3_0p6b", tie_word_embeddings=False)
  mesh = jax.make_mesh((1, 1), ("fsdp", "tp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  return config, AutoModel.from_config(config, mesh, dtype="float32", param_dtype="float32")


def test_matmul_parameters_are_the_weights_of_products(qwen3):
  config, model = qwen3
  params = nnx.state(model, nnx.Param)
  total = sum(x.size for x in jax.tree.leaves(params))
  # Everything but the input embedding's lookup (the untied LM head is a product).
  assert flops.matmul_parameters(config) == total - config.vocab_size * config.hidden_size
  tied = config.replace(tie_word_embeddings=True)
  assert flops.matmul_parameters(tied) == flops.matmul_parameters(config)  # the head reused


def test_training_flops_full_and_lora(qwen3):
  config, model = qwen3
  batch, length = 2, 16
  n = flops.matmul_parameters(config)
  width = config.num_heads * config.head_dim
  attention = 4 * width * config.num_layers * length * (length + 1) // 2  # causal, forward
  assert flops.attention_flops(config, length) == attention
  assert train_step.step_flops(config, batch, length) == batch * (6 * n * length + 3 * attention)
  apply_lora(model, rank=4, alpha=8.0)
  lora = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.LoRAParam)))
  per_layer = 4 * sum(i + o for i, o in [(64, 64), (64, 32), (64, 32), (64, 64), (64, 128),
                                         (64, 128), (128, 64)])
  assert lora == per_layer * config.num_layers
  assert train_step.step_flops(config, batch, length, lora) == batch * (
      (4 * n + 6 * lora) * length + 3 * attention)


def test_sliding_windows_cut_the_keys():
  config = tiny("gemma3_1b", sliding_window=4)
  windows = [config.layer_window(i) for i in range(config.num_layers)]
  assert windows == [4, 4, 4]  # Gemma 3's first global layer is the sixth.
  assert flops.keys_attended(config, 2) == [3, 3, 3]
  assert flops.keys_attended(config, 10) == [4, 4, 4]
  assert flops.attention_flops(config, 6) == 4 * 64 * 3 * (1 + 2 + 3 + 4 + 4 + 4)


def test_rollout_floor_counts_weights_and_the_kv_read_to_each_position(qwen3):
  config, _ = qwen3
  batch, prompt, steps = 4, 8, 5
  from decode import step_weight_bytes

  weights = step_weight_bytes(config, "float32")
  kv_per_key = 2 * config.num_kv_heads * config.head_dim * 4 * config.num_layers
  # Decoding step s feeds the token at position prompt + s - 1: prompt + s keys.
  expected = sum(weights + batch * kv_per_key * (prompt + s) for s in range(1, steps))
  floor = rollout.floor_seconds(config, batch, prompt, steps, bandwidth=1.0, dtype="float32")
  assert floor["decode_hbm"] == pytest.approx(expected)
  assert floor["decode"] >= floor["decode_hbm"]
  assert rollout.floor_seconds(config, batch, prompt, 1, 1.0, "float32")["decode"] == 0
