"""config.json validation: every bad value is a ConfigError naming key, value and fix.

One validation layer (the family tables of ``tunix_zoo/config.py``) runs before anything
is built. Each case of issue 17 has its test; a hypothesis fuzz mutates real config.json
files of every family and finds no exception that is not a ZooError.
"""

from __future__ import annotations

import copy
import json
import math
import os
import pathlib
import subprocess
import sys
import time
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tunix_zoo import registry
from tunix_zoo.config import count_parameters
from tunix_zoo.errors import ConfigError, ConfigMismatchError, UnknownModelError, ZooError
from tunix_zoo.naming import ModelNaming

# Published config.json files, verbatim but for bookkeeping keys, and the preset each is.
QWEN3_0P6B = {
    "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 151643, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu",
    "hidden_size": 1024, "initializer_range": 0.02, "intermediate_size": 3072,
    "max_position_embeddings": 40960, "max_window_layers": 28, "model_type": "qwen3",
    "num_attention_heads": 16, "num_hidden_layers": 28, "num_key_value_heads": 8,
    "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000, "sliding_window": None,
    "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_cache": True,
    "use_sliding_window": False, "vocab_size": 151936,
}
QWEN3_30B_A3B = {
    "architectures": ["Qwen3MoeForCausalLM"], "attention_bias": False,
    "decoder_sparse_step": 1, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu",
    "hidden_size": 2048, "intermediate_size": 6144, "max_position_embeddings": 40960,
    "max_window_layers": 48, "mlp_only_layers": [], "model_type": "qwen3_moe",
    "moe_intermediate_size": 768, "norm_topk_prob": True, "num_attention_heads": 32,
    "num_experts": 128, "num_experts_per_tok": 8, "num_hidden_layers": 48,
    "num_key_value_heads": 4, "rms_norm_eps": 1e-06, "rope_scaling": None,
    "rope_theta": 1000000.0, "router_aux_loss_coef": 0.001, "sliding_window": None,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_sliding_window": False,
    "vocab_size": 151936,
}
QWEN2P5_7B = {
    "architectures": ["Qwen2ForCausalLM"], "hidden_act": "silu", "hidden_size": 3584,
    "intermediate_size": 18944, "max_position_embeddings": 131072, "max_window_layers": 28,
    "model_type": "qwen2", "num_attention_heads": 28, "num_hidden_layers": 28,
    "num_key_value_heads": 4, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
    "sliding_window": 131072, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "use_sliding_window": False, "vocab_size": 152064,
}
LLAMA3P1_8B = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "bos_token_id": 128000,
    "eos_token_id": 128001, "hidden_act": "silu", "hidden_size": 4096,
    "intermediate_size": 14336, "max_position_embeddings": 131072, "mlp_bias": False,
    "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32,
    "num_key_value_heads": 8, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "vocab_size": 128256,
}
GEMMA_2B = {
    "architectures": ["GemmaForCausalLM"], "attention_bias": False, "bos_token_id": 2,
    "eos_token_id": 1, "head_dim": 256, "hidden_act": "gelu", "hidden_size": 2048,
    "intermediate_size": 16384, "max_position_embeddings": 8192, "model_type": "gemma",
    "num_attention_heads": 8, "num_hidden_layers": 18, "num_key_value_heads": 1,
    "pad_token_id": 0, "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 10000.0,
    "torch_dtype": "bfloat16", "vocab_size": 256000,
}
GEMMA2_2B = {
    "architectures": ["Gemma2ForCausalLM"], "attention_bias": False,
    "attn_logit_softcapping": 50.0, "bos_token_id": 2, "cache_implementation": "hybrid",
    "eos_token_id": 1, "final_logit_softcapping": 30.0, "head_dim": 256,
    "hidden_act": "gelu_pytorch_tanh", "hidden_activation": "gelu_pytorch_tanh",
    "hidden_size": 2304, "intermediate_size": 9216, "max_position_embeddings": 8192,
    "model_type": "gemma2", "num_attention_heads": 8, "num_hidden_layers": 26,
    "num_key_value_heads": 4, "pad_token_id": 0, "query_pre_attn_scalar": 256,
    "rms_norm_eps": 1e-06, "rope_theta": 10000.0, "sliding_window": 4096,
    "torch_dtype": "float32", "vocab_size": 256000,
}
GEMMA3_1B = {
    "architectures": ["Gemma3ForCausalLM"], "attention_bias": False,
    "attn_logit_softcapping": None, "bos_token_id": 2, "eos_token_id": 1,
    "final_logit_softcapping": None, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
    "hidden_size": 1152, "intermediate_size": 6912, "max_position_embeddings": 32768,
    "model_type": "gemma3_text", "num_attention_heads": 4, "num_hidden_layers": 26,
    "num_key_value_heads": 1, "pad_token_id": 0, "query_pre_attn_scalar": 256,
    "rms_norm_eps": 1e-06, "rope_local_base_freq": 10000, "rope_scaling": None,
    "rope_theta": 1000000, "sliding_window": 512, "sliding_window_pattern": 6,
    "torch_dtype": "bfloat16", "vocab_size": 262144,
}
GEMMA3_4B_MULTIMODAL = {
    "architectures": ["Gemma3ForConditionalGeneration"], "boi_token_index": 255999,
    "eoi_token_index": 256000, "eos_token_id": [1, 106], "image_token_index": 262144,
    "mm_tokens_per_image": 256, "model_type": "gemma3",
    "text_config": {
        "hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text",
        "num_hidden_layers": 34, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
        "sliding_window": 1024,
    },
    "torch_dtype": "bfloat16",
    "vision_config": {"hidden_size": 1152, "image_size": 896, "model_type": "siglip_vision_model",
                      "num_attention_heads": 16, "num_hidden_layers": 27, "patch_size": 14},
}
REAL = {
    "qwen3_0p6b": QWEN3_0P6B, "qwen3_30b_a3b": QWEN3_30B_A3B, "qwen2p5_7b": QWEN2P5_7B,
    "llama3p1_8b": LLAMA3P1_8B, "gemma_2b": GEMMA_2B, "gemma2_2b": GEMMA2_2B,
    "gemma3_1b": GEMMA3_1B, "gemma3_4b": GEMMA3_4B_MULTIMODAL,
}


