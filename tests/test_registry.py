"""Registry: built-in families, variant resolution, suggestions, and plug-ins found
through the ``tunix_zoo.families`` entry-point group."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from tunix_zoo import registry
from tunix_zoo.errors import UnknownModelError


def test_built_in_families_and_their_hf_names():
  families = registry.families()
  assert set(families) == {"gemma", "gemma2", "gemma3", "llama3", "qwen2p5", "qwen3"}
  assert registry.family_for_hf_config({"model_type": "qwen2"}).category == "qwen2p5"
  assert registry.family_for_hf_config(
      {"model_type": "custom", "architectures": ["LlamaForCausalLM"]}).category == "llama3"
  assert registry.family_of_config("llama3p2_1b").category == "llama3"


@pytest.mark.parametrize("variant, preset", [
    ("gemma2_2b_it", "gemma2_2b"),
    ("gemma3_1b_it", "gemma3_1b"),
    ("gemma3_4b_pt", "gemma3_4b"),
    ("llama3p1_8b_instruct", "llama3p1_8b"),
    ("qwen2p5_7b_instruct", "qwen2p5_7b"),
    ("qwen3_0p6b_base", "qwen3_0p6b"),
    ("qwen3_4b_instruct_2507", "qwen3_4b_instruct_2507"),
])
def test_variants_resolve_to_their_architecture(variant, preset):
  assert registry.resolve_config_id(variant) == preset
  assert registry.get_config(variant) == registry.get_config(preset)


def test_dated_variant_keeps_its_own_rope():
  assert registry.get_config("qwen3_4b_instruct_2507").rope.theta == 5_000_000
  assert registry.get_config("qwen3_4b").rope.theta == 1_000_000


def test_unknown_ids_suggest_the_closest():
  with pytest.raises(UnknownModelError, match="Did you mean 'qwen3_8b'"):
    registry.get_config("qwen3_9b")
  with pytest.raises(UnknownModelError, match="Did you mean 'gemma2'"):
    registry.get_family("gemma22")
  with pytest.raises(UnknownModelError, match="no remote code"):
    registry.family_for_hf_config({"model_type": "mamba", "architectures": ["MambaForCausalLM"]})


PLUGIN = '''
import dataclasses
from typing import ClassVar
from tunix_zoo.config import DecoderConfig
from tunix_zoo.layers.decoder import DecoderLM
from tunix_zoo.models.decoder_params import LLAMA_STYLE
from tunix_zoo.registry import register_config, register_family

@dataclasses.dataclass(frozen=True)
class ToyConfig(DecoderConfig):
  model_type: ClassVar[str] = "toyllama"
  architecture: ClassVar[str] = "ToyLlamaForCausalLM"

@register_family(names=("toyllama",), model_types=("toyllama",),
                 architectures=("ToyLlamaForCausalLM",), config_class=ToyConfig,
                 param_table=LLAMA_STYLE)
class ToyLlama(DecoderLM):
  """A family registered from outside tunix_zoo."""

@register_config("toyllama_1m")
def toyllama_1m():
  return ToyConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                   head_dim=16, intermediate_size=64)
'''

CHECK = '''
import json
from tunix_zoo import AutoModel, ModelNaming, registry
from tunix_zoo.config import count_parameters
naming = ModelNaming(model_id="acme/ToyLlama-1M")
model = AutoModel.from_config(naming.model_id)
print(json.dumps(dict(
    families=sorted(registry.family_names()),
    config_id=naming.model_config_id, category=naming.model_config_category,
    model=type(model).__name__, parameters=count_parameters(model.config))))
'''


def test_entry_point_plugin_registers_a_family_from_outside(tmp_path):
  (tmp_path / "toyzoo.py").write_text(textwrap.dedent(PLUGIN))
  dist = tmp_path / "toyzoo-0.1.dist-info"
  dist.mkdir()
  (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: toyzoo\nVersion: 0.1\n")
  (dist / "entry_points.txt").write_text("[tunix_zoo.families]\ntoy = toyzoo\n")
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.getcwd()])}
  result = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 0, result.stderr
  found = json.loads(result.stdout.strip().splitlines()[-1])
  assert "toyllama" in found["families"] and "qwen3" in found["families"]
  assert found["config_id"] == "toyllama_1m" and found["category"] == "toyllama"
  assert found["model"] == "ToyLlama"
  assert found["parameters"] == 64 * 32 * 2 + 2 * (32 * 32 + 2 * 16 * 32 + 32 * 32
                                                    + 3 * 32 * 64 + 2 * 32) + 32
