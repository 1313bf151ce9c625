"""``Tokenizer``: a checkpoint folder's tokenizer.json and chat template, without transformers.

Reads the files transformers writes (``tokenizer.json``, ``tokenizer_config.json``,
``special_tokens_map.json``, ``generation_config.json``, ``chat_template.jinja`` and
``additional_chat_templates/*.jinja``) and gives the same token ids and the same rendered
chat as ``transformers.AutoTokenizer`` for tokenizers whose pipeline lives in
tokenizer.json::

    tokenizer = Tokenizer.from_pretrained("/ckpt/Qwen3-0.6B")
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi!"}])
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    text = tokenizer.decode(ids)
    tokenizer.eos_ids  # every id that ends a generation

Chat templates are untrusted code from the Hub: they run in jinja2's immutable sandbox,
with the same helpers transformers gives them (``raise_exception``, ``strftime_now``, a
``tojson`` that does not escape HTML, ``namespace`` refusing dunder attributes).
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import pathlib
from typing import Any, Iterable, Mapping, Sequence

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.parser
import jinja2.sandbox
import numpy as np
import tokenizers
from tokenizers import processors

from tunix_zoo.errors import TokenizerError

__all__ = ["Tokenizer"]

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_FILE = "special_tokens_map.json"
GENERATION_CONFIG_FILE = "generation_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
CHAT_TEMPLATE_DIR = "additional_chat_templates"
# The named special tokens transformers passes to chat templates, in its order.
SPECIAL_TOKEN_NAMES = (
    "bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token",
)
DEFAULT_TEMPLATE_NAME = "default"
SENTENCEPIECE_FILE = "tokenizer.model"
GEMMA_SPECIAL_TOKENS = {
    "bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>", "pad_token": "<pad>",
    "mask_token": "<mask>",
}
# Gemma's instruction-tuned chat template (as its tokenizer_config.json ships it).
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role "
    "not supported') }}{% endif %}{% for message in messages %}{% if (message['role'] == "
    "'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must "
    "alternate user/assistant/user/assistant/...') }}{% endif %}{% if (message['role'] == "
    "'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + "
    "'<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{'<start_of_turn>model\n'}}{% endif %}"
)
TOOL_TEMPLATE_NAME = "tool_use"


class Tokenizer:
  """Text to token ids and back, plus the model's chat template.

  Build it with :meth:`from_pretrained`; the constructor takes already-parsed parts.

  Example::

      tokenizer = Tokenizer.from_pretrained("/ckpt/Llama-3.2-1B-Instruct")
      tokenizer.encode("Hello")          # [128000, 9906]: BOS added as tokenizer.json says
      tokenizer.decode([128000, 9906])   # 'Hello'
  """

  def __init__(
      self,
      backend: tokenizers.Tokenizer,
      *,
      special_tokens: Mapping[str, str] | None = None,
      chat_template: str | Mapping[str, str] | None = None,
      generation_config: Mapping[str, Any] | None = None,
  ):
    """Wraps a ``tokenizers.Tokenizer``.

    Args:
      backend: the tokenizer; its post-processor decides what ``encode`` adds.
      special_tokens: named special tokens (``bos_token``, ``eos_token``, ``pad_token``...)
        to their text.
      chat_template: one jinja template, or templates by name (``"default"``,
        ``"tool_use"``...).
      generation_config: a parsed generation_config.json; its ``eos_token_id`` (an id or
        a list) adds stop ids.
    """
    self.backend = backend
    self.special_tokens = {k: v for k, v in (special_tokens or {}).items() if v is not None}
    self.chat_template = (
        dict(chat_template) if isinstance(chat_template, Mapping) else chat_template
    )
    self.generation_config = dict(generation_config or {})
    # Plain encodes: a padding or truncation saved in tokenizer.json is not what callers of
    # encode() expect (transformers switches them off unless asked, too).
    self.backend.no_padding()
    self.backend.no_truncation()

  # -- loading ------------------------------------------------------------------------
  @classmethod
  def from_pretrained(cls, folder: str | os.PathLike[str]) -> Tokenizer:
    """Loads the tokenizer of a checkpoint folder (or a folder of tokenizer files).

    Raises:
      TokenizerError: the folder has no tokenizer.json, or a file in it is malformed.
    """
    folder = pathlib.Path(folder)
    path = folder / TOKENIZER_FILE
    if not path.is_file() and (folder / SENTENCEPIECE_FILE).is_file():
      return cls.from_sentencepiece(folder / SENTENCEPIECE_FILE)
    if not path.is_file():
      raise TokenizerError(_missing_tokenizer_message(folder))
    try:
      backend = tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises bare Exceptions for malformed files.
      raise TokenizerError(
          f"{path} is not a tokenizer.json the tokenizers library can read ({e}); download "
          "it again."
      ) from e
    config = _read_json(folder / CONFIG_FILE)
    special_tokens = {name: _token_text(config.get(name)) for name in SPECIAL_TOKEN_NAMES}
    # transformers reads the legacy special_tokens_map.json only when the config does
    # not list its added tokens; its entries then win.
    if "added_tokens_decoder" not in config:
      for name, value in _read_json(folder / SPECIAL_TOKENS_FILE).items():
        if name in SPECIAL_TOKEN_NAMES and value:
          special_tokens[name] = _token_text(value)
    special_tokens = {k: v for k, v in special_tokens.items() if v is not None}
    _add_missing_special_tokens(backend, special_tokens.values())
    # tokenizer.json's post-processor decides what encode() adds, as in transformers 5;
    # only without one do the config's flags (as transformers' model-specific classes
    # apply them, e.g. Llama's add_bos_token).
    if backend.post_processor is None:
      backend.post_processor = _bos_eos_processor(
          backend,
          special_tokens.get("bos_token") if config.get("add_bos_token") else None,
          special_tokens.get("eos_token") if config.get("add_eos_token") else None,
      )
    return cls(
        backend,
        special_tokens=special_tokens,
        chat_template=_read_chat_templates(folder, config),
        generation_config=_read_json(folder / GENERATION_CONFIG_FILE),
    )

  @classmethod
  def from_sentencepiece(cls, path: str | os.PathLike[str]) -> Tokenizer:
    """A Gemma SentencePiece ``tokenizer.model`` (as Kaggle's Flax Gemmas ship it).

    Converted for ``tokenizers`` as transformers' ``GemmaTokenizer`` converts it (BPE with
    byte fallback, merges in vocabulary order), so both give the same ids; Gemma's
    ``<bos>`` starts each encode, ``<eos>`` and ``<end_of_turn>`` end a generation, and
    the Gemma chat template applies.

    Example::

        tokenizer = Tokenizer.from_sentencepiece("/kaggle/gemma2-2b-it/tokenizer.model")
    """
    backend, pieces = _sentencepiece_backend(pathlib.Path(path))
    special_tokens = {name: token for name, token in GEMMA_SPECIAL_TOKENS.items()
                      if token in pieces}
    _add_missing_special_tokens(backend, special_tokens.values())
    backend.post_processor = _bos_eos_processor(backend, special_tokens.get("bos_token"), None)
    stops = [backend.token_to_id(t) for t in ("<eos>", "<end_of_turn>") if t in pieces]
    return cls(backend, special_tokens=special_tokens, chat_template=GEMMA_CHAT_TEMPLATE,
               generation_config={"eos_token_id": stops} if stops else None)

  def save_hf_files(self, folder: str | os.PathLike[str]) -> None:
    """Writes tokenizer.json, tokenizer_config.json and chat_template.jinja into
    ``folder``, as transformers reads them (for an HF export of an orbax checkpoint whose
    tokenizer is a SentencePiece model)."""
    folder = pathlib.Path(folder)
    self.backend.save(str(folder / TOKENIZER_FILE))
    config = {**self.special_tokens, "add_bos_token": True, "add_eos_token": False,
              "tokenizer_class": "GemmaTokenizer", "padding_side": "left"}
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    if isinstance(self.chat_template, str):
      (folder / CHAT_TEMPLATE_FILE).write_text(self.chat_template, encoding="utf-8")

  # -- ids ----------------------------------------------------------------------------
  @property
  def vocab_size(self) -> int:
    """The number of ids, added tokens included."""
    return self.backend.get_vocab_size(with_added_tokens=True)

  def token_to_id(self, token: str) -> int | None:
    """The id of one token's text, or None when it is not in the vocabulary."""
    return self.backend.token_to_id(token)

  # Methods, not properties: Tunix's TokenizerAdapter calls bos_id(), eos_id(), pad_id().
  def bos_id(self) -> int | None:
    """The id of ``bos_token``; None for tokenizers without one (Qwen)."""
    return self._special_id("bos_token")

  def eos_id(self) -> int | None:
    """The first of :attr:`eos_ids` (what Tunix stops on by default); None if none."""
    return self.eos_ids[0] if self.eos_ids else None

  def pad_id(self) -> int | None:
    """The id of ``pad_token``; where the tokenizer names none (Llama 3), :meth:`eos_id`,
    as Tunix does for such HF tokenizers."""
    pad = self._special_id("pad_token")
    return self.eos_id() if pad is None else pad

  @property
  def eos_ids(self) -> tuple[int, ...]:
    """Every id that ends a generation: the tokenizer's EOS, then generation_config's."""
    ids = [] if self._special_id("eos_token") is None else [self._special_id("eos_token")]
    configured = self.generation_config.get("eos_token_id")
    if configured is not None:
      ids.extend(configured if isinstance(configured, list) else [configured])
    return tuple(dict.fromkeys(int(i) for i in ids))

  def _special_id(self, name: str) -> int | None:
    token = self.special_tokens.get(name)
    return None if token is None else self.token_to_id(token)

  # -- text ---------------------------------------------------------------------------
  def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
    """Token ids of ``text``; ``add_special_tokens`` adds what the tokenizer adds (BOS...).

    Example::

        tokenizer.encode("Hello world")  # [128000, 9906, 1917]
    """
    return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

  def batch_encode(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
    """``encode`` of many texts at once (in parallel in the tokenizers library), unpadded.

    Example::

        tokenizer.batch_encode(["Hello", "Hello world"])  # [[128000, 9906], [128000, 9906, 1917]]
    """
    encodings = self.backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)
    return [encoding.ids for encoding in encodings]

  def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
    """The text of token ids (a list, or a 1-D numpy / jax array).

    Example::

        tokenizer.decode([128000, 9906, 1917])  # 'Hello world'
    """
    return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

  # -- chat ---------------------------------------------------------------------------
  def apply_chat_template(
      self,
      messages: Sequence[Mapping[str, Any]],
      add_generation_prompt: bool = True,
      tokenize: bool = False,
      *,
      chat_template: str | None = None,
      tools: Sequence[Mapping[str, Any]] | None = None,
      documents: Sequence[Mapping[str, Any]] | None = None,
      **template_kwargs: Any,
  ) -> str | list[int]:
    """Renders a conversation with the model's chat template.

    Unlike transformers, ``add_generation_prompt`` defaults to True and ``tokenize`` to
    False: the usual call makes a prompt to generate from.

    Args:
      messages: ``[{"role": "user", "content": "..."}, ...]``; keys whose value is None
        are dropped, as transformers does.
      add_generation_prompt: end with the header of an assistant turn.
      tokenize: return token ids (without adding special tokens again) instead of text.
      chat_template: a template name (of a folder with several) or jinja source; by
        default the folder's default template (``"tool_use"`` when ``tools`` are given
        and the folder has one).
      tools: JSON schemas of tools, for templates that support them.
      documents: retrieval documents, for templates that support them.
      **template_kwargs: more template variables, e.g. ``enable_thinking=False``.

    Raises:
      TokenizerError: no chat template, or the template rejected the messages.

    Example::

        tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}])
        # '<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n'
    """
    template = self._select_template(chat_template, tools)
    context = {
        **self.special_tokens,
        **template_kwargs,
        "messages": [{k: v for k, v in m.items() if v is not None} for m in messages],
        "tools": tools,
        "documents": documents,
        "add_generation_prompt": add_generation_prompt,
    }
    try:
      rendered = _compile(template).render(**_plain(context))
    except jinja2.TemplateError as e:
      raise TokenizerError(f"The chat template cannot render these messages: {e}") from e
    return self.encode(rendered, add_special_tokens=False) if tokenize else rendered

  def _select_template(self, chat_template: str | None, tools: Any) -> str:
    templates = self.chat_template
    if isinstance(templates, dict):
      if chat_template is not None:
        return templates.get(chat_template, chat_template)
      if tools is not None and TOOL_TEMPLATE_NAME in templates:
        return templates[TOOL_TEMPLATE_NAME]
      if DEFAULT_TEMPLATE_NAME in templates:
        return templates[DEFAULT_TEMPLATE_NAME]
      raise TokenizerError(
          f"This tokenizer has chat templates {sorted(templates)} and none is the default; "
          "pass chat_template=<one of those names>."
      )
    if chat_template is not None:
      return chat_template
    if templates is None:
      raise TokenizerError(
          "This tokenizer has no chat template (no chat_template in tokenizer_config.json "
          "and no chat_template.jinja): pass chat_template=<jinja source>, or use the "
          "instruction-tuned checkpoint's tokenizer."
      )
    return templates