def parse(hf: Any):
  """config.json -> config, as every loader does: find the family, then read."""
  return registry.family_for_hf_config(hf).config_class.from_hf_config(hf)


@pytest.mark.parametrize("config_id", sorted(REAL))
def test_real_config_json_is_its_preset(config_id: str):
  hf = REAL[config_id]
  preset = registry.get_config(config_id)
  text = hf.get("text_config", hf)
  context = text.get("max_position_embeddings", preset.max_position_embeddings)
  assert parse(hf) == preset.replace(max_position_embeddings=context)


def _with(config: dict[str, Any], **changes: Any) -> dict[str, Any]:
  out = copy.deepcopy(config)
  out.update(changes)
  return out


def _without(config: dict[str, Any], key: str) -> dict[str, Any]:
  out = copy.deepcopy(config)
  del out[key]
  return out


def _nested(depth: int) -> Any:
  value: Any = 1.0
  for _ in range(depth):
    value = {"factor": value}
  return value


# (case, bad config.json, error type, words the message must hold)
CASES: list[tuple[str, Any, type[ZooError], tuple[str, ...]]] = [
    ("json array", [QWEN3_0P6B], ConfigError, ("list", "not an object")),
    ("json null", None, ConfigError, ("null", "not an object")),
    ("json string", "qwen3", ConfigError, ("str", "not an object")),
    ("deeply nested", _with(QWEN3_0P6B, rope_scaling=_nested(50)), ConfigError,
     ("nests deeper",)),
    ("missing hidden_size", _without(QWEN3_0P6B, "hidden_size"), ConfigError,
     ("'hidden_size'", "add the key")),
    ("missing vocab_size", _without(LLAMA3P1_8B, "vocab_size"), ConfigError, ("'vocab_size'",)),
    ("string layers", _with(QWEN3_0P6B, num_hidden_layers="28"), ConfigError,
     ("'num_hidden_layers'", "'28'", "str", "integer")),
    ("float intermediate", _with(LLAMA3P1_8B, intermediate_size=14336.5), ConfigError,
     ("'intermediate_size'", "14336.5", "integer")),
    ("zero heads", _with(QWEN3_0P6B, num_attention_heads=0), ConfigError,
     ("'num_attention_heads'", " 0 ")),
    ("zero kv heads", _with(GEMMA2_2B, num_key_value_heads=0), ConfigError,
     ("'num_key_value_heads'",)),
    ("negative vocab", _with(GEMMA_2B, vocab_size=-5), ConfigError, ("'vocab_size'", "-5")),
    ("absurd layer count", _with(QWEN3_0P6B, num_hidden_layers=10**12), ConfigError,
     ("'num_hidden_layers'",)),
    ("heads not a multiple of kv heads", _with(QWEN3_0P6B, num_key_value_heads=3), ConfigError,
     ("num_attention_heads=16", "num_key_value_heads=3", "multiple")),
    ("rope_scaling a string", _with(LLAMA3P1_8B, rope_scaling="llama3"), ConfigError,
     ("'rope_scaling'", "'llama3'", "object")),
    ("rope_scaling factor a string", _with(LLAMA3P1_8B, rope_scaling={"rope_type": "linear",
                                                                      "factor": "8"}),
     ConfigError, ("'rope_scaling.factor'", "'8'")),
    ("rope type unknown", _with(LLAMA3P1_8B, rope_scaling={"rope_type": "yarn", "factor": 4.0}),
     ConfigMismatchError, ("'yarn'", "supported")),
    ("text_config a list", _with(GEMMA3_4B_MULTIMODAL, text_config=[1, 2]), ConfigError,
     ("'text_config'", "object")),
    ("rms_norm_eps a string", _with(QWEN2P5_7B, rms_norm_eps="1e-6"), ConfigError,
     ("'rms_norm_eps'", "'1e-6'", "number")),
    ("rms_norm_eps NaN", _with(QWEN2P5_7B, rms_norm_eps=math.nan), ConfigError,
     ("'rms_norm_eps'", "nan")),
    ("tie_word_embeddings a string", _with(QWEN3_0P6B, tie_word_embeddings="false"),
     ConfigError, ("'tie_word_embeddings'", "'false'", "without quotes")),
    ("use_sliding_window a string", _with(QWEN2P5_7B, use_sliding_window="false"), ConfigError,
     ("'use_sliding_window'", "'false'")),
    ("attention_bias a string", _with(LLAMA3P1_8B, attention_bias="false"), ConfigError,
     ("'attention_bias'",)),
    ("layer_types too short", _with(GEMMA2_2B, layer_types=["full_attention"]), ConfigError,
     ("'layer_types'", "1 entries", "26")),
    ("layer_types unknown kind", _with(GEMMA2_2B, layer_types=["global"] * 26), ConfigError,
     ("'layer_types'",)),
    ("model_type a number", _with(QWEN3_0P6B, model_type=3), ConfigError, ("'model_type'",)),
    ("architectures a string", _without(_with(QWEN3_0P6B, architectures="Qwen3ForCausalLM"),
                                        "model_type"), ConfigError, ("'architectures'",)),
    ("experts per token above experts", _with(QWEN3_30B_A3B, num_experts_per_tok=200),
     ConfigError, ("num_experts_per_tok=200", "num_experts=128")),
    ("mlp_only_layers out of range", _with(QWEN3_30B_A3B, mlp_only_layers=[48]), ConfigError,
     ("mlp_only_layers", "[48]")),
    ("eos a string", _with(QWEN3_0P6B, eos_token_id="151645"), ConfigError,
     ("'eos_token_id'",)),
    ("no known model_type", _with(QWEN3_0P6B, model_type="mamba", architectures=["Mamba"]),
     UnknownModelError, ("'mamba'",)),
]


