"""``tunix-zoo export`` of an orbax (Kaggle Flax) Gemma checkpoint into an HF folder.

The orbax checkpoints are made from transformers reference weights (tests/orbax_reference.py),
so transformers' conversion (``convert_gemma3_weights.py``: the inverse transforms, then
``astype(float32)`` and a cast to the target torch dtype) gives back exactly those
weights: the export must equal them bit for bit, in float32 and in bfloat16.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from safetensors.torch import load_file as load_torch

from tests import orbax_reference, reference
from tunix_zoo import cli
from tunix_zoo.tokenizer import Tokenizer

CASES = ["gemma2", "gemma3"]


@pytest.fixture(scope="module")
def made(tmp_path_factory):
  return {case: orbax_reference.make_case(case, tmp_path_factory.mktemp(case)) for case in CASES}


def export(root, out, case, *extra):
  argv = ["export", str(root), str(out), "--model-id", orbax_reference.preset_id(case),
          "--mesh", "1x1", *extra]
  assert cli.main(argv) == 0


@pytest.mark.parametrize("case", CASES)
def test_export_equals_transformers_weights_bit_for_bit(made, case, tmp_path):
  hf, root, torch_model = made[case]
  export(root, tmp_path / "out", case)
  original = load_file(hf / "model.safetensors")
  exported = load_file(tmp_path / "out" / "model.safetensors")
  assert sorted(exported) == sorted(original)
  for key, value in original.items():
    assert exported[key].dtype == value.dtype and exported[key].tobytes() == value.tobytes(), key
  # transformers reads the folder as is: config, weights and tokenizer.
  import transformers

  model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
  tokens, mask, positions = reference.left_padded_batch()
  np.testing.assert_array_equal(reference.reference_logits(model, tokens, mask, positions),
                                reference.reference_logits(torch_model, tokens, mask, positions))
  hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
  ours = Tokenizer.from_pretrained(root)
  for text in ("Hello world", "<start_of_turn>user\nHi<end_of_turn>", "tabs\tand 🙂"):
    assert hf_tokenizer(text)["input_ids"] == ours.encode(text), text
  assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == \
      torch_model.config.vocab_size


def test_bfloat16_export_equals_transformers_cast(made, tmp_path):
  hf, root, _ = made["gemma3"]
  export(root, tmp_path / "out", "gemma3", "--out-dtype", "bfloat16")
  original = load_torch(hf / "model.safetensors")
  exported = load_torch(tmp_path / "out" / "model.safetensors")
  for key, value in original.items():
    # What convert_gemma3_weights.py's update_tree does to each converted leaf.
    expected = torch.from_numpy(value.numpy().astype("float32")).type(torch.bfloat16)
    assert torch.equal(exported[key].view(torch.int16), expected.view(torch.int16)), key


def test_export_without_a_preset_exits_2_with_the_advice(made, tmp_path, capsys):
  _, root, _ = made["gemma2"]
  assert cli.main(["export", str(root), str(tmp_path / "out"), "--mesh", "1x1"]) == 2
  assert "Pass the preset as model_id (CLI: --model-id)" in capsys.readouterr().err
  assert not (tmp_path / "out").exists()
