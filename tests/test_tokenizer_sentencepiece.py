"""Gemma SentencePiece ``tokenizer.model`` against transformers' GemmaTokenizer.

A small BPE model with Gemma's special pieces and byte fallback is trained in the test
(tests/orbax_reference.py); ids and decoded text must be identical to transformers' on
every string.
"""

from __future__ import annotations

import pathlib

import pytest

from tests import orbax_reference
from tunix_zoo.errors import TokenizerError
from tunix_zoo.tokenizer import Tokenizer

STRINGS = [
    "Hello world", "The lazy fox", "  two  spaces ", "tabs\tand\nnewlines", "ünïcödé ✓ 日本語",
    "<start_of_turn>user\nHi<end_of_turn>", "", "a", "return a + b", "emoji 🙂 falls back to bytes",
]


@pytest.fixture(scope="module")
def spm_folder(tmp_path_factory) -> pathlib.Path:
  folder = tmp_path_factory.mktemp("spm")
  orbax_reference.train_sentencepiece(folder / "tokenizer.model")
  return folder


def test_encode_decode_match_transformers_gemma_tokenizer(spm_folder):
  from transformers import GemmaTokenizer

  # Gemma checkpoints ship add_bos_token=True (transformers defaults to False without a
  # tokenizer_config.json); Gemma models need the <bos>.
  reference = GemmaTokenizer.from_pretrained(str(spm_folder), add_bos_token=True)
  ours = Tokenizer.from_pretrained(spm_folder)
  for text in STRINGS:
    expected = reference(text)["input_ids"]
    assert ours.encode(text) == expected, text
    assert ours.encode(text, add_special_tokens=False) == reference(
        text, add_special_tokens=False)["input_ids"], text
    assert ours.decode(expected) == reference.decode(expected, skip_special_tokens=True), text
    assert ours.decode(expected, skip_special_tokens=False) == reference.decode(expected), text
  assert ours.bos_id() == reference.bos_token_id == 2
  assert ours.pad_id() == reference.pad_token_id == 0


def test_gemma_chat_template_and_stop_ids(spm_folder):
  ours = Tokenizer.from_pretrained(spm_folder)
  prompt = ours.apply_chat_template([{"role": "user", "content": " Hi "}])
  assert prompt == "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
  assert set(ours.eos_ids) == {1, ours.token_to_id("<end_of_turn>")}


def test_a_file_that_is_not_sentencepiece_is_a_tokenizer_error(tmp_path):
  (tmp_path / "tokenizer.model").write_bytes(b"\x00garbage")
  with pytest.raises(TokenizerError, match="not a SentencePiece model"):
    Tokenizer.from_pretrained(tmp_path)