@pytest.mark.parametrize("case, hf, error, words", CASES, ids=[c[0] for c in CASES])
def test_bad_config_json_is_a_typed_error_naming_key_value_and_fix(
    case: str, hf: Any, error: type[ZooError], words: tuple[str, ...]
):
  with pytest.raises(error) as raised:
    parse(hf)
  message = str(raised.value)
  assert all(word in message for word in words), message


def test_tie_word_embeddings_is_read_by_meaning():
  assert parse(_with(QWEN3_0P6B, tie_word_embeddings=False)).tie_word_embeddings is False
  assert parse(_with(QWEN3_0P6B, tie_word_embeddings=0)).tie_word_embeddings is False
  assert parse(_with(QWEN3_0P6B, tie_word_embeddings=True)).tie_word_embeddings is True


@pytest.mark.parametrize("rope", [{"factor": 2}, {"rope_type": "default", "factor": 2},
                                  {"rope_type": "linear", "factor": 2, "low_freq_factor": 9}])
def test_a_ropes_unused_scaling_fields_are_ignored_as_transformers_does(rope):
  """Found by the fuzz test below: a "default" rope with a stray factor read as scaled by
  2 in the config (though unscaled in the model) and exported unscaled, so the round trip
  changed the config. Only the fields a rope kind uses are read."""
  config = parse(_with(GEMMA2_2B, rope_parameters=rope))
  assert config.rope.factor == (2.0 if rope.get("rope_type") == "linear" else 1.0)
  assert config.rope.low_freq_factor == 1.0
  assert type(config).from_hf_config(config.to_hf_config()) == config


