"""``config_with_overrides`` and ``tunix-zoo construct``: tiny presets transformers loads.

One preset per family is shrunk with ``--set``, saved with ``--save-checkpoint``, and
loaded by ``AutoModelForCausalLM``; its float32 logits must match ours within MAX_ABS.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import transformers

from tests import reference
from tests.sources import servers
from tests.reference import MAX_ABS, one_device_mesh
from tunix_zoo import cli, registry
from tunix_zoo.automodel import load_folder
from tunix_zoo.config import FULL_ATTENTION, SLIDING_ATTENTION
from tunix_zoo.config_overrides import config_with_overrides, parse_overrides
from tunix_zoo.errors import ConfigError
from tunix_zoo.planning import count_parameters

TINY = ["vocab_size=131", "hidden_size=64", "num_heads=4", "num_kv_heads=2", "head_dim=16",
        "intermediate_size=96", "num_layers=2"]
# preset -> extra overrides: gemma3 keeps six layers so that its 5:1 pattern has a full
# layer; sliding windows shorter than the prompt so that they matter.
FAMILIES = {
    "gemma_2b": [],
    "gemma2_2b": ["sliding_window=4"],
    "gemma3_1b": ["num_layers=6", "sliding_window=4"],
    "llama3p2_1b": [],
    "qwen2p5_0p5b": [],
    "qwen3_0p6b": [],
    "qwen3_30b_a3b": ["num_experts=4", "num_experts_per_tok=2", "moe_intermediate_size=32"],
}


def sets(items: list[str]) -> list[str]:
  return [arg for item in items for arg in ("--set", item)]


@pytest.mark.slow
@pytest.mark.parametrize("preset", sorted(FAMILIES))
def test_saved_checkpoint_loads_in_transformers_with_our_logits(preset, tmp_path, capsys):
  out = tmp_path / "tiny"
  assert cli.main(["construct", preset, *sets(TINY + FAMILIES[preset]),
                   "--save-checkpoint", str(out)]) == 0
  printed = capsys.readouterr().out
  assert f"saved        {out}" in printed and "per device" in printed
  config = json.loads((out / "config.json").read_text())
  assert config["num_hidden_layers"] == (6 if preset == "gemma3_1b" else 2)
  assert config["hidden_size"] == 64

  hf_model, info = transformers.AutoModelForCausalLM.from_pretrained(
      out, output_loading_info=True)
  assert not any(info.values()), f"transformers reported {info}"
  tokens, mask, positions = reference.left_padded_batch()
  expected = reference.reference_logits(hf_model.eval(), tokens, mask, positions)
  ours = load_folder(out, one_device_mesh())
  logits, _ = ours(jnp.asarray(tokens), attention_mask=jnp.asarray(mask))
  valid = mask.astype(bool)
  assert np.abs(expected[valid]).std() > 1e-2  # not a degenerate all-zero model
  assert np.abs(np.asarray(logits) - expected)[valid].max() <= MAX_ABS


def test_overrides_are_typed_and_follow_num_layers():
  base = registry.get_config("gemma3_1b")
  tiny = config_with_overrides(base, parse_overrides(
      ["num_layers=8", "hidden_size=64", "rope.theta=1e5", "final_logit_softcap=null",
       "tie_word_embeddings=false", "hidden_act=gelu_pytorch_tanh"]))
  assert (tiny.num_layers, tiny.hidden_size, tiny.rope.theta) == (8, 64, 1e5)
  assert tiny.rope.kind == base.rope.kind and tiny.local_rope == base.local_rope
  assert tiny.final_logit_softcap is None and tiny.tie_word_embeddings is False
  assert tiny.hidden_act == "gelu_pytorch_tanh"
  # The preset's 5 sliding : 1 full pattern, continued over the new depth.
  assert tiny.layer_types == (SLIDING_ATTENTION,) * 5 + (FULL_ATTENTION,) + (
      SLIDING_ATTENTION,) * 2
  assert type(tiny) is type(base) and base.num_layers == 26  # the preset is untouched
  assert count_parameters(tiny) < count_parameters(base)

  moe = config_with_overrides(registry.get_config("qwen3_30b_a3b"),
                              {"num_layers": 2, "mlp_only_layers": "[1]"})
  assert moe.mlp_only_layers == (1,)
  assert config_with_overrides(base, {}) is base


@pytest.mark.parametrize("overrides, named", [
    ({"num_layer": "2"}, ["num_layer", "Did you mean num_layers"]),
    ({"rope.thetaa": "2"}, ["rope.thetaa", "rope.theta"]),
    ({"num_layers": "two"}, ["num_layers=two", "expected int"]),
    ({"num_layers": "2.5"}, ["num_layers", "expected int"]),
    ({"hidden_size": "null"}, ["hidden_size", "cannot be empty"]),
    ({"num_kv_heads": "3"}, ["num_heads=4", "num_kv_heads=3"]),
    ({"num_layers": "0"}, ["num_layers=0"]),
    ({"sliding_window": "null"}, ["sliding_window is null"]),
    ({"layer_types": '["full_attention", "x"]', "num_layers": "2"}, ["layer_types", "'x'"]),
    ({"layer_types": '["full_attention"]'}, ["layer_types has 1 entries for 26 layers"]),
    ({"rope.kind": "yarn"}, ["rope.kind='yarn'"]),
])
def test_overrides_that_break_the_architecture_are_named(overrides, named):
  with pytest.raises(ConfigError) as caught:
    config_with_overrides(registry.get_config("gemma3_1b"), overrides)
  for text in named:
    assert text in str(caught.value)


def test_moe_overrides_are_checked():
  with pytest.raises(ConfigError, match="num_experts_per_tok=8 must be between 1 and "
                     "num_experts=4"):
    config_with_overrides(registry.get_config("qwen3_30b_a3b"), {"num_experts": 4})
  with pytest.raises(ConfigError, match=r"mlp_only_layers \[5\]"):
    config_with_overrides(registry.get_config("qwen3_30b_a3b"),
                          {"num_layers": 2, "mlp_only_layers": [5]})
  with pytest.raises(ConfigError, match="not key=value"):
    parse_overrides(["num_layers"])


def test_construct_of_a_folder_copies_its_tokenizer(tmp_path, capsys):
  source = servers.make_checkpoint(tmp_path / "source")
  out = tmp_path / "out"
  assert cli.main(["construct", str(source), "--set", "num_layers=3", "--json",
                   "--save-checkpoint", str(out)]) == 0
  printed = json.loads(capsys.readouterr().out)
  assert printed["config"]["num_layers"] == 3 and printed["parameters"] > 0
  for name in ("tokenizer.json", "tokenizer_config.json"):
    assert (out / name).read_bytes() == (source / name).read_bytes()
  assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 3
  assert load_folder(out, one_device_mesh()).config.num_layers == 3


def test_info_takes_set(capsys):
  assert cli.main(["info", "qwen3_8b", "--set", "num_layers=2", "--json"]) == 0
  two = json.loads(capsys.readouterr().out)
  assert cli.main(["info", "qwen3_8b", "--json"]) == 0
  full = json.loads(capsys.readouterr().out)
  assert two["config"]["num_layers"] == 2 and two["parameters"] < full["parameters"]


@pytest.mark.slow
def test_cli_reports_bad_overrides_without_a_traceback():
  env = {**os.environ, "PYTHONPATH": os.getcwd()}
  for command in (["construct", "qwen3_0p6b", "--set", "num_layerz=2"],
                  ["test", "qwen3_0p6b", "--set", "num_heads=5"],
                  ["info", "qwen3_0p6b", "--set", "hidden_size=big"]):
    result = subprocess.run([sys.executable, "-m", "tunix_zoo.cli", *command], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("tunix-zoo: error: --set") or "num_heads=5" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_kick_test_takes_set(capsys):
  assert cli.main(["test", "qwen3_0p6b", *sets(TINY), "--mesh", "1x1", "--steps", "2",
                   "--seq-len", "8", "--batch-size", "1"]) == 0
  assert "loss fell" in capsys.readouterr().out
  assert cli.main(["test", "qwen3_0p6b", "--load", "--set", "num_layers=2"]) == 2
  assert "error: --set changes a config built from scratch" in capsys.readouterr().err
