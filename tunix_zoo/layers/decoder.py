"""The decoder-only language model every family is built from.

Call convention (the one Tunix models use, so RL code can call ours)::

    logits, cache = model(tokens)                       # plain causal forward
    cache = model.init_cache(batch_size=2, max_len=64)
    logits, cache = model(prompt, cache=cache, attention_mask=prompt_mask)
    logits, cache = model(next_token, cache=cache)      # one step of decoding
    logits, cache = model(prompt, cache=cache, logits_to_keep=1)  # the last position's

``attention_mask`` is a ``[B, T]`` padding mask (1 = real token) or a full boolean
``[B, T, S]`` mask; ``positions`` default to the count of real tokens before each one.
Every cache leaf leads with the batch axis (Tunix's beam search repeats and gathers
them along it); ``cache["index"]`` ``[B]`` counts the slots written, the same in every
row (batches are left-padded), as Tunix's ``end_index``.

The model works on whatever mesh its parameters are on (``model.mesh`` reads it from
them), so state resharded onto another mesh and merged back runs there; each parameter
carries ``out_sharding`` metadata (its mesh axes), which ``nnx.get_partition_spec``
reads.

``remat`` trades compute for activation memory in training: ``"layer"`` keeps only each
decoder layer's input and recomputes the layer in the backward pass, ``"attention"``
recomputes the attention blocks only; ``"none"`` (the default) saves everything::

    model = Qwen3ForCausalLM(config, rngs=nnx.Rngs(0), remat="layer")
    model.remat = "none"  # may be changed between traces

``scan_layers=True`` holds the layers as a :class:`LayerStack`: one ``jax.lax.scan`` over
a repeating block of layers (their parameters stacked along a leading layer axis), so
compile time stays flat in depth; the same numbers as the unrolled layers. Its cache is
``cache["layers"] = {"k": [B, L, S, K, H], "v": ...}``, still batch-leading::

    model = Qwen3ForCausalLM(config, rngs=nnx.Rngs(0), scan_layers=True)
    model.layers.blocks[0].attn.q_proj.weight.shape  # (num_layers, q_dim, hidden)
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec

from tunix_zoo import arguments, sharding
from tunix_zoo.config import REMAT_MODES, DecoderConfig
from tunix_zoo.errors import RematError
from tunix_zoo.layers.attention import Attention, LayerCache, attention_masks
from tunix_zoo.layers.basic import Embedding, Linear, RMSNorm
from tunix_zoo.layers.mlp import GatedMLP
from tunix_zoo.layers.moe import MoE
from tunix_zoo.layers.rope import RotaryAngles
from tunix_zoo.layers.stacked import LAYER_NUMBER, STACKED_LAYERS

Cache = dict[str, Any]


def check_remat(mode: str) -> str:
  """``mode`` when it is one of :data:`REMAT_MODES`; else raises RematError."""
  if mode not in REMAT_MODES:
    raise RematError(f"remat={mode!r} is not a remat mode; choose one of {', '.join(REMAT_MODES)}.")
  return mode


def rematerialised(
    block: nnx.Module,
    x: jax.Array,
    positions: jax.Array | RotaryAngles,
    masks: dict[int | None, jax.Array],
    layer_cache: LayerCache | None,
    cache_index: jax.Array | int,
) -> tuple[Any, ...]:
  """``block(x, positions, masks, layer_cache, cache_index)`` under ``nnx.remat``: only its
  inputs are saved for the backward pass, which recomputes the rest."""
  # The masks' keys mix None and ints, which pytrees cannot sort: pass the values only.
  windows = tuple(masks)

  def run(block, x, positions, mask_values, layer_cache, cache_index):
    return block(x, positions, dict(zip(windows, mask_values)), layer_cache, cache_index)

  return nnx.remat(run)(block, x, positions, tuple(masks.values()), layer_cache, cache_index)


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
      sharding_rules: sharding.Rules | None = None,
  ):
    c = config
    norm = lambda: RMSNorm.of(  # noqa: E731
        c.hidden_size, c, rngs=rngs, dtype=dtype, param_dtype=param_dtype
    )
    self.pre_attn_norm = norm()
    self.attn = Attention(
        c, layer, rngs=rngs, dtype=dtype, param_dtype=param_dtype, sharding_rules=sharding_rules,
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
      positions: jax.Array | RotaryAngles,
      masks: dict[int | None, jax.Array | None],
      layer_cache: LayerCache | None,
      cache_index: jax.Array | int,
      remat_attention: bool = False,
  ) -> tuple[jax.Array, LayerCache | None, jax.Array | None]:
    """The layer's output, updated cache and router logits (None without a mixture of
    experts); ``remat_attention`` recomputes the attention block in the backward pass
    instead of saving its activations."""
    args = (self.pre_attn_norm(x), positions, masks, layer_cache, cache_index)
    if remat_attention:
      h, layer_cache = rematerialised(self.attn, *args)
    else:
      h, layer_cache = self.attn(*args)
    if self.post_attn_norm is not None:
      h = self.post_attn_norm(h)
    x = x + h
    h = self.mlp(self.pre_mlp_norm(x))
    # A mixture of experts returns its router logits too.
    h, router_logits = h if isinstance(self.mlp, MoE) else (h, None)
    if self.post_mlp_norm is not None:
      h = self.post_mlp_norm(h)
    return x + h, layer_cache, router_logits


def repeating_period(kinds: list[Any]) -> int:
  """The smallest ``period`` such that layer ``i`` is of the kind of layer ``i % period``
  for every layer of the ``len(kinds) // period`` whole blocks (the rest are left over).

  Example::

      repeating_period(["local", "local", "global"] * 4 + ["local"])  # 3
  """
  for period in range(1, len(kinds) + 1):
    whole = len(kinds) // period * period
    if all(kinds[i] == kinds[i % period] for i in range(whole)):
      return period
  return len(kinds)


def _stacked(layers: list[DecoderLayer], numbers: tuple[int, ...]) -> DecoderLayer:
  """One layer whose parameters stack those of ``layers`` (all alike) along a new leading
  ``"layers"`` axis, which no sharding rule maps: each slice shards as the layer did."""
  graphdef, state = nnx.split(layers[0])
  flat = nnx.to_flat_state(state)
  others = [dict(nnx.to_flat_state(nnx.state(layer))) for layer in layers]
  for path, var in flat:
    values = [other[path].get_value() for other in others]
    if isinstance(values[0], jax.ShapeDtypeStruct):
      var.set_value(jax.ShapeDtypeStruct((len(values),) + values[0].shape, values[0].dtype))
    else:
      var.set_value(jnp.stack(values))
    axes = var.get_metadata().get("logical_axes") or (None,) * len(values[0].shape)
    var.set_metadata(logical_axes=("layers", *axes), **{STACKED_LAYERS: numbers})
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


class LayerStack(nnx.Module):
  """The decoder layers as ``repeats`` scanned copies of a block of ``period`` layers,
  then the layers left over, unrolled.

  The block is the shortest repeating pattern of layer kinds (one for Llama and Qwen,
  Gemma 2's local/global pair, Gemma 3's five local and one global layer, Qwen3-MoE's
  dense/sparse step). ``blocks[p]`` is layer ``p`` of the block with every parameter
  stacked over the repeats (layer ``r * period + p`` is slice ``r``; the slices' numbers
  are each parameter's ``stacked_layers`` metadata); ``rest[j]`` is layer
  ``repeats * period + j``, as it is unrolled.

  Example::

      stack = LayerStack([DecoderLayer(config, i, rngs=rngs) for i in range(config.num_layers)])
      stack.period, stack.repeats, len(stack.rest)
  """

  def __init__(self, layers: list[DecoderLayer]):
    self.period = repeating_period([nnx.graphdef(layer) for layer in layers])
    self.repeats = len(layers) // self.period
    period, repeats = self.period, self.repeats
    self.blocks = nnx.List([
        _stacked([layers[r * period + p] for r in range(repeats)],
                 tuple(r * period + p for r in range(repeats)))
        for p in range(period)
    ])
    self.rest = nnx.List(layers[repeats * period:])
    for j, layer in enumerate(self.rest):
      for _, var in nnx.to_flat_state(nnx.state(layer)):
        var.set_metadata(**{LAYER_NUMBER: repeats * period + j})

  def __call__(
      self,
      x: jax.Array,
      positions: jax.Array,
      masks: dict[int | None, jax.Array | None],
      kv: LayerCache | None,
      cache_index: jax.Array | int,
      remat: str,
      constrain: Callable[[jax.Array], jax.Array],
  ) -> tuple[jax.Array, LayerCache | None, tuple[jax.Array, ...]]:
    """The stack's output, its updated ``{"k", "v"}`` ``[B, L, S, K, H]`` cache and the
    router logits of its mixture-of-experts layers in layer order."""

    def run(layer, positions, number, x, kv):
      layer_cache = None if kv is None else {**kv, "layer": number}
      if remat == "layer":
        x, kv, logits = rematerialised(layer, x, positions, masks, layer_cache, cache_index)
      else:
        x, kv, logits = layer(x, positions, masks, layer_cache, cache_index,
                              remat_attention=remat == "attention")
      return constrain(x), kv, logits

    graphdefs, states = zip(*(nnx.split(block) for block in self.blocks))
    # Computed here, outside the loop: XLA would compute them again in every layer.
    angles = [block.attn.rotary_angles(positions) for block in self.blocks]

    def body(carry, xs):
      x, kv = carry
      repeat, block_states = xs
      per_position = []
      for p, (graphdef, state) in enumerate(zip(graphdefs, block_states)):
        x, kv, logits = run(nnx.merge(graphdef, state), angles[p], repeat * self.period + p,
                            x, kv)
        per_position.append(logits)  # None for a dense layer
      return (x, kv), tuple(per_position)

    (x, kv), stacked_logits = jax.lax.scan(
        body, (x, kv), (jnp.arange(self.repeats), states)
    )
    router_logits = [logits[r] for r in range(self.repeats)
                     for logits in stacked_logits if logits is not None]
    for j, layer in enumerate(self.rest):
      x, kv, logits = run(layer, positions, self.repeats * self.period + j, x, kv)
      if logits is not None:
        router_logits.append(logits)
    return x, kv, tuple(router_logits)


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
      scan_layers: bool = False,
  ):
    c = config
    self.config = config
    self.remat = check_remat(remat)
    self.dtype = dtype
    self.sharding_rules = dict(sharding_rules) if sharding_rules is not None else None
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.embed_tokens = Embedding(c.vocab_size, c.hidden_size, **kw)
    layers = [
        self.layer_class(c, i, **kw, sharding_rules=self.sharding_rules)
        for i in range(c.num_layers)
    ]
    self.layers = LayerStack(layers) if scan_layers else nnx.List(layers)
    self.final_norm = RMSNorm.of(
        c.hidden_size, c, rngs=rngs, dtype=dtype, param_dtype=param_dtype
    )
    self.lm_head = (
        None if c.tie_word_embeddings
        else Linear(c.hidden_size, c.vocab_size, ("vocab", "embed"), **kw)
    )
    if mesh is not None:
      self._annotate_mesh_axes(mesh)

  def _annotate_mesh_axes(self, mesh: Mesh) -> None:
    """Records each parameter's mesh axes as ``out_sharding`` metadata (what flax's
    ``nnx.get_partition_spec`` and so Tunix's resharding read).

    Axes of size 1 are kept: a model loaded on one device then resharded onto a larger
    mesh is sharded there, not replicated. ``eager_sharding=False``: flax must not place
    copies of these variables (optimizer states) itself.
    """
    # As checkpoint.loader.axis_counts: a mesh axis must divide the heads, not the width.
    counts = {"heads": self.config.num_heads, "kv_heads": self.config.num_kv_heads}
    for _, var in nnx.to_flat_state(nnx.state(self, nnx.Param)):
      logical = var.get_metadata().get("logical_axes")
      if logical is None:
        continue
      spec = sharding.partition_spec(
          logical, var.shape, mesh, self.sharding_rules, counts, keep_unit_axes=True
      )
      var.set_metadata(out_sharding=tuple(spec), eager_sharding=False)

  # -- sharding of activations and cache ---------------------------------------------
  @property
  def mesh(self) -> Mesh | AbstractMesh | None:
    """The mesh the parameters are on (abstract inside a trace); None off a mesh."""
    return sharding.mesh_of(self.embed_tokens.weight.get_value())

  @property
  def scan_layers(self) -> bool:
    """Whether the layers are a scanned :class:`LayerStack` (else an unrolled list)."""
    return isinstance(self.layers, LayerStack)

  @property
  def num_embed(self) -> int:
    """The vocabulary size (the name Tunix's sampler reads)."""
    return self.config.vocab_size

  def _spec(self, logical: tuple[str | None, ...], shape: tuple[int, ...]) -> PartitionSpec:
    counts = {"kv_heads": self.config.num_kv_heads}
    return sharding.partition_spec(logical, shape, self.mesh, self.sharding_rules, counts)

  def _cache_specs(self, batch: int, max_len: int) -> Cache:
    c = self.config
    if self.scan_layers:
      kv = self._spec(("batch", None, None, "kv_heads", None),
                      (batch, c.num_layers, max_len, c.num_kv_heads, c.head_dim))
      layers = {"k": kv, "v": kv}
    else:
      kv = self._spec(("batch", None, "kv_heads", None),
                      (batch, max_len, c.num_kv_heads, c.head_dim))
      layers = [{"k": kv, "v": kv} for _ in range(c.num_layers)]
    return {
        "layers": layers,
        "valid": self._spec(("batch", None), (batch, max_len)),
        # Replicated: every device reads the write slot without a collective.
        "index": PartitionSpec(),
    }

  def init_cache(self, batch_size: int, max_len: int, dtype: Any = None) -> Cache:
    """An empty KV cache for ``batch_size`` rows of up to ``max_len`` tokens, on the
    devices the parameters are on."""
    c = self.config
    dtype = dtype or self.dtype
    kv_shape = (batch_size, max_len, c.num_kv_heads, c.head_dim)
    if self.scan_layers:
      stacked = (kv_shape[:1] + (c.num_layers,) + kv_shape[1:], dtype)
      layers = {"k": stacked, "v": stacked}
    else:
      layers = [{"k": (kv_shape, dtype), "v": (kv_shape, dtype)} for _ in range(c.num_layers)]
    shapes = {
        "layers": layers,
        "valid": ((batch_size, max_len), jnp.bool_),
        "index": ((batch_size,), jnp.int32),
    }
    is_leaf = lambda x: isinstance(x, tuple) and isinstance(x[0], tuple)  # noqa: E731
    weight = self.embed_tokens.weight.get_value()
    mesh = self.mesh
    if mesh is None:
      # One device: where the parameters are (JAX's default in a trace or without them).
      traced = isinstance(weight, jax.core.Tracer)
      device = None if traced else getattr(weight, "sharding", None)
      return jax.tree.map(lambda sd: jnp.zeros(*sd, device=device), shapes, is_leaf=is_leaf)
    specs = self._cache_specs(batch_size, max_len)
    if isinstance(mesh, AbstractMesh):
      # Inside a trace: only an Explicit type can be stated; Auto is the compiler's.
      place = (
          (lambda x, spec: jax.sharding.reshard(x, NamedSharding(mesh, spec)))
          if sharding.has_explicit_axes(mesh) else (lambda x, spec: x)
      )
      return jax.tree.map(lambda sd, spec: place(jnp.zeros(*sd), spec), shapes, specs,
                          is_leaf=is_leaf)
    return jax.tree.map(
        lambda sd, spec: jnp.zeros(*sd, device=NamedSharding(mesh, spec)),
        shapes, specs, is_leaf=is_leaf,
    )

  def get_model_input(self) -> dict[str, Any]:
    """Dummy ``__call__`` arguments, as Tunix's models give them to qwix's LoRA
    (``qwix.apply_lora_to_model(model, provider, **model.get_model_input())``): a batch
    of 2 (divisible by a 2-device FSDP axis) of one token."""
    return {
        "input_tokens": jnp.ones((2, 1), jnp.int32),
        "positions": jnp.zeros((2, 1), jnp.int32),
        "cache": None,
        "attention_mask": jnp.ones((2, 1, 1), jnp.bool_),
    }

  # -- forward ------------------------------------------------------------------------
  def __call__(
      self,
      input_tokens: jax.Array,
      positions: jax.Array | None = None,
      cache: Cache | None = None,
      attention_mask: jax.Array | None = None,
      *,
      logits_to_keep: int = 0,
  ) -> tuple[jax.Array, Cache | None]:
    """Logits ``[B, T, vocab]`` and the updated cache (None when none was given).

    ``logits_to_keep`` (HF transformers' argument): only the last that many positions'
    logits, ``[B, min(T, logits_to_keep), vocab]``; 0 keeps all. A prefill that samples
    from the last position needs one: Qwen3-8B's logits of a 256 x 512 prompt batch
    would be 40 GB.
    """
    logits_to_keep = arguments.positive_int(logits_to_keep, "logits_to_keep", allow_zero=True)
    forward = functools.partial(DecoderLM._forward, logits_to_keep=logits_to_keep)
    mesh = self.mesh
    if not sharding.has_explicit_axes(mesh):
      return forward(self, input_tokens, positions, cache, attention_mask)
    # Arrays made without the mesh in context (Tunix's rollout thread, where
    # ``jax.set_mesh`` does not reach) are typed replicated here: else the compiler
    # shards them as the forward inside wants, unlike the caller's outputs typed by them,
    # and a donated buffer no longer fits the output it is aliased to.
    input_tokens, positions, attention_mask = (
        sharding.typed_on(mesh, x) for x in (input_tokens, positions, attention_mask)
    )
    return self.call_with_auto_axes(
        forward, self._output_specs(input_tokens, cache),
        input_tokens, positions, cache, attention_mask,
    )

  def _output_specs(self, input_tokens: jax.Array, cache: Cache | None) -> tuple[Any, Any]:
    """On an Explicit mesh: the logits and the cache's batch axis typed by the tokens'
    batch sharding alone (size-1 axes included), as the caller's own arrays (Tunix's
    buffers, targets) are typed; the cache's other axes as they came in. Tokens
    replicated over the batch (Tunix's sampler) so get a cache Tunix may repeat."""
    batch = sharding.batch_axes(input_tokens)
    logits = PartitionSpec(batch, None, None)
    if cache is None:
      return logits, None
    return logits, jax.tree.map(
        lambda leaf: PartitionSpec(batch, *jax.typeof(leaf).sharding.spec[1:]), cache
    )

  def call_with_auto_axes(self, fn: Callable[..., Any], out_specs: Any, *args: Any) -> Any:
    """``fn(self, *args)`` with the mesh's Explicit axes treated as Auto, its outputs
    placed by ``out_specs`` (a tree of PartitionSpecs).

    ``fn`` runs on a functional copy of the model; the variables it changes or creates
    (RNG counts of LoRA dropout, qwix's LoRA parameters) are written back, in the
    sharding they had, or a new one's ``out_sharding`` metadata (else replicated).
    """
    mesh = self.mesh
    graphdef, state = nnx.split(self)
    original = dict(nnx.to_flat_state(state))
    changed: dict[tuple[Any, ...], nnx.Variable] = {}

    def run(state, *args):
      given = {path: var.get_raw_value() for path, var in nnx.to_flat_state(state)}
      model = nnx.merge(graphdef, state)
      out = fn(model, *args)
      # Leaves the auto-axes block as a side output: its shardings are known only now.
      for path, var in nnx.to_flat_state(nnx.state(model)):
        if path not in given or var.get_raw_value() is not given[path]:
          changed[path] = var
      return out

    out_sharding = jax.tree.map(lambda s: NamedSharding(mesh, s), out_specs)
    out = sharding.run_with_auto_axes(run, mesh, out_sharding)(state, *args)
    if changed:
      updates = []
      for path, var in changed.items():
        if path in original:
          spec = jax.typeof(original[path].get_raw_value()).sharding.spec
        else:
          spec = PartitionSpec(*(
              axes if set(sharding.mesh_axes(axes)) <= set(mesh.axis_names) else None
              for axes in var.get_metadata().get("out_sharding") or ()
          ))
        value = jax.sharding.reshard(var.get_raw_value(), NamedSharding(mesh, spec))
        updates.append((path, var.replace(value)))
      nnx.update(self, nnx.from_flat_state(updates))
    return out

  def _forward(self, input_tokens, positions, cache, attention_mask, logits_to_keep=0):
    hidden, cache = self.hidden_states(input_tokens, positions, cache, attention_mask)
    if logits_to_keep:
      hidden = hidden[:, -logits_to_keep:]
    return self.logits(hidden), cache

  def hidden_states(
      self,
      input_tokens: jax.Array,
      positions: jax.Array | None = None,
      cache: Cache | None = None,
      attention_mask: jax.Array | None = None,
  ) -> tuple[jax.Array, Cache | None]:
    """The final-norm hidden states ``[B, T, hidden]`` (what ``logits`` projects)."""
    hidden, cache, _ = self.hidden_states_and_router_logits(
        input_tokens, positions, cache, attention_mask
    )
    return hidden, cache

  def hidden_states_and_router_logits(
      self,
      input_tokens: jax.Array,
      positions: jax.Array | None = None,
      cache: Cache | None = None,
      attention_mask: jax.Array | None = None,
  ) -> tuple[jax.Array, Cache | None, tuple[jax.Array, ...]]:
    """:meth:`hidden_states`, and the router logits of each mixture-of-experts layer in
    layer order (none for a dense model)."""
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
      # Every row writes the same slot (see the module docstring).
      index = cache["index"][0]
      key_valid = jax.lax.dynamic_update_slice(cache["valid"], new_valid, (0, index))
      done = cache["valid"].sum(axis=-1, dtype=jnp.int32)
    if positions is None:
      # Real tokens count from 0 in every row, whatever padding precedes them.
      positions = done[:, None] + jnp.maximum(jnp.cumsum(new_valid, axis=-1) - 1, 0)
    mesh = self.mesh
    windows = {self.config.layer_window(i) for i in range(self.config.num_layers)}
    if cache is None and attention_mask is None:
      # Plain causal: no mask array, so attention can take the flash-attention kernels.
      masks = dict.fromkeys(windows)
    else:
      masks = attention_masks(index + jnp.arange(length), key_valid, windows, full_mask)

    # Checked per forward, not only at construction: ``model.remat`` may be changed later.
    remat = check_remat(self.remat)
    x = self.embed(input_tokens)
    if self.scan_layers:
      constrain = lambda x: sharding.constrain(  # noqa: E731
          x, ("batch", None, None), mesh, self.sharding_rules)
      x, new_layers, router_logits = self.layers(
          x, positions, masks, None if cache is None else cache["layers"], index, remat,
          constrain)
      return self._finish(x, cache, new_layers, key_valid, length, router_logits)
    new_layers, router_logits = [], []
    for i, layer in enumerate(self.layers):
      layer_cache = None if cache is None else cache["layers"][i]
      if remat == "layer":
        x, layer_cache, logits = rematerialised(layer, x, positions, masks, layer_cache, index)
      else:
        x, layer_cache, logits = layer(
            x, positions, masks, layer_cache, index, remat_attention=remat == "attention"
        )
      x = sharding.constrain(x, ("batch", None, None), mesh, self.sharding_rules)
      new_layers.append(layer_cache)
      if logits is not None:
        router_logits.append(logits)
    return self._finish(x, cache, new_layers, key_valid, length, router_logits)

  def _finish(self, x, cache, new_layers, key_valid, length, router_logits
              ) -> tuple[jax.Array, Cache | None, tuple[jax.Array, ...]]:
    x = self.final_norm(x)
    if cache is not None:
      cache = {"layers": new_layers, "valid": key_valid, "index": cache["index"] + length}
    return x, cache, tuple(router_logits)

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