def _sentencepiece_backend(path: pathlib.Path) -> tuple[tokenizers.Tokenizer, dict[str, int]]:
  """``tokenizer.model`` as transformers 5 converts it for ``GemmaTokenizer``."""
  import sentencepiece
  from sentencepiece import sentencepiece_model_pb2

  try:
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(path.read_bytes())
    processor = sentencepiece.SentencePieceProcessor(model_proto=proto.SerializeToString())
  except Exception as e:  # protobuf and sentencepiece raise their own error types.
    raise TokenizerError(
        f"{path} is not a SentencePiece model ({e}): download it again, or give the folder "
        "a tokenizer.json (transformers' `AutoTokenizer.from_pretrained(folder)"
        ".save_pretrained(folder)` writes one).") from e
  if proto.trainer_spec.model_type != sentencepiece_model_pb2.TrainerSpec.BPE:
    raise TokenizerError(f"{path} is not a BPE SentencePiece model (Gemma's kind); tunix_zoo "
                         "reads only those. Convert it to tokenizer.json with transformers.")
  vocab = {piece.piece: n for n, piece in enumerate(proto.pieces)}
  merges = []
  for merged, rank in vocab.items():
    pairs = [(merged[:k], merged[k:]) for k in range(1, len(merged))
             if merged[:k] in vocab and merged[k:] in vocab]
    merges.extend((left, right, rank) for left, right in
                  sorted(pairs, key=lambda p: (vocab[p[0]], vocab[p[1]])))
  merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])))
  unk = proto.pieces[processor.unk_id()].piece
  backend = tokenizers.Tokenizer(tokenizers.models.BPE(
      vocab=vocab, merges=[(left, right) for left, right, _ in merges], fuse_unk=True,
      unk_token=unk, byte_fallback=True))
  backend.pre_tokenizer = tokenizers.pre_tokenizers.Split(
      pattern=" ", behavior="merged_with_previous", invert=False)
  backend.decoder = tokenizers.decoders.Sequence([
      tokenizers.decoders.Replace("▁", " "), tokenizers.decoders.ByteFallback(),
      tokenizers.decoders.Fuse()])
  backend.normalizer = tokenizers.normalizers.Replace(" ", "▁")
  control, user_defined = sentencepiece_model_pb2.ModelProto.SentencePiece.CONTROL, \
      sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED
  # Control pieces are special (decode may skip them); user-defined ones are plain text.
  backend.add_special_tokens([tokenizers.AddedToken(p.piece, normalized=False, special=True)
                              for p in proto.pieces if p.type == control])
  backend.add_tokens([tokenizers.AddedToken(p.piece, normalized=False, special=False)
                      for p in proto.pieces if p.type == user_defined])
  return backend, vocab


