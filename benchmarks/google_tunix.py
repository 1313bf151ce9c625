"""google-tunix as a peer: its Qwen3 in the prefill and decode benchmarks, its Sampler
(rollout.py) and PeftTrainer (train_step.py).

Its wheel is not a dependency: install it where the benchmark runs, e.g.
``pip install --no-deps --target /tmp/site google-tunix==0.1.7 immutabledict`` and
``PYTHONPATH=/tmp/site`` (PeftTrainer also imports google-metrax, clu and tensorboardX;
its LoRA recipe needs qwix). Only the modules used are imported (``import_tunix``):
``tunix`` and ``tunix.models`` would import its trainers and every model family, so the
packages' ``__init__`` files are skipped.

Prefill runs its embedder, layers and final norm on the whole prompt and its LM head on
the last token (as ours does); decode is one jitted call per token with its KV cache,
greedy, as Tunix's own samplers step. Both use ``jax.jit`` over the split model state.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.util
import sys
import time
import types


def import_tunix(name: str) -> types.ModuleType:
  """The module ``name`` of the google-tunix wheel (e.g. ``tunix.generate.sampler``),
  without running the ``__init__`` files of the packages above it."""
  if name in sys.modules:
    return sys.modules[name]
  if "tunix" in sys.modules:  # Our stand-in package from an earlier call: no spec.
    root = sys.modules["tunix"].__path__[0]
  else:
    spec = importlib.util.find_spec("tunix")
    if spec is None:
      raise SystemExit("google-tunix is not importable; see benchmarks/google_tunix.py.")
    root = spec.submodule_search_locations[0]
  parts = name.split(".")
  for depth in range(1, len(parts)):
    package_name = ".".join(parts[:depth])
    if package_name not in sys.modules:
      package = types.ModuleType(package_name)
      package.__path__ = ["/".join([root, *parts[1:depth]])]
      sys.modules[package_name] = package
  try:
    importlib.import_module("jax.experimental.shard_map")
  except ImportError:  # Removed from newer jax; only Tunix's TPU flash path uses it.
    import jax

    shim = types.ModuleType("jax.experimental.shard_map")
    shim.shard_map = jax.shard_map
    sys.modules["jax.experimental.shard_map"] = shim
  return importlib.import_module(name)


def qwen3_module() -> types.ModuleType:
  """``tunix.models.qwen3.model``, without running the packages' ``__init__`` files."""
  return import_tunix("tunix.models.qwen3.model")


# Our config fields (``--set``) under Tunix's Qwen3 names.
TUNIX_FIELDS = {"hidden_size": "embed_dim", "intermediate_size": "hidden_dim",
                "num_heads": "num_heads", "num_kv_heads": "num_kv_heads",
                "head_dim": "head_dim", "vocab_size": "vocab_size", "num_layers": "num_layers"}


def tunix_fields(overrides: dict) -> dict:
  """Our config overrides (``{"hidden_size": 256}``) as Tunix Qwen3 config fields; the
  others (rope, norms) are left as the preset has them."""
  return {TUNIX_FIELDS[k]: v for k, v in overrides.items() if k in TUNIX_FIELDS}


def build(config_id: str, layers: int | None = None, dtype: str = "bfloat16",
          **fields):
  """A randomly initialised Tunix Qwen3 of the preset ``config_id`` (e.g. qwen3_8b), in
  ``dtype``; ``fields`` replace its config's (e.g. ``remat_config=RematConfig.BLOCK``)."""
  import jax.numpy as jnp
  from flax import nnx

  module = qwen3_module()
  config = getattr(module.ModelConfig, config_id)()
  if layers:  # --layers wins over a --set num_layers=N among the fields
    fields["num_layers"] = layers
  config = dataclasses.replace(config, dtype=jnp.dtype(dtype), param_dtype=jnp.dtype(dtype),
                               **fields)
  return module.Qwen3(config, rngs=nnx.Rngs(0)), config


def _logits(model, config, x):
  return model.embedder.decode(x) if config.use_tied_embedding else model.lm_head(x)


def prefill_seconds(config_id: str, batch: int, length: int, bench) -> tuple[float, float, int]:
  """(seconds per prefill, compile seconds, parameter count) through ``bench``."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  model, config = build(config_id)
  tokens = jax.random.randint(jax.random.key(0), (batch, length), 0, config.vocab_size)
  positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
  causal = jnp.broadcast_to(jnp.tril(jnp.ones((length, length), bool)), (batch, length, length))

  graphdef, state = nnx.split(model)

  @jax.jit
  def prefill(state, tokens, positions, mask):
    model = nnx.merge(graphdef, state)
    x = model.embedder.encode(tokens)
    for layer in model.layers:
      _, x = layer(x, positions, None, mask)
    return _logits(model, config, model.final_norm(x[:, -1:]))

  seconds, compile_s = bench(
      lambda: prefill(state, tokens, positions, causal).block_until_ready()
  )
  params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  return seconds, compile_s, params


def decode_step_seconds(config_id: str, batch: int, prompt: int, new_tokens: int) -> float:
  """Seconds per greedy decoding step, one jitted call per step."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  model, config = build(config_id)
  cache_len = prompt + new_tokens
  cache = model.init_cache(batch, cache_len, jnp.bfloat16)
  tokens = jax.random.randint(jax.random.key(0), (batch, prompt), 3, config.vocab_size)
  slots = jnp.arange(cache_len)

  graphdef, state = nnx.split(model)  # Plain jax.jit: nnx.jit's per-call graph walk is slow.

  @functools.partial(jax.jit, donate_argnums=2)
  def forward(state, tokens, cache, start):
    length = tokens.shape[1]
    positions = jnp.broadcast_to(start + jnp.arange(length), tokens.shape)
    mask = jnp.broadcast_to(slots[None, :] <= positions[0][:, None], (batch, length, cache_len))
    logits, cache = nnx.merge(graphdef, state)(tokens, positions, cache, mask)
    return jnp.argmax(logits[:, -1], axis=-1)[:, None].astype(jnp.int32), cache

  token, cache = forward(state, tokens, cache, jnp.int32(0))
  token, cache = forward(state, token, cache, jnp.int32(prompt))  # Compile the step.
  token.block_until_ready()
  start = time.perf_counter()
  for i in range(prompt + 1, cache_len):
    token, cache = forward(state, token, cache, jnp.int32(i))
  token.block_until_ready()
  return (time.perf_counter() - start) / (cache_len - prompt - 1)