def test_whole_number_floats_read_as_their_int():
  assert parse(_with(QWEN3_0P6B, hidden_size=1024.0)).hidden_size == 1024


def test_deeply_nested_config_json_file_is_a_typed_error(tmp_path: pathlib.Path):
  from tunix_zoo.automodel import read_hf_config
  from tunix_zoo.errors import CheckpointError

  (tmp_path / "config.json").write_text("[" * 100_000 + "]" * 100_000)
  with pytest.raises(CheckpointError, match="not valid JSON"):
    read_hf_config(tmp_path)


def test_cli_reports_a_bad_config_folder_without_a_traceback(tmp_path: pathlib.Path):
  (tmp_path / "config.json").write_text(json.dumps(_with(QWEN3_0P6B, tie_word_embeddings="no")))
  env = dict(os.environ, PYTHONPATH=str(pathlib.Path(__file__).resolve().parents[2]))
  result = subprocess.run([sys.executable, "-m", "tunix_zoo.cli", "info", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=120)
  assert result.returncode == 2, result.stderr
  assert "error:" in result.stderr and "'tie_word_embeddings'" in result.stderr
  assert "Traceback" not in result.stderr


def test_a_long_id_with_many_separators_is_answered_quickly():
  # ~5 000 characters, a separator every other one: difflib used to score every prefix
  # against every family (5-25 s); the prefixes a family can span are now bounded.
  model_id = "org/" + "-".join(["ab", "c_d"] * 1000)
  start = time.perf_counter()
  with pytest.raises(UnknownModelError, match="no registered model family"):
    ModelNaming(model_id=model_id)
  assert time.perf_counter() - start < 1.0


def test_long_ids_still_name_their_family():
  version = "-".join(["x"] * 2000)
  assert ModelNaming(model_id=f"acme/llama-3.1-{version}").model_family == "llama3p1"


# -- fuzzing: mutations of the real configs ---------------------------------------------
JSON_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 70), st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6),
    st.sampled_from(["false", "true", "0", "1e-6", "full_attention", "sliding_attention",
                     "linear", "llama3", "qwen3", "gemma3_text", "silu"]),
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["rope_type", "factor", "rope_theta", "full_attention", "type",
                         "sliding_attention", "hidden_size"]) | st.text(max_size=4),
        inner, max_size=3),
    max_leaves=8,
)
# Every key some family reads, so mutations reach every reader and transform.
READ_KEYS = sorted(
    {row.key for spec in registry.families().values() for row in spec.config_class.HF_FIELDS}
    | {"rope_theta", "rope_scaling", "rope_parameters", "rope_local_base_freq", "layer_types",
       "sliding_window", "sliding_window_pattern", "use_sliding_window", "max_window_layers",
       "num_experts", "num_local_experts", "num_experts_per_tok", "moe_intermediate_size",
       "decoder_sparse_step", "mlp_only_layers", "norm_topk_prob", "router_aux_loss_coef",
       "bos_token_id", "eos_token_id", "pad_token_id", "model_type", "architectures",
       "text_config", "attention_bias", "mlp_bias", "use_bidirectional_attention",
       "hidden_activation"}
)


@st.composite
def mutated_configs(draw) -> Any:
  hf = copy.deepcopy(REAL[draw(st.sampled_from(sorted(REAL)))])
  for _ in range(draw(st.integers(1, 4))):
    target = hf.get("text_config") if isinstance(hf, dict) and draw(st.booleans()) else hf
    if not isinstance(target, dict):
      target = hf
    if not isinstance(target, dict):
      break
    action = draw(st.sampled_from(["set", "set", "set", "delete", "whole"]))
    key = draw(st.sampled_from(READ_KEYS) | st.sampled_from(sorted(target) or ["x"]))
    if action == "set":
      target[key] = draw(JSON_VALUES)
    elif action == "delete":
      target.pop(key, None)
    else:
      hf = draw(JSON_VALUES)
  return hf


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hf=mutated_configs())
def test_fuzzed_config_json_gives_a_config_or_a_zoo_error(hf: Any):
  try:
    config = parse(hf)
  except ZooError:
    return
  # What is accepted is coherent: it counts, divides, and writes back as itself.
  assert config.num_heads % config.num_kv_heads == 0
  assert count_parameters(config) > 0
  assert type(config).from_hf_config(config.to_hf_config()) == config
