"""Tokenizer against transformers' AutoTokenizer on a small real byte-level BPE.

The tokenizer is trained with the tokenizers library on a few sentences and saved with
a ChatML (Qwen-style) chat template; ids, decoded text and rendered chats must equal
what transformers makes of the same folder.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest
import tokenizers
import transformers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from tunix_zoo.errors import TokenizerError
from tunix_zoo.tokenizer import Tokenizer

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "JAX transforms numerical functions: grad, jit, vmap and pmap.",
    "Flax NNX modules hold their parameters as plain Python attributes.",
    "Sharded checkpoints load straight onto a device mesh, shard by shard.",
    "Héllo wörld! Ça va? 你好，世界。 Emojis too: 🦊🚀",
    "def add(a, b):\n    return a + b\n",
]
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin|>"]
TEXTS = [
    "The lazy fox jumps.",
    "  leading spaces and trailing   ",
    "Unseen words: zebra quantum xylophone 42!",
    "Ça va? 你好 🦊",
    "<|im_start|>user\nhi<|im_end|>",
    "tabs\tand\nnew lines\n\n",
    "",
]

# A shortened Qwen2.5 template with what makes it hard: tools as JSON, a default system
# prompt, tool calls and responses, namespace, loop controls, raise_exception.
CHATML = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(turns=0) %}
{%- for message in messages %}
    {%- if message.role not in ['system', 'user', 'assistant', 'tool'] %}
        {{- raise_exception('Unknown role: ' + message.role) }}
    {%- endif %}
    {%- if message.role == 'system' and loop.first %}
        {%- continue %}
    {%- endif %}
    {%- set ns.turns = ns.turns + 1 %}
    {%- if message.role == 'assistant' and message.tool_calls is defined %}
        {{- '<|im_start|>assistant' }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {{- '\\n<tool_call>\\n{"name": "' + tool_call.function.name + '", "arguments": ' }}
            {{- tool_call.function.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == 'tool' %}
        {{- '<|im_start|>user\\n<tool_response>\\n' + message.content }}
        {{- '\\n</tool_response><|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}"""

CONVERSATIONS = {
    "one_user_turn": [{"role": "user", "content": "What is JAX?"}],
    "system_and_turns": [
        {"role": "system", "content": "Answer in <b>one</b> line & be kind."},
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello. Ça va?"},
        {"role": "user", "content": "你好"},
    ],
    "tool_call": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": {
            "name": "get_weather", "arguments": {"city": "Paris", "unit": "°C"}}}]},
        {"role": "tool", "content": '{"temperature": 21}'},
    ],
}
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather <now> & later",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]


def train_backend() -> tokenizers.Tokenizer:
  backend = tokenizers.Tokenizer(models.BPE())
  backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  backend.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=400, special_tokens=SPECIAL,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
  )
  backend.train_from_iterator(CORPUS, trainer)
  return backend


@pytest.fixture(scope="module")
def backend() -> tokenizers.Tokenizer:
  return train_backend()


def save_folder(folder: pathlib.Path, backend: tokenizers.Tokenizer, **config) -> pathlib.Path:
  folder.mkdir(parents=True, exist_ok=True)
  backend.save(str(folder / "tokenizer.json"))
  config = {"tokenizer_class": "PreTrainedTokenizerFast", **config}
  (folder / "tokenizer_config.json").write_text(json.dumps(config))
  return folder


@pytest.fixture(scope="module")
def chatml_folder(tmp_path_factory, backend) -> pathlib.Path:
  return save_folder(
      tmp_path_factory.mktemp("chatml"), backend,
      eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None, chat_template=CHATML,
  )


def test_encode_and_decode_match_transformers(chatml_folder):
  ours = Tokenizer.from_pretrained(chatml_folder)
  theirs = transformers.AutoTokenizer.from_pretrained(chatml_folder)
  for text in TEXTS:
    for add_special in (True, False):
      ids = ours.encode(text, add_special_tokens=add_special)
      assert ids == theirs.encode(text, add_special_tokens=add_special), text
    for skip in (True, False):
      assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(
          ids, skip_special_tokens=skip), text
  assert ours.batch_encode(TEXTS) == theirs(TEXTS)["input_ids"]
  assert ours.vocab_size == len(theirs)