def _missing_tokenizer_message(folder: pathlib.Path) -> str:
  if not folder.is_dir():
    return (
        f"Tokenizer folder {folder} does not exist; pass the checkpoint folder holding "
        f"{TOKENIZER_FILE}."
    )
  return (
      f"{folder} has no {TOKENIZER_FILE}. Download the checkpoint's tokenizer files "
      f"({TOKENIZER_FILE}, {CONFIG_FILE}) into it, or point at the folder that has them."
  )


def _read_json(path: pathlib.Path) -> dict[str, Any]:
  """A JSON object file's content; {} when the file is absent."""
  if not path.is_file():
    return {}
  try:
    content = json.loads(path.read_text(encoding="utf-8"))
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise TokenizerError(f"{path} is not valid JSON ({e}); download it again.") from e
  if not isinstance(content, dict):
    raise TokenizerError(f"{path} holds a JSON {type(content).__name__}, not an object.")
  return content


def _token_text(value: Any) -> str | None:
  """A special token as config files spell it: text, or an AddedToken dict."""
  if isinstance(value, dict):
    value = value.get("content")
  return value if isinstance(value, str) else None


def _add_missing_special_tokens(backend: tokenizers.Tokenizer, tokens: Iterable[str]) -> None:
  """Special tokens the config names but the vocabulary lacks get new ids, as transformers
  gives them, so both agree on every id."""
  missing = [t for t in dict.fromkeys(tokens) if backend.token_to_id(t) is None]
  if missing:
    backend.add_special_tokens([tokenizers.AddedToken(t, special=True) for t in missing])


