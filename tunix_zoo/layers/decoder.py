"""The decoder-only language model every family is built from.

Call convention (the one Tunix models use, so RL code can call ours)::

    logits, cache = model(tokens)                       # plain causal forward
    cache = model.init_cache(batch_size=2, max_len=64)
    logits, cache = model(prompt, cache=cache, attention_mask=prompt_mask)
    logits, cache = model(next_token, cache=cache)      # one step of decoding

``attention_mask`` is a ``[B, T]`` padding mask (1 = real token) or a full boolean
``[B, T, S]`` mask; ``positions`` default to the count of real tokens before each one.

``remat`` trades compute for activation memory in training: ``"layer"`` keeps only each
decoder layer's input and recomputes the layer in the backward pass, ``"attention"``
recomputes the attention blocks only; ``"none"`` (the default) saves everything::

    model = Qwen3ForCausalLM(config, rngs=nnx.Rngs(0), remat="layer")
    model.remat = "none"  # may be changed between traces
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tunix_zoo import sharding
from tunix_zoo.config import DecoderConfig
from tunix_zoo.errors import RematError
from tunix_zoo.layers.attention import Attention, LayerCache, attention_masks
from tunix_zoo.layers.basic import Embedding, Linear, RMSNorm
from tunix_zoo.layers.mlp import GatedMLP
from tunix_zoo.layers.moe import collect_router_logits, record_router_logits

Cache = dict[str, Any]
REMAT_MODES = ("none", "layer", "attention")


def check_remat(mode: str) -> str:
  """``mode`` when it is one of :data:`REMAT_MODES`; else raises RematError."""
  if mode not in REMAT_MODES:
    raise RematError(f"remat={mode!r} is not a remat mode; choose one of {', '.join(REMAT_MODES)}.")
  return mode


def rematerialised(
    block: nnx.Module,
    x: jax.Array,
    positions: jax.Array,
    masks: dict[int | None, jax.Array],
    layer_cache: LayerCache | None,
    cache_index: jax.Array | int,
) -> tuple[jax.Array, LayerCache | None]:
  """``block(x, positions, masks, layer_cache, cache_index)`` under ``nnx.remat``: only its
  inputs are saved for the backward pass, which recomputes the rest."""
  # The masks' keys mix None and ints, which pytrees cannot sort: pass the values only.
  windows = tuple(masks)

  def run(block, x, positions, mask_values, layer_cache, cache_index):
    # Router logits must leave the inner trace as outputs, not through the collector.
    with collect_router_logits() as router_logits:
      out = block(x, positions, dict(zip(windows, mask_values)), layer_cache, cache_index)
    return out, tuple(router_logits)

  out, router_logits = nnx.remat(run)(
      block, x, positions, tuple(masks.values()), layer_cache, cache_index
  )
  for logits in router_logits:
    record_router_logits(logits)
  return out


class DecoderLayer(nnx.Module):
  """Pre-norm attention + MLP; Gemma 2/3 add norms after each ("sandwich")."""

  def __init__(
      self,
      config: DecoderConfig,
      layer: int,
      *,
      rngs: nnx.Rngs | None,
      dtype: Any = jnp.float32,
      param_dtype: Any = jnp.float32,
      mesh: Mesh | None = None,
      sharding_rules: sharding.Rules | None = None,
  ):
    c = config
    norm = lambda: RMSNorm.of(  # noqa: E731
        c.hidden_size, c, rngs=rngs, dtype=dtype, param_dtype=param_dtype
    )
    self.pre_attn_norm = norm()
    self.attn = Attention(
        c, layer, rngs=rngs, dtype=dtype, param_dtype=param_dtype, mesh=mesh,
        sharding_rules=sharding_rules,
    )
    self.post_attn_norm = norm() if c.sandwich_norms else None
    self.pre_mlp_norm = norm()
    self.mlp = self.make_mlp(config, layer, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.post_mlp_norm = norm() if c.sandwich_norms else None

  def make_mlp(self, config: DecoderConfig, layer: int, **kw: Any) -> nnx.Module:
    """The feed-forward block of ``layer``; mixture-of-experts families override it."""
    return GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act, **kw)

  def __call__(
      self,
      x: jax.Array,
      positions: jax.Array,
      masks: dict[int | None, jax.Array | None],
      layer_cache: LayerCache | None,
      cache_index: jax.Array | int,
      remat_attention: bool = False,
  ) -> tuple[jax.Array, LayerCache | None]:
    """The layer's output and updated cache; ``remat_attention`` recomputes the attention
    block in the backward pass instead of saving its activations."""
    args = (self.pre_attn_norm(x), positions, masks, layer_cache, cache_index)
    if remat_attention:
      h, layer_cache = rematerialised(self.attn, *args)
    else:
      h, layer_cache = self.attn(*args)
    if self.post_attn_norm is not None:
      h = self.post_attn_norm(h)
    x = x + h
    h = self.mlp(self.pre_mlp_norm(x))
    if self.post_mlp_norm is not None:
      h = self.post_mlp_norm(h)
    return x + h, layer_cache


class DecoderLM(nnx.Module):
  """Embedding, decoder layers, final norm and LM head (tied or not).

  Families subclass it and change only what differs (see ``tunix_zoo/models``).
  """

  layer_class: type[DecoderLayer] = DecoderLayer

  def __init__(
      self,
      config: DecoderConfig,
      *,
      rngs: nnx.Rngs | None,
      dtype: Any = jnp.float32,
      param_dtype: Any = jnp.float32,
      mesh: Mesh | None = None,
      sharding_rules: sharding.Rules | None = None,
      remat: str = "none",
  ):
    c = config
    self.config = config
    self.remat = check_remat(remat)
    self.dtype = dtype
    self.mesh = mesh
    self.sharding_rules = dict(sharding_rules) if sharding_rules is not None else None
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.embed_tokens = Embedding(c.vocab_size, c.hidden_size, **kw)
    self.layers = nnx.List([
        self.layer_class(c, i, **kw, mesh=mesh, sharding_rules=self.sharding_rules)
        for i in range(c.num_layers)
    ])
    self.final_norm = RMSNorm.of(
        c.hidden_size, c, rngs=rngs, dtype=dtype, param_dtype=param_dtype
    )
    self.lm_head = (
        None if c.tie_word_embeddings
        else Linear(c.hidden_size, c.vocab_size, ("vocab", "embed"), **kw)
    )

  # -- sharding of activations and cache ---------------------------------------------
  def _spec(self, logical: tuple[str | None, ...], shape: tuple[int, ...]) -> PartitionSpec:
    counts = {"kv_heads": self.config.num_kv_heads}
    return sharding.partition_spec(logical, shape, self.mesh, self.sharding_rules, counts)

  def _cache_specs(self, batch: int, max_len: int) -> Cache:
    kv = self._spec(
        ("batch", None, "kv_heads", None),
        (batch, max_len, self.config.num_kv_heads, self.config.head_dim),
    )
    return {
        "layers": [{"k": kv, "v": kv} for _ in range(self.config.num_layers)],
        "valid": self._spec(("batch", None), (batch, max_len)),
        "index": PartitionSpec(),
    }

  def init_cache(self, batch_size: int, max_len: int, dtype: Any = None) -> Cache:
    """An empty KV cache for ``batch_size`` rows of up to ``max_len`` tokens."""
    c = self.config
    dtype = dtype or self.dtype
    kv_shape = (batch_size, max_len, c.num_kv_heads, c.head_dim)
    shapes = {
        "layers": [{"k": (kv_shape, dtype), "v": (kv_shape, dtype)} for _ in range(c.num_layers)],
        "valid": ((batch_size, max_len), jnp.bool_),
        "index": ((), jnp.int32),
    }
    is_leaf = lambda x: isinstance(x, tuple) and isinstance(x[0], tuple)  # noqa: E731
    if self.mesh is None:
      return jax.tree.map(lambda sd: jnp.zeros(*sd), shapes, is_leaf=is_leaf)
    specs = self._cache_specs(batch_size, max_len)
    return jax.tree.map(
        lambda sd, spec: jnp.zeros(*sd, device=NamedSharding(self.mesh, spec)),
        shapes, specs, is_leaf=is_leaf,
    )

  # -- forward ------------------------------------------------------------------------
  def __call__(
      self,
      input_tokens: jax.Array,
      positions: jax.Array | None = None,
      cache: Cache | None = None,
      attention_mask: jax.Array | None = None,
  ) -> tuple[jax.Array, Cache | None]:
    """Logits ``[B, T, vocab]`` and the updated cache (None when none was given)."""
    if not sharding.has_explicit_axes(self.mesh):
      return self._forward(input_tokens, positions, cache, attention_mask)
    batch, length = input_tokens.shape
    out_specs = (
        self._spec(("batch", None, "vocab"), (batch, length, self.config.vocab_size)),
        None if cache is None else self._cache_specs(batch, cache["valid"].shape[1]),
    )
    return self.call_with_auto_axes(
        DecoderLM._forward, out_specs, input_tokens, positions, cache, attention_mask
    )

  def call_with_auto_axes(self, fn: Callable[..., Any], out_specs: Any, *args: Any) -> Any:
    """``fn(self, *args)`` with the mesh's Explicit axes treated as Auto, its outputs
    placed by ``out_specs`` (a tree of PartitionSpecs).

    ``fn`` runs on a functional copy of the model, so the RNG state it advances (LoRA
    dropout keys) is written back; other state changes are not.
    """
    graphdef, state = nnx.split(self)
    replicated = NamedSharding(self.mesh, PartitionSpec())
    out_sharding = (
        jax.tree.map(lambda s: NamedSharding(self.mesh, s), out_specs),
        jax.tree.map(lambda _: replicated, nnx.state(self, nnx.RngState)),
    )

    def run(state, *args):
      model = nnx.merge(graphdef, state)
      return fn(model, *args), nnx.state(model, nnx.RngState)

    out, rng_state = sharding.run_with_auto_axes(run, self.mesh, out_sharding)(state, *args)
    nnx.update(self, rng_state)
    return out

  def _forward(self, input_tokens, positions, cache, attention_mask):
    hidden, cache = self.hidden_states(input_tokens, positions, cache, attention_mask)
    return self.logits(hidden), cache

  def hidden_states(
      self,
      input_tokens: jax.Array,
      positions: jax.Array | None = None,
      cache: Cache | None = None,
      attention_mask: jax.Array | None = None,
  ) -> tuple[jax.Array, Cache | None]:
    """The final-norm hidden states ``[B, T, hidden]`` (what ``logits`` projects)."""
    batch, length = input_tokens.shape
    padding = None
    if attention_mask is not None and attention_mask.ndim == 2:
      padding = attention_mask.astype(bool)
    full_mask = attention_mask if attention_mask is not None and attention_mask.ndim == 3 else None
    new_valid = jnp.ones((batch, length), bool) if padding is None else padding
    if cache is None:
      index = jnp.zeros((), jnp.int32)
      key_valid = new_valid
      done = jnp.zeros((batch,), jnp.int32)
    else:
      index = cache["index"]
      key_valid = jax.lax.dynamic_update_slice(cache["valid"], new_valid, (0, index))
      done = cache["valid"].sum(axis=-1, dtype=jnp.int32)
    if positions is None:
      # Real tokens count from 0 in every row, whatever padding precedes them.
      positions = done[:, None] + jnp.maximum(jnp.cumsum(new_valid, axis=-1) - 1, 0)
    windows = {layer.attn.window for layer in self.layers}
    if cache is None and attention_mask is None:
      # Plain causal: no mask array, so attention can take the flash-attention kernels.
      masks = dict.fromkeys(windows)
    else:
      masks = attention_masks(index + jnp.arange(length), key_valid, windows, full_mask)

    # Checked per forward, not only at construction: ``model.remat`` may be changed later.
    remat = check_remat(self.remat)
    x = self.embed(input_tokens)
    new_layers = []
    for i, layer in enumerate(self.layers):
      layer_cache = None if cache is None else cache["layers"][i]
      if remat == "layer":
        x, layer_cache = rematerialised(layer, x, positions, masks, layer_cache, index)
      else:
        x, layer_cache = layer(
            x, positions, masks, layer_cache, index, remat_attention=remat == "attention"
        )
      x = sharding.constrain(x, ("batch", None, None), self.mesh, self.sharding_rules)
      new_layers.append(layer_cache)
    x = self.final_norm(x)
    if cache is None:
      return x, None
    return x, {"layers": new_layers, "valid": key_valid, "index": index + length}

  def embed(self, tokens: jax.Array) -> jax.Array:
    x = self.embed_tokens(tokens)
    if self.config.scale_embeddings:
      # Gemma multiplies by sqrt(hidden) rounded to the compute dtype.
      x = x * jnp.asarray(self.config.hidden_size**0.5, dtype=x.dtype)
    return sharding.constrain(x, ("batch", None, None), self.mesh, self.sharding_rules)

  def logits(self, x: jax.Array) -> jax.Array:
    if self.lm_head is None:
      logits = self.embed_tokens.attend(x)
    else:
      logits = self.lm_head(x)
    cap = self.config.final_logit_softcap
    if cap is not None:
      logits = jnp.tanh(logits / cap) * cap
    return logits