def test_round_trip_and_special_tokens(chatml_folder):
  tokenizer = Tokenizer.from_pretrained(chatml_folder)
  for text in TEXTS[:4] + CORPUS:
    assert tokenizer.decode(tokenizer.encode(text)) == text
  marked = "<|im_start|>user\nhi<|im_end|>"
  ids = tokenizer.encode(marked)
  assert ids[0] == tokenizer.token_to_id("<|im_start|>")
  assert tokenizer.decode(ids) == "user\nhi"
  assert tokenizer.decode(ids, skip_special_tokens=False) == marked
  assert tokenizer.decode(np.asarray(ids)) == "user\nhi"
  assert tokenizer.bos_id() is None
  assert tokenizer.pad_id() == tokenizer.token_to_id("<|endoftext|>")
  assert tokenizer.eos_ids == (tokenizer.token_to_id("<|im_end|>"),)


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_chat_template_matches_transformers(chatml_folder, name, add_generation_prompt):
  ours = Tokenizer.from_pretrained(chatml_folder)
  theirs = transformers.AutoTokenizer.from_pretrained(chatml_folder)
  messages = CONVERSATIONS[name]
  for tools in (None, TOOLS):
    kwargs = dict(add_generation_prompt=add_generation_prompt, tools=tools)
    text = ours.apply_chat_template(messages, **kwargs)
    assert text == theirs.apply_chat_template(messages, tokenize=False, **kwargs)
    ids = ours.apply_chat_template(messages, tokenize=True, **kwargs)
    assert ids == theirs.apply_chat_template(messages, tokenize=True, return_dict=False, **kwargs)
    assert ours.decode(ids, skip_special_tokens=False) == text
  assert ours.apply_chat_template(messages).endswith("<|im_start|>assistant\n")


def test_template_helpers_and_variables_match_transformers(tmp_path, backend):
  template = (
      "{{ bos_token }}|{{ eos_token }}|{{ strftime_now('%Y') }}|{{ {'a': '<&>'} | tojson }}|"
      "{{ dict(x=1) | tojson }}|{% for m in messages %}{% if loop.index > 1 %}{% break %}"
      "{% endif %}{% generation %}{{ m.content }}{% endgeneration %}{% endfor %}|"
      "{{ enable_thinking }}|{{ add_generation_prompt }}"
  )
  folder = save_folder(tmp_path, backend, bos_token="<|begin|>", eos_token="<|im_end|>",
                       chat_template=template)
  ours = Tokenizer.from_pretrained(folder)
  theirs = transformers.AutoTokenizer.from_pretrained(folder)
  messages = CONVERSATIONS["system_and_turns"]
  for kwargs in ({}, {"enable_thinking": False}):
    expected = theirs.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, **kwargs)
    assert ours.apply_chat_template(messages, **kwargs) == expected
  assert expected.startswith("<|begin|>|<|im_end|>|")


def test_named_templates_in_config_and_files_as_transformers_saves_them(tmp_path, backend):
  tool_template = "TOOLS {{ (tools or []) | length }} " + CHATML
  folder = save_folder(tmp_path / "listed", backend, eos_token="<|im_end|>", chat_template=[
      {"name": "default", "template": CHATML}, {"name": "tool_use", "template": tool_template},
  ])
  saved = tmp_path / "saved"
  transformers.AutoTokenizer.from_pretrained(folder).save_pretrained(saved)
  assert (saved / "chat_template.jinja").is_file()
  assert (saved / "additional_chat_templates" / "tool_use.jinja").is_file()
  messages = CONVERSATIONS["one_user_turn"]
  for source in (folder, saved):
    ours = Tokenizer.from_pretrained(source)
    theirs = transformers.AutoTokenizer.from_pretrained(source)
    for tools in (None, TOOLS):
      assert ours.apply_chat_template(messages, tools=tools) == theirs.apply_chat_template(
          messages, tools=tools, tokenize=False, add_generation_prompt=True)
    assert ours.apply_chat_template(messages, tools=TOOLS).startswith("TOOLS 1<|im_start|>")
    by_name = ours.apply_chat_template(messages, chat_template="tool_use")
    assert by_name.startswith("TOOLS 0<|im_start|>")
    assert ours.apply_chat_template(messages, chat_template="{{ messages | length }}") == "1"


def test_single_template_file_wins_over_config(tmp_path, backend):
  folder = save_folder(tmp_path, backend, eos_token="<|im_end|>", chat_template="from config")
  (folder / "chat_template.jinja").write_text("from file {{ messages[0].content }}")
  ours = Tokenizer.from_pretrained(folder)
  theirs = transformers.AutoTokenizer.from_pretrained(folder)
  messages = CONVERSATIONS["one_user_turn"]
  assert ours.apply_chat_template(messages) == "from file What is JAX?"
  assert ours.apply_chat_template(messages) == theirs.apply_chat_template(messages, tokenize=False)


@pytest.mark.parametrize("flags", [
    {"add_bos_token": True}, {"add_bos_token": True, "add_eos_token": True},
    {"add_bos_token": False}, {},
], ids=["bos", "bos_eos", "no_bos", "unset"])
def test_add_bos_and_eos_token_apply_without_a_post_processor(tmp_path, backend, flags):
  """As transformers applies them when given (its Llama/Gemma classes pass them)."""
  tokens = dict(bos_token="<|begin|>", eos_token="<|endoftext|>")
  folder = save_folder(tmp_path, backend, **tokens, **flags)
  ours = Tokenizer.from_pretrained(folder)
  theirs = transformers.PreTrainedTokenizerFast(
      tokenizer_file=str(folder / "tokenizer.json"), **tokens, **flags)
  for text in TEXTS:
    assert ours.encode(text) == theirs.encode(text), text
    assert ours.encode(text, add_special_tokens=False) == theirs.encode(
        text, add_special_tokens=False)
  ids = ours.encode("fox")
  assert (ids[0] == ours.bos_id()) == bool(flags.get("add_bos_token"))
  assert (ids[-1] == ours.eos_ids[0]) == bool(flags.get("add_eos_token"))


