"""Family configs: both config.json spellings, transformers agreement, presets' facts.

Each family is checked against transformers itself: a small transformers config is
written out the way transformers 5 writes it (``rope_parameters``, ``layer_types``)
and the way published checkpoints spell it (``rope_theta``, ``rope_scaling``,
``sliding_window_pattern``, ...); both must parse to the same config, and what
``to_hf_config`` writes must mean the same thing to transformers.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import math
from typing import Any, Callable

import jax
import pytest
import transformers
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from tunix_zoo import registry
from tunix_zoo.config import (
    FULL_ATTENTION,
    SLIDING_ATTENTION,
    DecoderConfig,
    RopeConfig,
    count_parameters,
)
from tunix_zoo.errors import ConfigMismatchError
from tunix_zoo.models.gemma.config import GemmaConfig
from tunix_zoo.models.gemma2.config import Gemma2Config
from tunix_zoo.models.gemma3.config import Gemma3Config
from tunix_zoo.models.llama3.config import Llama3Config
from tunix_zoo.models.qwen2p5.config import Qwen2p5Config
from tunix_zoo.models.qwen3.config import Qwen3Config

CATEGORIES = ("gemma", "gemma2", "gemma3", "llama3", "qwen2p5", "qwen3")
S, F = SLIDING_ATTENTION, FULL_ATTENTION
SMALL = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_attention_heads=4)


# -- the published (transformers 4) spelling of a transformers 5 config.json ------------
def hub_spelling(hf: dict[str, Any]) -> dict[str, Any]:
  """Rewrites a transformers 5 ``to_dict()`` the way checkpoints on the Hub spell it."""
  hf = dict(hf)
  if isinstance(hf.get("text_config"), dict):
    hf["text_config"] = hub_spelling(hf["text_config"])
  if "dtype" in hf:
    hf["torch_dtype"] = hf.pop("dtype")
  params = hf.pop("rope_parameters", None)
  if params and F in params:  # Gemma 3: one rope per layer type.
    hf.update(_hub_rope(params[F]))
    hf["rope_local_base_freq"] = params[S]["rope_theta"]
  elif params:
    hf.update(_hub_rope(params))
  hf.pop("_sliding_window_pattern", None)
  types = hf.pop("layer_types", None)
  if hf.get("model_type") == "gemma3_text":
    period = types.index(F) + 1 if F in types else len(types) + 1
    assert [S if (i + 1) % period else F for i in range(len(types))] == types
    hf["sliding_window_pattern"] = period
  if "num_local_experts" in hf:
    hf["num_experts"] = hf.pop("num_local_experts")
  return hf


def _hub_rope(params: dict[str, Any]) -> dict[str, Any]:
  scaling = {k: v for k, v in params.items() if k != "rope_theta"}
  unscaled = scaling.get("rope_type", "default") == "default"
  return {"rope_theta": params["rope_theta"], "rope_scaling": None if unscaled else scaling}


def transformers_reading(hf: dict[str, Any]) -> dict[str, Any]:
  """config.json as transformers 5 understands it, written back out."""
  hf = dict(hf)
  return transformers.AutoConfig.for_model(hf.pop("model_type"), **hf).to_dict()


# -- one case per family: a small transformers config and what it must parse to --------
@dataclasses.dataclass
class Case:
  name: str
  config_class: type[DecoderConfig]
  make: Callable[[], transformers.PretrainedConfig]
  expected: dict[str, Any]


LLAMA31_SCALING = {
    "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
GEMMA3_TEXT = dict(
    SMALL, num_hidden_layers=7, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24,
    sliding_window=16, max_position_embeddings=512,
    rope_scaling={"rope_type": "linear", "factor": 8.0},
)
GEMMA3_EXPECTED = dict(
    num_layers=7, num_kv_heads=2, head_dim=16, query_pre_attn_scalar=24.0, sliding_window=16,
    layer_types=(S, S, S, S, S, F, S), qk_norm=True, sandwich_norms=True, norm_offset=1.0,
    scale_embeddings=True, tie_word_embeddings=True, attn_logit_softcap=None,
    final_logit_softcap=None, hidden_act="gelu_pytorch_tanh",
    rope=RopeConfig(theta=1_000_000.0, kind="linear", factor=8.0),
    local_rope=RopeConfig(theta=10_000.0),
)

CASES = [
    Case(
        "gemma", GemmaConfig,
        lambda: transformers.GemmaConfig(
            **SMALL, num_hidden_layers=2, num_key_value_heads=1, head_dim=32, hidden_act="gelu"
        ),
        dict(num_kv_heads=1, head_dim=32, norm_offset=1.0, scale_embeddings=True,
             tie_word_embeddings=True, hidden_act="gelu_pytorch_tanh", layer_types=(),
             sandwich_norms=False, qk_norm=False),
    ),
    Case(
        "gemma2", Gemma2Config,
        lambda: transformers.Gemma2Config(
            **SMALL, num_hidden_layers=4, num_key_value_heads=2, head_dim=16,
            query_pre_attn_scalar=24, sliding_window=16, attn_logit_softcapping=50.0,
            final_logit_softcapping=30.0,
        ),
        dict(num_layers=4, query_pre_attn_scalar=24.0, sliding_window=16,
             layer_types=(S, F, S, F), attn_logit_softcap=50.0, final_logit_softcap=30.0,
             sandwich_norms=True, norm_offset=1.0, scale_embeddings=True, qk_norm=False,
             local_rope=None, rope=RopeConfig(theta=10_000.0)),
    ),
    Case("gemma3_text", Gemma3Config, lambda: transformers.Gemma3TextConfig(**GEMMA3_TEXT),
         GEMMA3_EXPECTED),
    Case(
        "gemma3_multimodal", Gemma3Config,
        lambda: transformers.Gemma3Config(text_config=GEMMA3_TEXT),
        GEMMA3_EXPECTED,
    ),
    Case(
        "llama3p1", Llama3Config,
        lambda: transformers.LlamaConfig(
            **SMALL, num_hidden_layers=2, num_key_value_heads=2, rms_norm_eps=1e-5,
            rope_theta=500_000.0, rope_scaling=LLAMA31_SCALING, max_position_embeddings=16_384,
            tie_word_embeddings=True,
        ),
        dict(head_dim=16, norm_eps=1e-5, max_position_embeddings=16_384,
             tie_word_embeddings=True, attention_bias=False, qk_norm=False,
             rope=RopeConfig(theta=500_000.0, kind="llama3", factor=8.0)),
    ),
    Case(
        "qwen2p5", Qwen2p5Config,
        lambda: transformers.Qwen2Config(
            **SMALL, num_hidden_layers=3, num_key_value_heads=2, rope_theta=1_000_000.0,
            sliding_window=32, use_sliding_window=False,
        ),
        dict(attention_bias=True, qk_norm=False, sliding_window=None, layer_types=(),
             rope=RopeConfig(theta=1_000_000.0), max_position_embeddings=32_768),
    ),
    Case(
        "qwen2p5_sliding", Qwen2p5Config,
        lambda: transformers.Qwen2Config(
            **SMALL, num_hidden_layers=3, num_key_value_heads=2, sliding_window=32,
            use_sliding_window=True, max_window_layers=1,
        ),
        dict(attention_bias=True, sliding_window=32, layer_types=(F, S, S)),
    ),
    Case(
        "qwen3", Qwen3Config,
        lambda: transformers.Qwen3Config(
            **SMALL, num_hidden_layers=2, num_key_value_heads=2, head_dim=32,
            rope_theta=1_000_000.0, tie_word_embeddings=True,
        ),
        dict(qk_norm=True, attention_bias=False, head_dim=32, num_experts=0,
             tie_word_embeddings=True, sliding_window=None, layer_types=()),
    ),
    Case(
        "qwen3_moe", Qwen3Config,
        lambda: transformers.Qwen3MoeConfig(
            **SMALL, num_hidden_layers=4, num_key_value_heads=2, head_dim=32, num_experts=6,
            num_experts_per_tok=2, moe_intermediate_size=24, decoder_sparse_step=2,
            mlp_only_layers=[1], norm_topk_prob=True, router_aux_loss_coef=0.01,
        ),
        dict(qk_norm=True, head_dim=32, num_experts=6, num_experts_per_tok=2,
             moe_intermediate_size=24, decoder_sparse_step=2, mlp_only_layers=(1,),
             norm_topk_prob=True, router_aux_loss_coef=0.01, intermediate_size=96),
    ),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_transformers5_spelling_parses(case: Case):
  cfg = case.config_class.from_hf_config(case.make().to_dict())
  got = {k: getattr(cfg, k) for k in case.expected}
  assert got == case.expected
  assert (cfg.vocab_size, cfg.hidden_size, cfg.num_heads) == (128, 64, 4)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_hub_spelling_parses_the_same(case: Case):
  hf = case.make().to_dict()
  hub = hub_spelling(hf)
  assert "rope_parameters" not in str(hub) and "layer_types" not in str(hub)
  expected = case.config_class.from_hf_config(hf)
  assert case.config_class.from_hf_config(hub) == expected
  # transformers reads the Hub spelling the same way (derived layer types included).
  assert case.config_class.from_hf_config(transformers_reading(hub)) == expected


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_to_hf_config_loads_in_transformers(case: Case):
  cfg = case.config_class.from_hf_config(case.make().to_dict())
  written = cfg.to_hf_config()
  model_types = getattr(case.config_class, "model_types", (case.config_class.model_type,))
  assert written["model_type"] in model_types
  assert case.config_class.from_hf_config(written) == cfg
  assert case.config_class.from_hf_config(transformers_reading(written)) == cfg


def test_multimodal_gemma3_with_published_text_config_is_the_4b_preset():
  # google/gemma-3-4b-it's config.json leaves the rest to Gemma3TextConfig's defaults.
  hub = {
      "architectures": ["Gemma3ForConditionalGeneration"],
      "model_type": "gemma3",
      "text_config": {
          "hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text",
          "num_hidden_layers": 34, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
          "sliding_window": 1024,
      },
      "vision_config": {"model_type": "siglip_vision_model"},
  }
  preset = registry.get_config("gemma3_4b")
  assert Gemma3Config.from_hf_config(hub) == preset
  assert Gemma3Config.from_hf_config(transformers_reading(hub)) == preset


# Published config.json files, verbatim but for token ids and bookkeeping keys.
QWEN3_235B_A22B_INSTRUCT_2507 = {
    "architectures": ["Qwen3MoeForCausalLM"], "attention_bias": False,
    "decoder_sparse_step": 1, "head_dim": 128, "hidden_act": "silu", "hidden_size": 4096,
    "intermediate_size": 12288, "max_position_embeddings": 262144, "max_window_layers": 94,
    "mlp_only_layers": [], "model_type": "qwen3_moe", "moe_intermediate_size": 1536,
    "norm_topk_prob": True, "num_attention_heads": 64, "num_experts": 128,
    "num_experts_per_tok": 8, "num_hidden_layers": 94, "num_key_value_heads": 4,
    "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 5000000,
    "router_aux_loss_coef": 0.001, "sliding_window": None, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "use_sliding_window": False, "vocab_size": 151936,
}
QWEN2P5_7B_INSTRUCT = {
    "architectures": ["Qwen2ForCausalLM"], "hidden_act": "silu", "hidden_size": 3584,
    "intermediate_size": 18944, "max_position_embeddings": 32768, "max_window_layers": 28,
    "model_type": "qwen2", "num_attention_heads": 28, "num_hidden_layers": 28,
    "num_key_value_heads": 4, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
    "sliding_window": 131072, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "use_sliding_window": False, "vocab_size": 152064,
}


@pytest.mark.parametrize(
    "hf, config_id",
    [
        (QWEN3_235B_A22B_INSTRUCT_2507, "qwen3_235b_a22b_instruct_2507"),
        (QWEN2P5_7B_INSTRUCT, "qwen2p5_7b_instruct"),
    ],
)
def test_published_config_json_is_its_preset(hf: dict[str, Any], config_id: str):
  preset = registry.get_config(config_id)
  parsed = type(preset).from_hf_config(hf)
  # Instruct and base checkpoints of one size may state different context lengths.
  assert parsed == preset.replace(max_position_embeddings=hf["max_position_embeddings"])
  assert type(preset).from_hf_config(transformers_reading(hf)) == parsed


def test_gemma3_scaled_local_rope_survives_export():
  rope_parameters = {
      F: {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
      S: {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4},
  }
  hf = transformers.Gemma3TextConfig(**{
      **GEMMA3_TEXT, "rope_scaling": None, "rope_parameters": rope_parameters
  }).to_dict()
  cfg = Gemma3Config.from_hf_config(hf)
  assert cfg.local_rope == RopeConfig(theta=1e4, kind="linear", factor=2.0)
  assert Gemma3Config.from_hf_config(transformers_reading(cfg.to_hf_config())) == cfg


def test_qwen2_window_is_ignored_unless_switched_on():
  hub = hub_spelling(
      transformers.Qwen2Config(**SMALL, num_hidden_layers=2, num_key_value_heads=2).to_dict()
  )
  hub.update(sliding_window=131_072, use_sliding_window=False, max_window_layers=0)
  cfg = Qwen2p5Config.from_hf_config(hub)
  assert cfg.sliding_window is None and cfg.layer_window(1) is None


@pytest.mark.parametrize(
    "config_class, hf",
    [
        (Llama3Config, {"attention_bias": True}),
        (Llama3Config, {"mlp_bias": True}),
        (Qwen3Config, {"attention_bias": True}),
        (GemmaConfig, {"attention_bias": True}),
        (Gemma3Config, {"use_bidirectional_attention": True}),
    ],
)
def test_unsupported_switches_are_refused(config_class: type[DecoderConfig], hf: dict):
  base = dict(SMALL, num_hidden_layers=2, num_key_value_heads=2)
  with pytest.raises(ConfigMismatchError, match="tunix_zoo"):
    config_class.from_hf_config({**base, **hf})


@settings(max_examples=30, deadline=None)
@given(num_layers=st.integers(1, 20), pattern=st.integers(1, 8), window=st.integers(1, 64))
def test_gemma3_pattern_derivation_matches_transformers(num_layers, pattern, window):
  hub = dict(
      SMALL, model_type="gemma3_text", num_hidden_layers=num_layers, num_key_value_heads=2,
      head_dim=16, sliding_window_pattern=pattern, sliding_window=window,
  )
  ours = Gemma3Config.from_hf_config(hub)
  assert ours == Gemma3Config.from_hf_config(transformers_reading(hub))
  assert Gemma3Config.from_hf_config(ours.to_hf_config()) == ours


@settings(max_examples=30, deadline=None)
@given(num_layers=st.integers(1, 12), max_window_layers=st.integers(0, 14), on=st.booleans())
def test_qwen_sliding_layers_match_transformers(num_layers, max_window_layers, on):
  hub = dict(
      SMALL, model_type="qwen2", num_hidden_layers=num_layers, num_key_value_heads=2,
      sliding_window=8, use_sliding_window=on, max_window_layers=max_window_layers,
  )
  ours = Qwen2p5Config.from_hf_config(hub)
  assert ours == Qwen2p5Config.from_hf_config(transformers_reading(hub))
  assert Qwen2p5Config.from_hf_config(transformers_reading(ours.to_hf_config())) == ours


# -- presets --------------------------------------------------------------------------
for _category in CATEGORIES:  # Registers the families' models where they exist.
  importlib.import_module(f"tunix_zoo.models.{_category}")
FAMILY_CONFIG_MODULES = {f"tunix_zoo.models.{c}.config" for c in CATEGORIES}
PRESETS = sorted(
    cid for cid in registry.config_ids()
    if type(registry.get_config(cid)).__module__ in FAMILY_CONFIG_MODULES
)


@pytest.mark.parametrize("config_id", PRESETS)
def test_preset_round_trips(config_id: str):
  preset = registry.get_config(config_id)
  assert type(preset).from_hf_config(preset.to_hf_config()) == preset
  assert type(preset).from_hf_config(transformers_reading(preset.to_hf_config())) == preset


# Variants users name, and the preset whose architecture they share.
VARIANTS = {
    "gemma_2b_it": "gemma_2b", "gemma_7b_it": "gemma_7b",
    "gemma2_2b_it": "gemma2_2b", "gemma2_9b_it": "gemma2_9b", "gemma2_27b_it": "gemma2_27b",
    "gemma3_270m_it": "gemma3_270m", "gemma3_1b_it": "gemma3_1b", "gemma3_1b_pt": "gemma3_1b",
    "gemma3_4b_it": "gemma3_4b", "gemma3_4b_pt": "gemma3_4b", "gemma3_12b_it": "gemma3_12b",
    "gemma3_27b_it": "gemma3_27b",
    "llama3_8b_instruct": "llama3_8b", "llama3_70b_instruct": "llama3_70b",
    "llama3p1_8b_instruct": "llama3p1_8b", "llama3p1_70b_instruct": "llama3p1_70b",
    "llama3p1_405b_instruct": "llama3p1_405b", "llama3p2_1b_instruct": "llama3p2_1b",
    "llama3p2_3b_instruct": "llama3p2_3b",
    "qwen2p5_0p5b_instruct": "qwen2p5_0p5b", "qwen2p5_7b_instruct": "qwen2p5_7b",
    "qwen2p5_72b_instruct": "qwen2p5_72b",
    "qwen3_0p6b_base": "qwen3_0p6b", "qwen3_8b_base": "qwen3_8b",
    "qwen3_30b_a3b_base": "qwen3_30b_a3b", "qwen3_235b_a22b": "qwen3_235b_a22b",
    "qwen3_4b_instruct_2507": "qwen3_4b_instruct_2507",
    "qwen3_4b_thinking_2507": "qwen3_4b_thinking_2507",
    "qwen3_30b_a3b_instruct_2507": "qwen3_30b_a3b_instruct_2507",
    "qwen3_30b_a3b_thinking_2507": "qwen3_30b_a3b_thinking_2507",
    "qwen3_235b_a22b_instruct_2507": "qwen3_235b_a22b_instruct_2507",
    "qwen3_235b_a22b_thinking_2507": "qwen3_235b_a22b_thinking_2507",
}


@pytest.mark.parametrize("variant, preset", sorted(VARIANTS.items()))
def test_variant_ids_resolve_to_their_architecture(variant: str, preset: str):
  assert registry.resolve_config_id(variant) == preset


@pytest.mark.parametrize(
    "config_id, theta, max_positions",
    [
        ("qwen3_4b", 1e6, 40_960),
        ("qwen3_4b_instruct_2507", 5e6, 262_144),
        ("qwen3_4b_thinking_2507", 5e6, 262_144),
        ("qwen3_30b_a3b_instruct_2507", 1e7, 262_144),
        ("qwen3_235b_a22b_instruct_2507", 5e6, 262_144),
    ],
)
def test_dated_qwen3_presets_differ_by_rope_only(config_id, theta, max_positions):
  cfg = registry.get_config(config_id)
  assert (cfg.rope.theta, cfg.max_position_embeddings) == (theta, max_positions)
  base = registry.get_config(config_id.split("_instruct")[0].split("_thinking")[0])
  assert cfg.replace(rope=base.rope, max_position_embeddings=base.max_position_embeddings) == base


# -- parameter counts from the real models' shapes ------------------------------------
# Published totals: exact safetensors counts on the Hub for Gemma 1/2, Gemma 3 270M/1B and
# Llama; the model cards' rounded figures for Qwen; for the Gemma 3 4B/12B/27B text
# decoders, the Gemma 3 technical report's embedding + non-embedding counts (Table 1:
# 675M + 3,209M, 1,012M + 10,759M, 1,416M + 25,600M), the vision tower excluded.
PUBLISHED = {
    "gemma_2b": 2_506_172_416, "gemma_7b": 8_537_680_896,
    "gemma2_2b": 2_614_341_888, "gemma2_9b": 9_241_705_984, "gemma2_27b": 27_227_128_320,
    "gemma3_270m": 268_098_176, "gemma3_1b": 999_885_952,
    "gemma3_4b": 3_884e6, "gemma3_12b": 11_771e6, "gemma3_27b": 27_016e6,
    "llama3_8b": 8_030_261_248, "llama3_70b": 70_553_706_496,
    "llama3p1_8b": 8_030_261_248, "llama3p1_70b": 70_553_706_496,
    "llama3p1_405b": 405_853_388_800,
    "llama3p2_1b": 1_235_814_400, "llama3p2_3b": 3_212_749_824,
    "qwen2p5_0p5b": 0.49e9, "qwen2p5_1p5b": 1.54e9, "qwen2p5_3b": 3.09e9,
    "qwen2p5_7b": 7.61e9, "qwen2p5_14b": 14.7e9, "qwen2p5_32b": 32.5e9, "qwen2p5_72b": 72.7e9,
    "qwen3_0p6b": 0.6e9, "qwen3_1p7b": 1.7e9, "qwen3_4b": 4.0e9, "qwen3_8b": 8.2e9,
    "qwen3_14b": 14.8e9, "qwen3_32b": 32.8e9,
    "qwen3_4b_instruct_2507": 4.0e9, "qwen3_4b_thinking_2507": 4.0e9,
    "qwen3_30b_a3b": 30.5e9, "qwen3_30b_a3b_instruct_2507": 30.5e9,
    "qwen3_30b_a3b_thinking_2507": 30.5e9,
    "qwen3_235b_a22b": 235e9, "qwen3_235b_a22b_instruct_2507": 235e9,
    "qwen3_235b_a22b_thinking_2507": 235e9,
}
# Parameters a token passes through, from the model cards ("3.3B activated").
PUBLISHED_ACTIVE = {
    "qwen3_30b_a3b": 3.3e9, "qwen3_30b_a3b_instruct_2507": 3.3e9,
    "qwen3_30b_a3b_thinking_2507": 3.3e9,
    "qwen3_235b_a22b": 22e9, "qwen3_235b_a22b_instruct_2507": 22e9,
    "qwen3_235b_a22b_thinking_2507": 22e9,
}


def test_every_preset_has_a_published_count():
  assert sorted(PUBLISHED) == PRESETS


def model_parameter_count(config_id: str) -> int:
  """Parameters of the family's model, from shapes alone (nothing is allocated).

  Rope and context length shape no parameter, so presets differing only there (Llama 3
  and 3.1, the Qwen3 2507 updates) are built once: tracing the large models takes seconds.
  """
  cfg = registry.get_config(config_id)
  shapes_only = cfg.replace(rope=RopeConfig(), max_position_embeddings=1)
  return _count_parameters(registry.family_of_config(config_id).model_class, shapes_only)


@functools.lru_cache(maxsize=None)
def _count_parameters(model_class: type, cfg: DecoderConfig) -> int:
  abstract = nnx.eval_shape(lambda: model_class(cfg, rngs=None))
  return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))


@pytest.mark.parametrize("config_id", sorted(PUBLISHED))
def test_parameter_count_matches_published(config_id: str):
  total = model_parameter_count(config_id)
  assert total == pytest.approx(PUBLISHED[config_id], rel=0.02)
  if config_id in PUBLISHED_ACTIVE:
    active = count_parameters(registry.get_config(config_id), active=True)
    assert active == pytest.approx(PUBLISHED_ACTIVE[config_id], rel=0.02)


@pytest.mark.parametrize("config_id", sorted(PUBLISHED))
def test_parameter_count_from_fields_matches_the_built_model(config_id: str):
  # `tunix-zoo list` counts from the config's fields; the model's shapes are the truth.
  assert count_parameters(registry.get_config(config_id)) == model_parameter_count(config_id)


# -- round trips, generated from each family's tables -----------------------------------
from tunix_zoo import config as config_tables  # noqa: E402
from tunix_zoo.models.gemma.config import read_gemma1_activation  # noqa: E402
from tunix_zoo.models.gemma3.config import Gemma3Ropes  # noqa: E402
from tunix_zoo.models.qwen3.config import MOE_FIELDS, Qwen3Moe  # noqa: E402

# A value strategy per reader: each table row draws its config.json value by its reader.
READER_VALUES = {
    config_tables.read_positive_int: st.integers(1, 64),
    config_tables.read_layer_count: st.integers(1, 8),
    config_tables.read_positive_float: st.sampled_from([1e-6, 1e-5, 0.5, 24.0, 50.0, 1e4, 5e5]),
    config_tables.read_float: st.sampled_from([0.0, 0.001, 0.01]),
    config_tables.read_bool: st.booleans(),
    config_tables.read_str: st.sampled_from(["silu", "gelu_pytorch_tanh"]),
    read_gemma1_activation: st.sampled_from(["gelu", "gelu_pytorch_tanh"]),
    config_tables.read_int_list: st.just([]),
}
# Keys whose values transformers 5 validates more narrowly than their reader does.
KEY_VALUES = {"query_pre_attn_scalar": st.sampled_from([16, 24, 256])}
ROPE_SCALINGS = st.sampled_from([
    None, {"rope_type": "linear", "factor": 8.0}, {"rope_type": "linear", "factor": 2.0},
    LLAMA31_SCALING,
])
FAMILIES = {
    "gemma": GemmaConfig, "gemma2": Gemma2Config, "gemma3_text": Gemma3Config,
    "llama": Llama3Config, "qwen2": Qwen2p5Config, "qwen3": Qwen3Config,
    "qwen3_moe": Qwen3Config,
}
# Keys the draw decides jointly (heads must divide, sizes must fit), not per row.
SHAPE_KEYS = ("num_attention_heads", "num_key_value_heads", "num_hidden_layers", "hidden_size",
              "head_dim")


@st.composite
def hf_configs(draw, model_type: str) -> dict[str, Any]:
  """A Hub-spelling config.json of ``model_type``: every table row either drawn by its
  reader or (when it has a default) left out, and the keys of each transform."""
  config_class = FAMILIES[model_type]
  kv_heads, group = draw(st.integers(1, 3)), draw(st.integers(1, 3))
  layers = draw(st.integers(1, 8))
  heads = kv_heads * group
  hf: dict[str, Any] = {
      "model_type": model_type, "num_attention_heads": heads, "num_hidden_layers": layers,
      "hidden_size": heads * draw(st.integers(1, 8)) * 2, "num_key_value_heads": kv_heads,
  }
  if draw(st.booleans()):
    hf["head_dim"] = 2 * draw(st.integers(1, 8))  # rope needs an even head_dim
  for row in config_class.HF_FIELDS:
    optional = row.default is not config_tables.REQUIRED or row.derive is not None
    if row.key in SHAPE_KEYS or (optional and draw(st.booleans())):
      continue
    hf[row.key] = draw(KEY_VALUES.get(row.key, READER_VALUES[row.read]))
  for transform in config_class.HF_TRANSFORMS:
    hf.update(draw(TRANSFORM_KEYS[type(transform)](model_type, layers)))
  return hf


def _token_id_keys(model_type: str, layers: int):
  return st.fixed_dictionaries({}, optional={
      "bos_token_id": st.integers(0, 9), "pad_token_id": st.integers(0, 9),
      "eos_token_id": st.one_of(
          st.integers(0, 9), st.lists(st.integers(0, 9), min_size=2, max_size=3)
      ),
  })


def _rope_keys(model_type: str, layers: int):
  return st.fixed_dictionaries({}, optional={
      "rope_theta": st.sampled_from([1e4, 5e5, 1e6]), "rope_scaling": ROPE_SCALINGS,
  })


def _gemma3_rope_keys(model_type: str, layers: int):
  return st.fixed_dictionaries({}, optional={
      "rope_theta": st.sampled_from([1e4, 1e6]),
      "rope_local_base_freq": st.sampled_from([1e4, 2e4]),
      "rope_scaling": st.sampled_from([None, {"rope_type": "linear", "factor": 8.0}]),
  })


def _layer_pattern_keys(model_type: str, layers: int):
  explicit = st.lists(st.sampled_from([S, F]), min_size=layers, max_size=layers)
  keys = {"layer_types": explicit}
  if model_type == "gemma3_text":
    keys = {"sliding_window_pattern": st.integers(1, 8)}  # the Hub spelling
  return st.fixed_dictionaries({}, optional=keys)


def _qwen_window_keys(model_type: str, layers: int):
  return st.fixed_dictionaries({}, optional={
      "use_sliding_window": st.booleans(), "sliding_window": st.integers(1, 64),
      "max_window_layers": st.integers(0, layers + 1),
  })


def _moe_keys(model_type: str, layers: int):
  if model_type != "qwen3_moe":
    return st.just({})
  return st.integers(2, 8).flatmap(lambda experts: st.fixed_dictionaries(
      # transformers' default of 8 experts per token would not fit fewer experts.
      {"num_experts": st.just(experts), "num_experts_per_tok": st.integers(1, experts)},
      optional={
          "moe_intermediate_size": st.integers(1, 32),
          "decoder_sparse_step": st.integers(1, 3),
          "mlp_only_layers": st.lists(st.integers(0, layers - 1), unique=True, max_size=layers),
          "norm_topk_prob": st.booleans(),
          "router_aux_loss_coef": st.sampled_from([0.0, 0.001]),
      },
  ))


TRANSFORM_KEYS = {
    config_tables.TokenIds: _token_id_keys, config_tables.Rope: _rope_keys,
    Gemma3Ropes: _gemma3_rope_keys, config_tables.LayerPattern: _layer_pattern_keys,
    config_tables.QwenSlidingWindow: _qwen_window_keys, Qwen3Moe: _moe_keys,
}


def test_every_table_row_and_transform_has_a_strategy():
  for config_class in set(FAMILIES.values()):
    assert {row.read for row in config_class.HF_FIELDS} <= set(READER_VALUES)
    assert {type(t) for t in config_class.HF_TRANSFORMS} <= set(TRANSFORM_KEYS)
  assert {row.read for row in MOE_FIELDS} <= set(READER_VALUES)


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_round_trips_through_both_spellings(model_type: str, data):
  config_class = FAMILIES[model_type]
  hub = data.draw(hf_configs(model_type))
  cfg = config_class.from_hf_config(hub)
  # transformers reads the same config.json (defaults included) to the same model...
  written_by_transformers = transformers_reading(hub)
  assert config_class.from_hf_config(written_by_transformers) == cfg
  # ...and writes it in the transformers 5 spelling, which we read as well.
  assert "rope_parameters" in written_by_transformers
  assert "rope_theta" not in written_by_transformers
  # What we write (the Hub spelling) reads back to the same config, in both libraries.
  written = cfg.to_hf_config()
  assert "rope_theta" in written and "torch_dtype" not in written
  assert config_class.from_hf_config(written) == cfg
  assert config_class.from_hf_config(transformers_reading(written)) == cfg
  # Token ids are compare=False: check them on their own.
  for name in config_tables.TOKEN_ID_FIELDS:
    assert getattr(config_class.from_hf_config(written), name) == getattr(cfg, name)


def test_multimodal_gemma3_keeps_its_top_level_eos_token_ids():
  # google/gemma-3-4b-it: the eos ids sit at the top level, beside text_config. They used
  # to be lost when the text config was flattened (eos None: generation never stopped).
  hub = {
      "architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
      "eos_token_id": [1, 106], "bos_token_id": 2, "pad_token_id": 0,
      "text_config": {"hidden_size": 2560, "intermediate_size": 10240,
                      "model_type": "gemma3_text", "num_hidden_layers": 34,
                      "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                      "sliding_window": 1024},
  }
  cfg = Gemma3Config.from_hf_config(hub)
  assert (cfg.eos_token_id, cfg.bos_token_id, cfg.pad_token_id) == ((1, 106), 2, 0)
  assert cfg.to_hf_config()["eos_token_id"] == [1, 106]
  # transformers 5 writes the text config's own default (1) inside: the top level wins.
  assert transformers_reading(hub)["text_config"]["eos_token_id"] == 1
  assert Gemma3Config.from_hf_config(transformers_reading(hub)).eos_token_id == (1, 106)