def _bos_eos_processor(
    backend: tokenizers.Tokenizer, bos: str | None, eos: str | None
) -> processors.TemplateProcessing:
  """The post-processor transformers builds from add_bos_token / add_eos_token."""
  single = " ".join([*([f"{bos}:0"] if bos else []), "$A:0", *([f"{eos}:0"] if eos else [])])
  pair = " ".join([
      single, *([f"{bos}:1"] if bos else []), "$B:1", *([f"{eos}:1"] if eos else []),
  ])
  special = [(token, backend.token_to_id(token)) for token in (bos, eos) if token]
  return processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)


def _read_chat_templates(
    folder: pathlib.Path, config: Mapping[str, Any]
) -> str | dict[str, str] | None:
  """Template files as transformers 5 saves them, else tokenizer_config's chat_template."""
  files: dict[str, str] = {}
  if (folder / CHAT_TEMPLATE_FILE).is_file():
    files[DEFAULT_TEMPLATE_NAME] = (folder / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
  for path in sorted((folder / CHAT_TEMPLATE_DIR).glob("*.jinja")):
    files[path.name.removesuffix(".jinja")] = path.read_text(encoding="utf-8")
  if files:
    return files[DEFAULT_TEMPLATE_NAME] if list(files) == [DEFAULT_TEMPLATE_NAME] else files
  template = config.get("chat_template")
  if isinstance(template, list):
    try:
      return {entry["name"]: entry["template"] for entry in template}
    except (KeyError, TypeError) as e:
      raise TokenizerError(
          f"{folder / CONFIG_FILE}: chat_template is a list, but not of "
          '{"name": ..., "template": ...} objects.'
      ) from e
  if template is not None and not isinstance(template, str):
    raise TokenizerError(
        f"{folder / CONFIG_FILE}: chat_template is a {type(template).__name__}; it must be "
        "jinja source or a list of named templates."
    )
  return template


class _GenerationTag(jinja2.ext.Extension):
  """``{% generation %}...{% endgeneration %}`` marks assistant text for training masks in
  transformers; rendering keeps the text, so templates using it render the same."""

  tags = {"generation"}

  def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
    lineno = next(parser.stream).lineno
    body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
    return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

  def _render(self, caller: Any) -> str:
    return caller()


class _TemplateNamespace(jinja2.utils.Namespace):
  """``namespace()`` refusing underscore attributes, the way into Python internals."""

  def __init__(*args: Any, **kwargs: Any) -> None:  # Jinja's signature: self may be a kwarg.
    self, args = args[0], args[1:]
    attrs = dict(*args, **kwargs)
    for name in attrs:
      _TemplateNamespace._check_name(name)
    jinja2.utils.Namespace.__init__(self, attrs)

  def __setitem__(self, name: str, value: Any) -> None:
    _TemplateNamespace._check_name(name)
    jinja2.utils.Namespace.__setitem__(self, name, value)

  @staticmethod
  def _check_name(name: Any) -> None:
    if isinstance(name, str) and name.startswith("_"):
      raise jinja2.exceptions.SecurityError(
          f"Chat templates cannot set underscore attributes on a namespace ({name!r})."
      )


def _raise_exception(message: str) -> None:
  raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any, ensure_ascii: bool = False, indent: int | None = None,
    separators: tuple[str, str] | None = None, sort_keys: bool = False,
) -> str:
  # Jinja's own tojson escapes <, >, & for HTML, which would change the prompt's text.
  return json.dumps(
      value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
  )