def test_post_processor_of_tokenizer_json_wins_over_config_flags(tmp_path):
  backend = train_backend()
  backend.post_processor = processors.TemplateProcessing(
      single="<|begin|> $A", special_tokens=[("<|begin|>", backend.token_to_id("<|begin|>"))])
  folder = save_folder(tmp_path, backend, bos_token="<|begin|>", add_bos_token=False)
  ours = Tokenizer.from_pretrained(folder)
  theirs = transformers.AutoTokenizer.from_pretrained(folder)
  for text in TEXTS:
    assert ours.encode(text) == theirs.encode(text), text
  assert ours.encode("fox")[0] == ours.bos_id() == backend.token_to_id("<|begin|>")


def test_special_token_missing_from_vocab_gets_the_id_transformers_gives(tmp_path, backend):
  eot = {"__type": "AddedToken", "content": "<|eot|>", "special": True}
  folder = save_folder(tmp_path, backend, eos_token=eot)
  ours = Tokenizer.from_pretrained(folder)
  theirs = transformers.AutoTokenizer.from_pretrained(folder)
  assert ours.eos_ids == (theirs.eos_token_id,) == (backend.get_vocab_size(),)
  assert ours.encode("dog <|eot|>") == theirs.encode("dog <|eot|>")
  assert ours.decode(ours.encode("dog <|eot|>")) == "dog "


def test_ids_from_generation_config_and_special_tokens_map(tmp_path, backend):
  folder = save_folder(tmp_path, backend)
  (folder / "special_tokens_map.json").write_text(json.dumps(
      {"eos_token": {"content": "<|im_end|>", "lstrip": False}, "pad_token": "<|endoftext|>"}))
  (folder / "generation_config.json").write_text(json.dumps(
      {"bos_token_id": 3, "eos_token_id": [0, 2], "pad_token_id": 1}))
  tokenizer = Tokenizer.from_pretrained(folder)
  im_end = tokenizer.token_to_id("<|im_end|>")
  assert im_end == 2
  assert tokenizer.eos_ids == (2, 0)
  # generation_config's BOS is not the tokenizer's (Qwen's names <|endoftext|> but no
  # prompt starts with it).
  assert tokenizer.bos_id() is None
  assert tokenizer.pad_id() == tokenizer.token_to_id("<|endoftext|>") == 0
  assert transformers.AutoTokenizer.from_pretrained(folder).eos_token == "<|im_end|>"


def test_missing_tokenizer_json_says_what_to_do(tmp_path):
  with pytest.raises(TokenizerError, match="does not exist"):
    Tokenizer.from_pretrained(tmp_path / "absent")
  with pytest.raises(TokenizerError, match="no tokenizer.json"):
    Tokenizer.from_pretrained(tmp_path)
  (tmp_path / "tokenizer.model").write_bytes(b"\x00")
  with pytest.raises(TokenizerError, match="save_pretrained"):
    Tokenizer.from_pretrained(tmp_path)


def test_malformed_files_raise_tokenizer_error(tmp_path, backend):
  folder = save_folder(tmp_path, backend)
  (folder / "tokenizer_config.json").write_text("{not json")
  with pytest.raises(TokenizerError, match="not valid JSON"):
    Tokenizer.from_pretrained(folder)
  (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": [{"x": 1}]}))
  with pytest.raises(TokenizerError, match="named templates|objects"):
    Tokenizer.from_pretrained(folder)
  (folder / "tokenizer.json").write_text('{"model": 3}')
  with pytest.raises(TokenizerError, match="tokenizers library"):
    Tokenizer.from_pretrained(folder)


@pytest.mark.parametrize("template, message", [
    ("{{ raise_exception('roles must alternate') }}", "roles must alternate"),
    ("{{ messages.append(1) }}", "'append' of 'list' object is unsafe"),
    ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "'__class__' of 'str' object is unsafe"),
    ("{% set ns = namespace(_secret=1) %}", "underscore"),
    ("{% for %}", "not valid jinja"),
])
def test_template_errors_and_sandbox(tmp_path, backend, template, message):
  folder = save_folder(tmp_path, backend, chat_template=template)
  with pytest.raises(TokenizerError, match=message):
    Tokenizer.from_pretrained(folder).apply_chat_template(CONVERSATIONS["one_user_turn"])


def test_no_chat_template(tmp_path, backend):
  tokenizer = Tokenizer.from_pretrained(save_folder(tmp_path, backend))
  with pytest.raises(TokenizerError, match="no chat template"):
    tokenizer.apply_chat_template(CONVERSATIONS["one_user_turn"])
  folder = save_folder(tmp_path / "named", backend, chat_template=[
      {"name": "tool_use", "template": "x"}])
  with pytest.raises(TokenizerError, match="none is the default"):
    Tokenizer.from_pretrained(folder).apply_chat_template(CONVERSATIONS["one_user_turn"])
