"""Text generation with the model's KV cache: greedy, temperature, top-k and top-p.

One jitted prefill runs the left-padded prompt through the model and samples the first
token; one jitted ``jax.lax.while_loop`` then decodes the rest on device, stopping as
soon as every row has produced an end-of-sequence id. Compiled programs are kept per
model structure and input shapes, so repeated calls with the same shapes do not
recompile.

Example::

    model, path = AutoModel.from_pretrained("Qwen/Qwen3-0.6B", mesh)
    out = generate(model, [[1, 5, 9], [1, 7]], max_new_tokens=32, eos_ids=[2])
    out.tokens        # [2, 32] np.ndarray, pad_id after each row's EOS
    out = generate(model, ["Hello"], 32, temperature=0.7, top_p=0.9, tokenizer=tok)
    out.text          # ["..."]
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import threading
import time
from typing import Any, Callable, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tunix_zoo import arguments, sharding
from tunix_zoo.errors import GenerationError
from tunix_zoo.kernels import decode_attention

__all__ = ["GenerateOutput", "Tokenizer", "filter_logits", "generate"]

StreamCallback = Callable[[int, np.ndarray], None]

# Compiled prefill/decode programs, least recently used first. Each holds its model's
# graph definition (no weights), so a bounded number is cheap to keep.
_MAX_COMPILED = 32
_compiled: collections.OrderedDict[tuple[Any, ...], Any] = collections.OrderedDict()
_compiled_lock = threading.Lock()

_EOS_SLOTS = 8

# Stream callbacks of generate() calls in flight. The compiled loop passes the call's id
# to the host, so one compiled program serves every callback without recompiling.
_streams: dict[int, StreamCallback] = {}
_stream_ids = itertools.count()


class Tokenizer(Protocol):
  """What generate() needs of a tokenizer."""

  def encode(self, text: str) -> list[int]: ...

  def decode(self, ids: list[int]) -> str: ...


@dataclasses.dataclass(frozen=True)
class GenerateOutput:
  """The result of :func:`generate`.

  ``tokens[i, :lengths[i]]`` is what row ``i`` generated, its end-of-sequence id (if
  it produced one) included; ``pad_id`` fills the rest. ``text`` is the decoded
  ``tokens`` without the end-of-sequence id, when a tokenizer was given. Timings
  exclude compilation (``compile_seconds``, zero when the programs were cached).
  Prefill throughput counts real prompt tokens; decode throughput counts every row of
  every decoding step the loop ran.
  """

  tokens: np.ndarray
  lengths: np.ndarray
  text: list[str] | None
  prefill_seconds: float
  decode_seconds: float
  compile_seconds: float
  prefill_tokens_per_second: float
  decode_tokens_per_second: float


def filter_logits(
    logits: jax.Array, top_k: int | jax.Array | None = None, top_p: float | jax.Array | None = None
) -> jax.Array:
  """``logits`` with every token outside the top-k / nucleus set at ``-inf``.

  ``top_k`` keeps the ``k`` largest logits; ``top_p`` then keeps the smallest set of
  most probable tokens whose probability (renormalised over what top-k kept) sums to at
  least ``p``, never fewer than one token. Tokens tied with the last kept one are kept
  too (as transformers does for top-k). Either may be None (no filtering) or a traced
  scalar.

  Example::

      filter_logits(jnp.log(jnp.array([0.5, 0.3, 0.2])), top_p=0.7)  # keeps 0.5 and 0.3
  """
  if top_k is None and top_p is None:
    return logits
  neg_inf = jnp.asarray(-jnp.inf, logits.dtype)
  descending = -jnp.sort(-logits, axis=-1)
  vocab = logits.shape[-1]
  if top_k is not None:
    k = jnp.clip(jnp.asarray(top_k, jnp.int32), 1, vocab)
    kth_largest = jax.lax.dynamic_index_in_dim(descending, k - 1, axis=-1, keepdims=True)
    logits = jnp.where(logits < kth_largest, neg_inf, logits)
    descending = jnp.where(descending < kth_largest, neg_inf, descending)
  if top_p is not None:
    probs = jax.nn.softmax(descending.astype(jnp.float32), axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    # The most probable token always stays, whatever p.
    num_kept = jnp.maximum(jnp.sum(mass_before < top_p, axis=-1, keepdims=True), 1)
    smallest_kept = jnp.take_along_axis(descending, num_kept - 1, axis=-1)
    logits = jnp.where(logits < smallest_kept, neg_inf, logits)
  return logits


@dataclasses.dataclass(frozen=True)
class _Options:
  """What changes the compiled program (values that do not are passed as arrays)."""

  greedy: bool
  use_top_k: bool
  use_top_p: bool
  max_new_tokens: int
  streaming: bool
  mesh: Mesh | None


def _whole_vocab(logits: jax.Array, mesh: Mesh | None) -> jax.Array:
  """``[B, V]`` logits with the vocabulary on every device, as sorting needs it."""
  if not sharding.has_explicit_axes(mesh):
    return logits  # The compiler places the gather itself.
  batch_axes = jax.typeof(logits).sharding.spec[0]
  return jax.sharding.reshard(logits, NamedSharding(mesh, PartitionSpec(batch_axes, None)))


def _sample(logits: jax.Array, key: jax.Array, knobs: dict[str, jax.Array], opts: _Options):
  if opts.greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = _whole_vocab(logits, opts.mesh).astype(jnp.float32) / knobs["temperature"]
  logits = filter_logits(
      logits,
      knobs["top_k"] if opts.use_top_k else None,
      knobs["top_p"] if opts.use_top_p else None,
  )
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _prefill(graphdef, opts: _Options, state, tokens, mask, cache, key, knobs):
  """Runs the prompt through the model and samples the first new token of each row."""
  model = nnx.merge(graphdef, state)
  logits, cache = model(tokens, cache=cache, attention_mask=mask, logits_to_keep=1)
  key, step_key = jax.random.split(key)
  first = _sample(logits[:, -1], step_key, knobs, opts)
  done = jnp.isin(first, knobs["eos_ids"])
  return first, done, cache, key


def _replicated(x: jax.Array, mesh: Mesh | None) -> jax.Array:
  """``x`` gathered onto every device, so a host callback can take it without resharding."""
  if mesh is None or mesh.size == 1:
    return x
  everywhere = NamedSharding(mesh, PartitionSpec())
  if sharding.has_explicit_axes(mesh):
    return jax.sharding.reshard(x, everywhere)
  return jax.lax.with_sharding_constraint(x, everywhere)


def _emit(stream_id, step, tokens) -> None:
  callback = _streams.get(int(stream_id))
  if callback is not None:
    callback(int(step), np.asarray(tokens))


def _decode(graphdef, opts: _Options, state, first, done, cache, key, knobs, stream_id):
  """Samples tokens 1.. of every row in one on-device loop; returns them and the steps run."""
  model = nnx.merge(graphdef, state)
  # Elementwise writes keep ``out`` in the tokens' sharding on an Explicit mesh.
  columns = jnp.arange(opts.max_new_tokens)[None, :]
  out = jnp.where(columns == 0, first[:, None], knobs["pad_id"])

  def not_finished(carry):
    step, _, _, done, _, _ = carry
    return (step < opts.max_new_tokens) & ~jnp.all(done)

  def one_step(carry):
    step, token, cache, done, key, out = carry
    logits, cache = model(token[:, None], cache=cache)
    key, step_key = jax.random.split(key)
    token = jnp.where(done, knobs["pad_id"], _sample(logits[:, -1], step_key, knobs, opts))
    done = done | jnp.isin(token, knobs["eos_ids"])
    out = jnp.where(columns == step, token[:, None], out)
    if opts.streaming:
      # Unordered: ordered effects cannot span devices. The steps still reach the host in
      # order, since each device runs the loop's iterations one after another.
      jax.debug.callback(_emit, stream_id, step, _replicated(token, opts.mesh))
    return step + 1, token, cache, done, key, out

  carry = (jnp.ones((), jnp.int32), first, cache, done, key, out)
  steps, _, cache, _, _, out = jax.lax.while_loop(not_finished, one_step, carry)
  # Returning the donated cache lets the loop update it in place instead of copying it.
  return out, steps, cache


def _signature(tree: Any) -> tuple[Any, ...]:
  leaves, treedef = jax.tree.flatten(tree)
  return treedef, tuple((x.shape, x.dtype, getattr(x, "sharding", None)) for x in leaves)


# A scanned layer stack reads each layer's weights out of the stacked arrays with a
# dynamic slice. On GPUs XLA's own matmuls (Triton) cannot take that slice as an offset,
# so it copies the whole layer every step: Qwen3-8B's batch-1 decode step went from 5.2 ms
# to 11.9 ms (H200, jax 0.11.2). Its cuBLAS calls can: with dynamic-slice fusion on and
# Triton matmuls off the scanned step is as fast as the unrolled one (benchmarks/README.md).
# XLA also merges products that share an input (q|k|v) into one, which for cuBLAS needs
# their weights concatenated: a copy of the layer's q, k and v weights every step (100 MB
# at Qwen3-8B), so the merge is off too (batch-32 decode 4,712 -> 5,085 tok/s on an H200).
SCANNED_GPU_COMPILER_OPTIONS: dict[str, Any] = {
    "xla_gpu_enable_dynamic_slice_fusion": True,
    "xla_gpu_enable_triton_gemm": False,
    "xla_gpu_dot_merger_threshold_mb": 0,
}


def compiler_options(model: nnx.Module, devices: Sequence[Any]) -> dict[str, Any] | None:
  """The XLA options ``generate`` compiles ``model``'s programs with on ``devices``:
  :data:`SCANNED_GPU_COMPILER_OPTIONS` for a scanned model on GPUs, else none.

  Example::

      compiler_options(model, jax.devices())   # None on CPUs and for unrolled layers
  """
  if getattr(model, "scan_layers", False) and devices and all(
      d.platform == "gpu" for d in devices):
    return dict(SCANNED_GPU_COMPILER_OPTIONS)
  return None


def _compile(fn: Callable, graphdef, opts: _Options, args: tuple, donate: tuple[int, ...],
             options: dict[str, Any] | None = None):
  """The compiled ``fn`` for these arguments, and the seconds compiling it took (0 if cached)."""
  # The graph definition holds the layers' kernel policy: a program per policy too.
  key = (fn.__name__, graphdef, opts, _signature(args))
  with _compiled_lock:
    executable = _compiled.get(key)
    if executable is not None:
      _compiled.move_to_end(key)
      return executable, 0.0
  start = time.perf_counter()
  jitted = jax.jit(functools.partial(fn, graphdef, opts), donate_argnums=donate)
  executable = jitted.lower(*args).compile(compiler_options=options)
  seconds = time.perf_counter() - start
  with _compiled_lock:
    _compiled[key] = executable
    while len(_compiled) > _MAX_COMPILED:
      _compiled.popitem(last=False)
  return executable, seconds


def _batch_sharded(x: np.ndarray, mesh: Mesh | None, rules: sharding.Rules | None) -> jax.Array:
  """``x`` ``[B, ...]`` split over the mesh axes the rules give the batch.

  On an Explicit mesh the model types its logits (and so every decoding step) by the
  tokens' batch sharding.
  """
  if not sharding.has_explicit_axes(mesh):
    return jnp.asarray(x)
  logical = ("batch",) + (None,) * (x.ndim - 1)
  return jax.device_put(x, sharding.named_sharding(logical, x.shape, mesh, rules))


def _left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  length = max(len(r) for r in rows)
  tokens = np.full((len(rows), length), pad_id, np.int32)
  mask = np.zeros((len(rows), length), bool)
  for i, row in enumerate(rows):
    if len(row):
      tokens[i, length - len(row):] = row
      mask[i, length - len(row):] = True
  return tokens, mask


def _prompt_batch(
    prompts: Any, attention_mask: Any, tokenizer: Tokenizer | None, pad_id: int
) -> tuple[np.ndarray, np.ndarray]:
  """Left-padded ``[B, T]`` tokens and their boolean mask, from any accepted input."""
  if isinstance(prompts, str):
    prompts = [prompts]
  if isinstance(prompts, (list, tuple)):
    if not prompts:
      raise GenerationError("generate() got no prompts; pass at least one.")
    if any(isinstance(p, str) for p in prompts):
      if tokenizer is None:
        raise GenerationError(
            "Prompts are strings but no tokenizer was given; pass tokenizer= or token ids."
        )
      prompts = [tokenizer.encode(p) if isinstance(p, str) else p for p in prompts]
    if attention_mask is not None:
      raise GenerationError(
          "attention_mask is only for a [B, T] token array; lists of prompts are padded "
          "by generate() itself."
      )
    tokens, mask = _left_pad([list(map(int, p)) for p in prompts], pad_id)
  else:
    tokens = np.asarray(prompts)
    if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
      raise GenerationError(
          f"Token input must be a [batch, length] integer array, got {tokens.dtype} of shape "
          f"{tokens.shape}; pass a list of token-id lists for prompts of different lengths."
      )
    mask = (
        np.ones(tokens.shape, bool) if attention_mask is None
        else np.asarray(attention_mask).astype(bool)
    )
    if mask.shape != tokens.shape:
      raise GenerationError(
          f"attention_mask has shape {mask.shape} but the tokens {tokens.shape}; give one "
          "mask entry (1 = real token) per token."
      )
    tokens = tokens.astype(np.int32)
  if not mask.any(axis=1).all():
    empty = np.flatnonzero(~mask.any(axis=1)).tolist()
    raise GenerationError(f"Prompts {empty} are empty; every row needs at least one token.")
  if (np.diff(mask.astype(np.int8), axis=1) < 0).any():
    raise GenerationError(
        "attention_mask is not left-padded (a real token is followed by padding); put the "
        "padding before each prompt, or pass a list of token-id lists."
    )
  return tokens, mask


def _eos_array(eos_ids: int | Sequence[int] | None) -> np.ndarray:
  """The ids padded with -1 (no token) to a multiple of ``_EOS_SLOTS``.

  A fixed length lets calls with different EOS ids share one compiled program.
  """
  ids = [] if eos_ids is None else [eos_ids] if isinstance(eos_ids, (int, np.integer)) else eos_ids
  slots = -(-max(len(ids), 1) // _EOS_SLOTS) * _EOS_SLOTS
  return np.array(list(ids) + [-1] * (slots - len(ids)), np.int32)


def _check_sampling(
    max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None
) -> None:
  if max_new_tokens < 1:
    raise GenerationError(f"max_new_tokens must be at least 1, got {max_new_tokens}.")
  if temperature < 0:
    raise GenerationError(
        f"temperature must be >= 0 (0 = greedy), got {temperature}."
    )
  if top_k is not None and top_k < 1:
    raise GenerationError(f"top_k must be a positive integer or None, got {top_k}.")
  if top_p is not None and not 0 < top_p <= 1:
    raise GenerationError(f"top_p must be in (0, 1] or None, got {top_p}.")


def generate(
    model: nnx.Module,
    tokens_or_prompts: Any,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    eos_ids: int | Sequence[int] | None = None,
    pad_id: int = 0,
    attention_mask: Any = None,
    tokenizer: Tokenizer | None = None,
    stream: StreamCallback | None = None,
) -> GenerateOutput:
  """Generates up to ``max_new_tokens`` tokens after each prompt.

  Args:
    model: a decoder model (``model(tokens, cache=, attention_mask=)`` and
      ``model.init_cache``), on any mesh.
    tokens_or_prompts: token-id lists (any lengths; left-padded here), a ``[B, T]``
      integer array (with ``attention_mask`` when it is left-padded), or strings when
      ``tokenizer`` is given.
    max_new_tokens: tokens to generate per row (fewer when every row stops at EOS).
    temperature: 0 decodes greedily (``top_k`` and ``top_p`` then do nothing);
      otherwise logits are divided by it, filtered and sampled.
    top_k: sample among the ``k`` most likely tokens only.
    top_p: sample from the smallest set of tokens holding probability ``p`` (nucleus).
    seed: seeds ``jax.random``; the same seed and inputs give the same tokens.
    eos_ids: ids that end a row; that row emits ``pad_id`` afterwards. By default the
      tokenizer's ``eos_ids`` when it has them (:class:`tunix_zoo.tokenizer.Tokenizer`
      does), else the model config's ``eos_token_id`` (as transformers does), else
      none; ``[]`` turns stopping off.
    pad_id: pads prompts on the left and finished rows on the right.
    attention_mask: ``[B, T]`` mask (1 = real token) of an array input.
    tokenizer: any object with ``encode(str) -> list[int]`` and ``decode(list[int])``.
    stream: called as ``stream(step, tokens)`` with the ``[B]`` tokens of every step in
      order, while decoding runs (rows that finished give ``pad_id``).

  Returns:
    A :class:`GenerateOutput` with the tokens, per-row lengths, text and timings.

  Example::

      out = generate(model, [[1, 2, 3], [4, 5]], 16, temperature=0.8, top_k=50, seed=1)
  """
  arguments.check_generate(max_new_tokens, seed, pad_id, eos_ids)
  _check_sampling(max_new_tokens, temperature, top_k, top_p)
  tokens, mask = _prompt_batch(tokens_or_prompts, attention_mask, tokenizer, pad_id)
  if eos_ids is None and tokenizer is not None:
    eos_ids = getattr(tokenizer, "eos_ids", None)
  if eos_ids is None:
    eos_ids = getattr(getattr(model, "config", None), "eos_token_id", None)
  eos_ids = _eos_array(eos_ids)
  graphdef, state = nnx.split(model)
  mesh = getattr(model, "mesh", None)
  opts = _Options(
      greedy=temperature == 0,
      use_top_k=top_k is not None,
      use_top_p=top_p is not None,
      max_new_tokens=max_new_tokens,
      streaming=stream is not None,
      mesh=mesh,
  )
  knobs = {
      "temperature": jnp.asarray(temperature or 1.0, jnp.float32),
      "top_k": jnp.asarray(top_k or 0, jnp.int32),
      "top_p": jnp.asarray(top_p or 1.0, jnp.float32),
      "eos_ids": jnp.asarray(eos_ids),
      "pad_id": jnp.asarray(pad_id, jnp.int32),
  }
  batch, prompt_len = tokens.shape
  # Whole blocks of the decode-attention kernel; the slots past the end stay masked.
  block = decode_attention.BLOCK_KEYS
  cache_len = -(-(prompt_len + max_new_tokens) // block) * block
  cache = model.init_cache(batch, cache_len)
  rules = getattr(model, "sharding_rules", None)
  prefill_args = (
      state, _batch_sharded(tokens, mesh, rules), _batch_sharded(mask, mesh, rules), cache,
      jax.random.key(seed), knobs,
  )
  options = compiler_options(model, jax.tree.leaves(state)[0].sharding.device_set)
  prefill, prefill_compile = _compile(_prefill, graphdef, opts, prefill_args, donate=(3,),
                                      options=options)

  start = time.perf_counter()
  first, done, cache, key = jax.block_until_ready(prefill(*prefill_args))
  prefill_seconds = time.perf_counter() - start

  stream_id = next(_stream_ids) % 2**31 if stream is not None else 0
  decode_args = (state, first, done, cache, key, knobs, jnp.asarray(stream_id, jnp.int32))
  decode, decode_compile = _compile(_decode, graphdef, opts, decode_args, donate=(3,),
                                    options=options)
  if stream is not None:
    stream(0, np.asarray(first))
    _streams[stream_id] = stream
  try:
    start = time.perf_counter()
    out, steps, _ = jax.block_until_ready(decode(*decode_args))
    if stream is not None:
      jax.effects_barrier()
    decode_seconds = time.perf_counter() - start
  finally:
    _streams.pop(stream_id, None)

  out = np.asarray(out)
  is_eos = np.isin(out, eos_ids)
  first_eos = np.where(is_eos.any(axis=1), is_eos.argmax(axis=1), max_new_tokens)
  lengths = np.minimum(first_eos + 1, max_new_tokens)
  text = None
  if tokenizer is not None:
    text = [tokenizer.decode(out[i, :first_eos[i]].tolist()) for i in range(batch)]
  decode_steps = int(steps) - 1
  return GenerateOutput(
      tokens=out,
      lengths=lengths,
      text=text,
      prefill_seconds=prefill_seconds,
      decode_seconds=decode_seconds,
      compile_seconds=prefill_compile + decode_compile,
      prefill_tokens_per_second=float(mask.sum()) / prefill_seconds,
      decode_tokens_per_second=batch * decode_steps / decode_seconds if decode_steps else 0.0,
  )
