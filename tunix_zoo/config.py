"""The architecture fields the shared layers consume, and config.json as data.

Every family's config dataclass derives from :class:`DecoderConfig` and states how its
config.json differs in three tables: ``HF_FIELDS`` (config.json key <-> field, default,
reader), ``HF_TRANSFORMS`` (the irregular keys: rope, layer types, MoE, as named
transforms) and ``HF_UNSUPPORTED`` (switches the shared layers cannot honour). One
generic :meth:`DecoderConfig.from_hf_config` / :meth:`DecoderConfig.to_hf_config` reads
and writes every family from them, validating each value (type, range, divisibility)
before anything is built: a bad config.json raises :class:`ConfigError` naming the key,
the value and the fix.

Both spellings of config.json are read: the one transformers 5 writes
(``rope_parameters``, ``layer_types``, ``dtype``) and the one published checkpoints use
(``rope_theta``, ``rope_scaling``, ``torch_dtype``).

Example::

    cfg = Qwen3Config.from_hf_config(json.load(open("config.json")))
    cfg.num_layers, cfg.rope.theta
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, ClassVar, Mapping, Protocol

from tunix_zoo.errors import ConfigError, ConfigMismatchError

FULL_ATTENTION = "full_attention"
SLIDING_ATTENTION = "sliding_attention"
ROPE_KINDS = ("default", "linear", "llama3")
# Training vocabulary that the CLI's parser reads before anything imports jax.
REMAT_MODES = ("none", "layer", "attention")  # what the backward pass recomputes
# Module paths (``re.fullmatch``) that get LoRA adapters by default: every projection.
DEFAULT_LORA_MODULE_PATH = ".*q_proj|.*k_proj|.*v_proj|.*o_proj|.*gate_proj|.*up_proj|.*down_proj"
# Array dimensions beyond int32 are no model's; far fewer layers than this were ever
# published (126), and a layer count is walked per layer before any weight is read.
MAX_DIM = 2**31 - 1
MAX_LAYERS = 10_000
# A config.json nests at most a few levels (text_config -> rope_parameters -> per layer
# type); anything deeper is not a model config, and is refused before it is walked.
MAX_NESTING = 8


# -- readers: a config.json value -> a field value, by meaning, never by truthiness ------
def _bad(key: str, value: Any, expected: str, fix: str | None = None) -> ConfigError:
  shown = repr(value)
  shown = shown if len(shown) <= 80 else shown[:77] + "..."
  return ConfigError(
      f"config.json key {key!r} is {shown} ({type(value).__name__}); expected {expected}. "
      + (fix or f"Write {key!r} as {expected}, as the checkpoint's transformers config does.")
  )


def read_int(value: Any, key: str, *, minimum: int = 0, maximum: int = MAX_DIM) -> int:
  """An integer in ``[minimum, maximum]``; a float holding a whole number counts (``4096.0``)."""
  if isinstance(value, float) and value.is_integer():
    value = int(value)
  expected = f"an integer from {minimum} to {maximum}"
  if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
    raise _bad(key, value, expected)
  return value


def read_positive_int(value: Any, key: str) -> int:
  return read_int(value, key, minimum=1)


def read_layer_count(value: Any, key: str) -> int:
  return read_int(value, key, minimum=1, maximum=MAX_LAYERS)


def read_float(value: Any, key: str, *, positive: bool = False) -> float:
  """A finite number (``positive``: above zero)."""
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise _bad(key, value, "a positive number" if positive else "a number")
  value = float(value)
  if not math.isfinite(value) or (positive and value <= 0):
    raise _bad(key, value, "a finite positive number" if positive else "a finite number")
  return value


def read_positive_float(value: Any, key: str) -> float:
  return read_float(value, key, positive=True)


def read_bool(value: Any, key: str) -> bool:
  """``true`` / ``false`` (or 0 / 1). The string ``"false"`` is refused, not read as true."""
  if isinstance(value, bool):
    return value
  if isinstance(value, int) and value in (0, 1):
    return bool(value)
  raise _bad(key, value, "true or false",
             f"Write {key!r} as a JSON boolean (true or false, without quotes).")


def read_str(value: Any, key: str) -> str:
  if not isinstance(value, str) or not value:
    raise _bad(key, value, "a non-empty string")
  return value


def read_int_list(value: Any, key: str) -> tuple[int, ...]:
  if not isinstance(value, (list, tuple)):
    raise _bad(key, value, "a list of integers")
  return tuple(read_int(v, key) for v in value)


def read_token_ids(value: Any, key: str) -> int | tuple[int, ...]:
  """One id, or several (``eos_token_id: [1, 106]``); a one-element list is its id."""
  if isinstance(value, (list, tuple)):
    ids = read_int_list(value, key)
    return ids[0] if len(ids) == 1 else ids
  return read_int(value, key)


def _json_value(value: Any) -> Any:
  return list(value) if isinstance(value, tuple) else value


def int_if_whole(value: float | None) -> float | int | None:
  """``256.0`` -> ``256`` (transformers 5 validates some float-valued keys as ints)."""
  return int(value) if value is not None and float(value).is_integer() else value


class _Required:
  def __repr__(self) -> str:
    return "REQUIRED"


REQUIRED: Any = _Required()


@dataclasses.dataclass(frozen=True)
class HFField:
  """One config.json key and the config field it fills.

  ``default`` (in config.json terms, so it goes through ``read``) is what transformers
  assumes when the key is absent; ``derive(hf, fields)`` computes it from the keys
  already read instead. ``null`` means absent unless ``nullable``. ``aliases`` are other
  spellings, read before ``key``; ``also_write`` names keys written besides ``key``.

  Example::

      HFField("num_key_value_heads", "num_kv_heads", read_positive_int,
              derive=lambda hf, fields: fields["num_heads"])
  """

  key: str
  field: str
  read: Callable[[Any, str], Any] = lambda value, key: value
  default: Any = REQUIRED
  derive: Callable[[Mapping[str, Any], dict[str, Any]], Any] | None = None
  nullable: bool = False
  aliases: tuple[str, ...] = ()
  write: Callable[[Any], Any] = _json_value
  also_write: tuple[str, ...] = ()

  def read_from(self, hf: Mapping[str, Any], fields: dict[str, Any]) -> Any:
    for key in (*self.aliases, self.key):
      if key in hf and (hf[key] is not None or self.nullable):
        return None if hf[key] is None else self.read(hf[key], key)
    if self.derive is not None:
      return self.derive(hf, fields)
    if self.default is REQUIRED:
      raise ConfigError(
          f"config.json has no {self.key!r}, which this architecture needs; use the "
          "config.json that belongs to these weights (or add the key)."
      )
    return None if self.default is None else self.read(self.default, self.key)


def with_defaults(table: tuple[HFField, ...], **defaults: Any) -> tuple[HFField, ...]:
  """``table`` with other defaults, by config.json key (a family's transformers defaults)."""
  unknown = set(defaults) - {f.key for f in table}
  assert not unknown, f"no such keys in the table: {unknown}"
  return tuple(
      dataclasses.replace(f, default=defaults[f.key], derive=None) if f.key in defaults else f
      for f in table
  )


def replacing(table: tuple[HFField, ...], *rows: HFField) -> tuple[HFField, ...]:
  """``table`` with the rows of the same keys replaced, and new keys appended."""
  by_key = {row.key: row for row in rows}
  kept = tuple(by_key.pop(f.key, f) for f in table)
  return kept + tuple(by_key.values())


class HFTransform(Protocol):
  """An irregular part of config.json: keys that fill fields jointly, or depend on each
  other. ``read`` fills ``fields`` from the (text) config and its multimodal top level;
  ``write`` adds the keys to ``out``."""

  def read(self, hf: Mapping[str, Any], top: Mapping[str, Any], fields: dict[str, Any]) -> None:
    ...

  def write(self, config: "DecoderConfig", out: dict[str, Any]) -> None:
    ...


@dataclasses.dataclass(frozen=True)
class RopeConfig:
  """Rotary embedding of one layer type: base frequency and optional scaling."""

  theta: float = 10_000.0
  kind: str = "default"  # "default", "linear" or "llama3"
  factor: float = 1.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192

  @classmethod
  def from_hf(
      cls, params: Any, theta: float, key: str = "rope_scaling"
  ) -> "RopeConfig":
    """Reads a ``rope_scaling`` / ``rope_parameters`` dict (either spelling)."""
    if params is None:
      params = {}
    if not isinstance(params, Mapping):
      raise _bad(key, params, "an object (or null)",
                 f"Write {key!r} as a JSON object such as "
                 '{"rope_type": "linear", "factor": 8.0}, or null for no scaling.')
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    if kind not in ROPE_KINDS:
      raise ConfigMismatchError(
          f"{key}: rope type {kind!r} is not supported (supported: {', '.join(ROPE_KINDS)})."
      )

    def number(name: str, default: float) -> float:
      return read_positive_float(params.get(name, default), f"{key}.{name}")

    # Only the fields a kind uses are read, as transformers' rope functions read them: a
    # "default" rope with a stray "factor" is unscaled there too (and exports as such).
    scaling: dict[str, Any] = {}
    if kind != "default":
      scaling["factor"] = number("factor", 1.0)
    if kind == "llama3":
      scaling.update(
          low_freq_factor=number("low_freq_factor", 1.0),
          high_freq_factor=number("high_freq_factor", 4.0),
          original_max_position_embeddings=read_positive_int(
              params.get("original_max_position_embeddings", 8192),
              f"{key}.original_max_position_embeddings",
          ),
      )
    return cls(theta=number("rope_theta", theta), kind=kind, **scaling)

  def to_hf(self) -> dict[str, Any] | None:
    """The Hub spelling of ``rope_scaling`` (None when unscaled)."""
    if self.kind == "default":
      return None
    out: dict[str, Any] = {"rope_type": self.kind, "factor": self.factor}
    if self.kind == "llama3":
      out.update(
          low_freq_factor=self.low_freq_factor,
          high_freq_factor=self.high_freq_factor,
          original_max_position_embeddings=self.original_max_position_embeddings,
      )
    return out


# -- named transforms shared by several families -----------------------------------------
TOKEN_ID_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")


@dataclasses.dataclass(frozen=True)
class TokenIds:
  """Special token ids. A multimodal config.json's top level wins over its text config:
  it is what the whole model generates with (Gemma 3: ``eos_token_id: [1, 106]`` at the
  top, transformers' text default ``1`` inside)."""

  def read(self, hf: Mapping[str, Any], top: Mapping[str, Any], fields: dict[str, Any]) -> None:
    for name in TOKEN_ID_FIELDS:
      value = top.get(name) if top is not hf and top.get(name) is not None else hf.get(name)
      fields[name] = None if value is None else read_token_ids(value, name)

  def write(self, config: "DecoderConfig", out: dict[str, Any]) -> None:
    for name in TOKEN_ID_FIELDS:
      if (value := getattr(config, name)) is not None:
        out[name] = _json_value(value)


def read_rope(hf: Mapping[str, Any], theta: float = 10_000.0) -> RopeConfig:
  """The rope of a config.json, from ``rope_parameters`` or ``rope_theta``/``rope_scaling``."""
  params = hf.get("rope_parameters")
  if params is not None and not isinstance(params, Mapping):
    raise _bad("rope_parameters", params, "an object")
  if params and FULL_ATTENTION in params:
    return RopeConfig.from_hf(params[FULL_ATTENTION], theta, f"rope_parameters.{FULL_ATTENTION}")
  if params:
    return RopeConfig.from_hf(params, theta, "rope_parameters")
  theta = read_positive_float(hf.get("rope_theta", theta), "rope_theta")
  return RopeConfig.from_hf(hf.get("rope_scaling"), theta)


@dataclasses.dataclass(frozen=True)
class Rope:
  """``rope`` from ``rope_parameters`` (transformers 5) or ``rope_theta`` + ``rope_scaling``
  (Hub); ``theta`` is the family's default base."""

  theta: float = 10_000.0

  def read(self, hf: Mapping[str, Any], top: Mapping[str, Any], fields: dict[str, Any]) -> None:
    fields["rope"] = read_rope(hf, self.theta)

  def write(self, config: "DecoderConfig", out: dict[str, Any]) -> None:
    out.update(rope_theta=config.rope.theta, rope_scaling=config.rope.to_hf())


def alternating_layer_types(num_layers: int, period: int) -> tuple[str, ...]:
  """Every ``period``-th layer (1-based) is full attention, the rest slide: transformers' rule."""
  return tuple(
      SLIDING_ATTENTION if (i + 1) % period else FULL_ATTENTION for i in range(num_layers)
  )


def normalized_layer_types(types: tuple[str, ...]) -> tuple[str, ...]:
  """``()`` when every layer is full attention, so both spellings compare equal."""
  return () if all(t == FULL_ATTENTION for t in types) else tuple(types)


def read_layer_types(value: Any, num_layers: int) -> tuple[str, ...]:
  kinds = (FULL_ATTENTION, SLIDING_ATTENTION)
  if not isinstance(value, (list, tuple)) or any(t not in kinds for t in value):
    raise _bad("layer_types", value, f"a list of {' / '.join(map(repr, kinds))}")
  if len(value) != num_layers:
    raise ConfigError(
        f"config.json 'layer_types' has {len(value)} entries for num_hidden_layers="
        f"{num_layers}; give one entry per layer."
    )
  return tuple(value)


@dataclasses.dataclass(frozen=True)
class LayerPattern:
  """Local/global layers (Gemma 2 and 3): ``layer_types`` as written, else every
  ``period``-th layer is global, the period read from ``period_key`` when the family has
  one (Gemma 3's ``sliding_window_pattern``)."""

  period: int
  period_key: str | None = None

  def read(self, hf: Mapping[str, Any], top: Mapping[str, Any], fields: dict[str, Any]) -> None:
    num_layers = fields["num_layers"]
    if hf.get("layer_types") is not None:
      types = read_layer_types(hf["layer_types"], num_layers)
    else:
      period = self.period
      if self.period_key is not None and hf.get(self.period_key) is not None:
        period = read_positive_int(hf[self.period_key], self.period_key)
      types = alternating_layer_types(num_layers, period)
    fields["layer_types"] = normalized_layer_types(types)

  def write(self, config: "DecoderConfig", out: dict[str, Any]) -> None:
    out["layer_types"] = list(config.layer_types or [FULL_ATTENTION] * config.num_layers)
    if self.period_key is None:
      return
    for period in range(1, config.num_layers + 1):
      derived = normalized_layer_types(alternating_layer_types(config.num_layers, period))
      if derived == config.layer_types:
        out[self.period_key] = period
        return


@dataclasses.dataclass(frozen=True)
class QwenSlidingWindow:
  """Qwen's ``sliding_window``: it counts only under ``use_sliding_window``, and then
  covers the layers from ``max_window_layers`` on (``every_layer(hf)``: all of them, as
  Qwen3-MoE does), unless ``layer_types`` says otherwise."""

  every_layer: Callable[[Mapping[str, Any]], bool] = lambda hf: False

  def read(self, hf: Mapping[str, Any], top: Mapping[str, Any], fields: dict[str, Any]) -> None:
    num_layers = fields["num_layers"]
    fields.update(sliding_window=None, layer_types=())
    on = hf.get("use_sliding_window")
    window = hf.get("sliding_window", 4096)  # transformers' default; null means none
    if on is None or not read_bool(on, "use_sliding_window") or window is None:
      return
    window = read_int(window, "sliding_window")
    if window == 0:
      return
    if self.every_layer(hf):
      types = (SLIDING_ATTENTION,) * num_layers
    elif hf.get("layer_types") is not None:
      types = read_layer_types(hf["layer_types"], num_layers)
    else:
      first = read_int(hf.get("max_window_layers", 28), "max_window_layers")
      types = tuple(
          SLIDING_ATTENTION if i >= first else FULL_ATTENTION for i in range(num_layers)
      )
    if SLIDING_ATTENTION in types:
      fields.update(sliding_window=window, layer_types=types)

  def write(self, config: "DecoderConfig", out: dict[str, Any]) -> None:
    if SLIDING_ATTENTION not in config.layer_types:
      out.update(use_sliding_window=False, sliding_window=None,
                 max_window_layers=config.num_layers)
      return
    out.update(
        use_sliding_window=True,
        sliding_window=config.sliding_window,
        max_window_layers=config.layer_types.index(SLIDING_ATTENTION),
        layer_types=list(config.layer_types),
    )


# -- the keys every Llama-style config.json spells the same way --------------------------
LLAMA_FIELDS: tuple[HFField, ...] = (
    HFField("vocab_size", "vocab_size", read_positive_int),
    HFField("hidden_size", "hidden_size", read_positive_int),
    HFField("num_hidden_layers", "num_layers", read_layer_count),
    HFField("num_attention_heads", "num_heads", read_positive_int),
    HFField("num_key_value_heads", "num_kv_heads", read_positive_int,
            derive=lambda hf, fields: fields["num_heads"]),
    HFField("head_dim", "head_dim", read_positive_int,
            derive=lambda hf, fields: fields["hidden_size"] // fields["num_heads"]),
    HFField("intermediate_size", "intermediate_size", read_positive_int),
    HFField("rms_norm_eps", "norm_eps", read_positive_float, default=1e-6),
    HFField("max_position_embeddings", "max_position_embeddings", read_positive_int,
            default=8192),
    HFField("tie_word_embeddings", "tie_word_embeddings", read_bool, default=False),
    HFField("hidden_act", "hidden_act", read_str, default="silu"),
)


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  """A decoder-only transformer, described by the features the shared layers offer."""

  model_type: ClassVar[str] = ""
  architecture: ClassVar[str] = ""
  # config.json <-> fields; see the module docstring.
  HF_FIELDS: ClassVar[tuple[HFField, ...]] = LLAMA_FIELDS
  HF_TRANSFORMS: ClassVar[tuple[HFTransform, ...]] = (TokenIds(), Rope())
  # Switches the shared layers cannot honour: key -> what it would need.
  HF_UNSUPPORTED: ClassVar[Mapping[str, str]] = {}
  # Keys written as they are (what transformers needs to read the family back).
  HF_CONSTANTS: ClassVar[Mapping[str, Any]] = {}

  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  intermediate_size: int
  norm_eps: float = 1e-6
  rope: RopeConfig = RopeConfig()
  # Rope of sliding-window layers when it differs from ``rope`` (Gemma 3).
  local_rope: RopeConfig | None = None
  max_position_embeddings: int = 8192
  tie_word_embeddings: bool = False
  attention_bias: bool = False
  qk_norm: bool = False
  hidden_act: str = "silu"
  # Gemma's norms scale by (1 + w): the stored weight is offset by this much.
  norm_offset: float = 0.0
  scale_embeddings: bool = False
  # Gemma 2/3: extra norms after attention and around the MLP.
  sandwich_norms: bool = False
  query_pre_attn_scalar: float | None = None
  attn_logit_softcap: float | None = None
  final_logit_softcap: float | None = None
  sliding_window: int | None = None
  # One entry per layer; empty means every layer is full attention.
  layer_types: tuple[str, ...] = ()
  # Mixture of experts (Qwen3-MoE); num_experts == 0 means dense.
  num_experts: int = 0
  num_experts_per_tok: int = 0
  moe_intermediate_size: int = 0
  decoder_sparse_step: int = 1
  mlp_only_layers: tuple[int, ...] = ()
  norm_topk_prob: bool = False
  router_aux_loss_coef: float = 0.0
  # Special token ids as config.json gives them, written back on export. Not part of
  # equality or hashing: they change no computation, so models differing only in them
  # share compiled programs.
  bos_token_id: int | None = dataclasses.field(default=None, compare=False)
  eos_token_id: int | tuple[int, ...] | None = dataclasses.field(default=None, compare=False)
  pad_token_id: int | None = dataclasses.field(default=None, compare=False)

  def __post_init__(self) -> None:
    if self.layer_types and len(self.layer_types) != self.num_layers:
      raise ConfigMismatchError(
          f"layer_types has {len(self.layer_types)} entries for {self.num_layers} layers."
      )

  @property
  def attention_scale(self) -> float:
    return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

  def layer_type(self, layer: int) -> str:
    return self.layer_types[layer] if self.layer_types else FULL_ATTENTION

  def layer_window(self, layer: int) -> int | None:
    """The sliding window of a layer, None for full attention."""
    return self.sliding_window if self.layer_type(layer) == SLIDING_ATTENTION else None

  def layer_rope(self, layer: int) -> RopeConfig:
    if self.layer_type(layer) == SLIDING_ATTENTION and self.local_rope is not None:
      return self.local_rope
    return self.rope

  def is_sparse_layer(self, layer: int) -> bool:
    """Whether ``layer`` is a mixture of experts (transformers' Qwen3-MoE rule)."""
    return (
        self.num_experts > 0
        and layer not in self.mlp_only_layers
        and (layer + 1) % self.decoder_sparse_step == 0
    )

  def replace(self, **changes: Any) -> "DecoderConfig":
    return dataclasses.replace(self, **changes)

  # -- config.json -------------------------------------------------------------
  @classmethod
  def from_hf_config(cls, hf: Any) -> "DecoderConfig":
    """Builds the config from a checkpoint's config.json (either spelling).

    Raises ConfigError for a value of the wrong type or range, a missing key or heads
    that do not divide; ConfigMismatchError for a switch the family cannot honour.

    Example::

        cfg = Llama3Config.from_hf_config({"vocab_size": 128, "hidden_size": 64, ...})
    """
    top = check_structure(hf)
    text = text_config(top)
    for key, why in cls.HF_UNSUPPORTED.items():
      if text.get(key) is not None and read_bool(text[key], key):
        raise ConfigMismatchError(f"This config.json sets {key}=true: {why}")
    fields: dict[str, Any] = {}
    for row in cls.HF_FIELDS:
      fields[row.field] = row.read_from(text, fields)
    for transform in cls.HF_TRANSFORMS:
      transform.read(text, top, fields)
    check_fields(fields)
    return cls(**fields)

  def to_hf_config(self) -> dict[str, Any]:
    """config.json in the Hub spelling (what transformers 4 and 5 both read).

    Example::

        json.dump(cfg.to_hf_config(), open("config.json", "w"))
    """
    out: dict[str, Any] = {"architectures": [self.architecture], "model_type": self.model_type}
    for row in self.HF_FIELDS:
      value = row.write(getattr(self, row.field))
      for key in (row.key, *row.also_write):
        out[key] = value
    out.update(self.HF_CONSTANTS)
    for transform in self.HF_TRANSFORMS:
      transform.write(self, out)
    return out


def text_config(hf: Mapping[str, Any]) -> Mapping[str, Any]:
  """The language model part of a config.json (multimodal configs nest it)."""
  nested = hf.get("text_config")
  if nested is None:
    return hf
  if not isinstance(nested, Mapping):
    raise _bad("text_config", nested, "an object (the language model's config)")
  return nested or hf


def check_structure(hf: Any) -> Mapping[str, Any]:
  """``hf`` if it is a JSON object nested no deeper than :data:`MAX_NESTING`."""
  if not isinstance(hf, Mapping):
    raise ConfigError(
        f"config.json holds {type(hf).__name__ if hf is not None else 'null'}, not an "
        "object; use the config.json that belongs to these weights."
    )
  stack = [(hf, 1)]
  while stack:
    node, depth = stack.pop()
    if depth > MAX_NESTING:
      raise ConfigError(
          f"config.json nests deeper than {MAX_NESTING} levels, which no model config "
          "does; use the config.json that belongs to these weights."
      )
    children = node.values() if isinstance(node, Mapping) else node
    stack += [(c, depth + 1) for c in children if isinstance(c, (Mapping, list, tuple))]
  return hf


def check_fields(fields: Mapping[str, Any]) -> None:
  """What holds between fields: heads divide, layer indices exist, experts fit."""
  heads, kv_heads = fields["num_heads"], fields["num_kv_heads"]
  if fields["head_dim"] < 1:
    raise ConfigError(
        f"config.json gives no head_dim and hidden_size={fields['hidden_size']} is smaller "
        f"than num_attention_heads={heads}; add the checkpoint's head_dim."
    )
  if heads % kv_heads:
    raise ConfigError(
        f"config.json num_attention_heads={heads} is not a multiple of "
        f"num_key_value_heads={kv_heads}; grouped-query attention needs it to be."
    )
  num_layers = fields["num_layers"]
  bad = [i for i in fields.get("mlp_only_layers", ()) if i >= num_layers]
  if bad:
    raise ConfigError(
        f"config.json mlp_only_layers names layers {bad} of a {num_layers}-layer model; "
        "give indices below num_hidden_layers."
    )
  experts = fields.get("num_experts", 0)
  if experts and not 0 < fields["num_experts_per_tok"] <= experts:
    raise ConfigError(
        f"config.json num_experts_per_tok={fields['num_experts_per_tok']} does not fit "
        f"num_experts={experts}; a token is routed to 1..num_experts experts."
    )


def count_parameters(config: DecoderConfig, *, active: bool = False) -> int:
  """The parameters of ``config``'s model, from its fields alone (nothing is built).

  ``active``: count only what one token uses (``num_experts_per_tok`` of ``num_experts``
  experts in a mixture of experts). ``tests/models/test_configs.py`` checks both against
  the shapes of the built model for every preset.

  Example::

      count_parameters(registry.get_config("qwen3_30b_a3b"), active=True)  # ~3.3e9
  """
  c = config
  q_dim, kv_dim = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
  attention = 2 * c.hidden_size * (q_dim + kv_dim)
  if c.attention_bias:
    attention += q_dim + 2 * kv_dim
  if c.qk_norm:
    attention += 2 * c.head_dim
  norms = (4 if c.sandwich_norms else 2) * c.hidden_size
  dense_mlp = 3 * c.hidden_size * c.intermediate_size
  experts = c.num_experts_per_tok if active else c.num_experts
  sparse_mlp = c.hidden_size * c.num_experts + 3 * experts * c.hidden_size * c.moe_intermediate_size
  layers = sum(
      attention + norms + (sparse_mlp if c.is_sparse_layer(layer) else dense_mlp)
      for layer in range(c.num_layers)
  )
  embeddings = c.vocab_size * c.hidden_size * (1 if c.tie_word_embeddings else 2)
  return embeddings + layers + c.hidden_size