def _strftime_now(pattern: str) -> str:
  return datetime.datetime.now().strftime(pattern)


@functools.lru_cache(maxsize=16)
def _compile(source: str) -> jinja2.Template:
  env = jinja2.sandbox.ImmutableSandboxedEnvironment(
      trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
  )
  env.filters["tojson"] = _tojson
  env.globals.update(
      raise_exception=_raise_exception, strftime_now=_strftime_now,
      namespace=_TemplateNamespace, dict=_TemplateDict(),
  )
  try:
    return env.from_string(source)
  except jinja2.TemplateSyntaxError as e:
    raise TokenizerError(f"The chat template is not valid jinja (line {e.lineno}): {e}") from e


class _TemplateDict:
  """``dict`` for templates: calling it and ``fromkeys``, without the class's attributes."""

  def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
    return dict(*args, **kwargs)

  def fromkeys(self, *args: Any) -> dict[Any, Any]:
    return dict.fromkeys(*args)


def _plain(value: Any) -> Any:
  """``value`` rebuilt from plain JSON types, so templates see no objects with methods.

  Subclasses of str, int and float (enums) lose their extra methods; anything else
  (arrays, images) becomes a ``"<TypeName>"`` placeholder, as in transformers: templates
  only test such fields for presence.
  """
  if value is None or type(value) in (str, int, float, bool):
    return value
  if isinstance(value, str):
    return str.__str__(value)
  if isinstance(value, int):
    return int.__int__(value)
  if isinstance(value, float):
    return float.__float__(value)
  if isinstance(value, Mapping):
    return {_plain(k): _plain(v) for k, v in value.items()}
  if isinstance(value, list):
    return [_plain(v) for v in value]
  if isinstance(value, tuple):
    return tuple(_plain(v) for v in value)
  if isinstance(value, np.generic):
    return _plain(value.item())
  return f"<{type(value).__name__}>"
