"""The architecture fields the shared layers consume, and config.json reading.

Every family's config dataclass derives from :class:`DecoderConfig`; a family says
only how its config.json differs. Both spellings of config.json are read: the one
transformers 5 writes (``rope_parameters``, ``layer_types``, ``dtype``) and the one
published checkpoints use (``rope_theta``, ``rope_scaling``, ``torch_dtype``).

Example::

    cfg = Qwen3Config.from_hf_config(json.load(open("config.json")))
    cfg.num_layers, cfg.rope.theta
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

FULL_ATTENTION = "full_attention"
SLIDING_ATTENTION = "sliding_attention"


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
  def from_hf(cls, params: dict[str, Any] | None, theta: float) -> "RopeConfig":
    """Reads a ``rope_scaling`` / ``rope_parameters`` dict (either spelling)."""
    params = dict(params or {})
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    if kind not in ("default", "linear", "llama3"):
      from tunix_zoo.errors import ConfigMismatchError

      raise ConfigMismatchError(
          f"rope type {kind!r} is not supported (supported: default, linear, llama3)."
      )
    return cls(
        theta=float(params.get("rope_theta", theta)),
        kind=kind,
        factor=float(params.get("factor", 1.0)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(
            params.get("original_max_position_embeddings", 8192)
        ),
    )

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


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  """A decoder-only transformer, described by the features the shared layers offer."""

  model_type: ClassVar[str] = ""
  architecture: ClassVar[str] = ""

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
      from tunix_zoo.errors import ConfigMismatchError

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
  def from_hf_config(cls, hf: dict[str, Any]) -> "DecoderConfig":
    """Builds the config from a checkpoint's config.json (either spelling)."""
    return cls(**cls.hf_fields(hf))

  @classmethod
  def hf_fields(cls, hf: dict[str, Any]) -> dict[str, Any]:
    """The fields every Llama-style config.json spells the same way."""
    top, hf = hf, text_config(hf)
    num_heads = hf["num_attention_heads"]
    fields: dict[str, Any] = dict(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=hf.get("num_key_value_heads") or num_heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
        intermediate_size=hf["intermediate_size"],
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope=read_rope(hf),
        max_position_embeddings=hf.get("max_position_embeddings", 8192),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        hidden_act=hf.get("hidden_act") or "silu",
        **_token_ids(hf, top),
    )
    return fields

  def to_hf_config(self) -> dict[str, Any]:
    """config.json in the Hub spelling (what transformers 4 and 5 both read)."""
    return {
        "architectures": [self.architecture],
        "model_type": self.model_type,
        "vocab_size": self.vocab_size,
        "hidden_size": self.hidden_size,
        "num_hidden_layers": self.num_layers,
        "num_attention_heads": self.num_heads,
        "num_key_value_heads": self.num_kv_heads,
        "head_dim": self.head_dim,
        "intermediate_size": self.intermediate_size,
        "rms_norm_eps": self.norm_eps,
        "rope_theta": self.rope.theta,
        "rope_scaling": self.rope.to_hf(),
        "max_position_embeddings": self.max_position_embeddings,
        "tie_word_embeddings": self.tie_word_embeddings,
        "hidden_act": self.hidden_act,
        **{name: list(value) if isinstance(value, tuple) else value
           for name in TOKEN_ID_FIELDS if (value := getattr(self, name)) is not None},
    }


TOKEN_ID_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def _token_ids(text: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
  """The special token ids of a config.json (a multimodal one may keep them at its top)."""
  ids: dict[str, Any] = {}
  for name in TOKEN_ID_FIELDS:
    value = text.get(name, top.get(name))
    if isinstance(value, list):
      value = tuple(value) if len(value) != 1 else value[0]
    ids[name] = value
  return ids


def text_config(hf: dict[str, Any]) -> dict[str, Any]:
  """The language model part of a config.json (multimodal configs nest it)."""
  return hf.get("text_config") or hf


def read_rope(hf: dict[str, Any], layer_type: str | None = None) -> RopeConfig:
  """The rope of a config.json, from ``rope_parameters`` or ``rope_theta``/``rope_scaling``.

  ``layer_type`` picks one entry when ``rope_parameters`` is a dict per layer type.
  """
  params = hf.get("rope_parameters")
  if params and layer_type and layer_type in params:
    params = params[layer_type]
  elif params and FULL_ATTENTION in params:
    params = params[FULL_ATTENTION]
  if params:
    return RopeConfig.from_hf(params, float(params.get("rope_theta", 10_000.0)))
  return RopeConfig.from_hf(hf.get("rope_scaling"), float(hf.get("rope_theta", 10_000.0)))


def read_sliding_window(
    hf: dict[str, Any], num_layers: int, *, every_layer: bool = False
) -> dict[str, Any]:
  """``sliding_window`` and ``layer_types`` of a Qwen config.json (both spellings).

  The window counts only under ``use_sliding_window``; it then covers the layers from
  ``max_window_layers`` on (``every_layer``: all of them, as Qwen3-MoE does), unless
  ``layer_types`` says otherwise.
  """
  if not hf.get("use_sliding_window") or not hf.get("sliding_window"):
    return dict(sliding_window=None, layer_types=())
  if every_layer:
    types = (SLIDING_ATTENTION,) * num_layers
  else:
    first = hf.get("max_window_layers", 28)
    types = tuple(hf.get("layer_types") or (
        SLIDING_ATTENTION if i >= first else FULL_ATTENTION for i in range(num_layers)
    ))
  if SLIDING_ATTENTION not in types:
    return dict(sliding_window=None, layer_types=())
  return dict(sliding_window=int(hf["sliding_window"]), layer_types=types)


def sliding_window_hf(config: DecoderConfig) -> dict[str, Any]:
  """The Qwen config.json keys that say where the sliding window applies."""
  if SLIDING_ATTENTION not in config.layer_types:
    return dict(use_sliding_window=False, sliding_window=None, max_window_layers=config.num_layers)
  return dict(
      use_sliding_window=True,
      sliding_window=config.sliding_window,
      max_window_layers=config.layer_types.index(SLIDING_ATTENTION),
      layer_types=list(config.layer_types),
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
