"""A minimal next-token training step: the kick test and the demo use it.

Example::

    model = AutoModel.from_config("qwen3_0p6b", mesh)
    losses = train(model, batches, optax.adamw(1e-4), steps=10)
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tunix_zoo import compilation_cache


def next_token_loss(model: nnx.Module, tokens: jax.Array, mask: jax.Array | None = None):
  """Mean cross-entropy of predicting ``tokens[:, 1:]`` from ``tokens[:, :-1]``.

  ``mask`` (1 = real token) drops padding from both the inputs and the targets.
  """
  inputs, targets = tokens[:, :-1], tokens[:, 1:]
  logits, _ = model(inputs, attention_mask=None if mask is None else mask[:, :-1])
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  # A one-hot product rather than a gather: it types on vocab-sharded Explicit meshes.
  losses = -jnp.sum(log_probs * jax.nn.one_hot(targets, logits.shape[-1]), axis=-1)
  weights = jnp.ones_like(losses) if mask is None else mask[:, 1:].astype(jnp.float32)
  return (losses * weights).sum() / jnp.maximum(weights.sum(), 1.0)


# The model's and the optimizer's buffers are donated: the step updates them in place, so
# a training run holds one copy of the weights and optimizer state, as plan_training
# counts (arguments + temporaries), not two.
@nnx.jit(donate_argnums=(0, 1))
def train_step(model: nnx.Module, optimizer: nnx.Optimizer, tokens: jax.Array) -> jax.Array:
  """One jitted optimizer step on ``tokens`` ``[B, T]``, in place; returns the loss.

  The arrays the model and optimizer held before the call are donated to it (deleted):
  read their state again after the step rather than keeping references to the old one.

  ``train_step.lower(model, optimizer, tokens).compile().memory_analysis()`` gives the
  step's device memory without running it.
  """
  loss, grads = nnx.value_and_grad(next_token_loss, argnums=nnx.DiffState(0, optimizer.wrt))(
      model, tokens
  )
  optimizer.update(model, grads)
  return loss


def _place_on_mesh(module: nnx.Module, mesh: Mesh | None) -> None:
  """Replicates on ``mesh`` the arrays of ``module`` not yet placed on it (the optimizer's
  step count is made on one device): the step returns them on the mesh, and the changed
  placement would otherwise retrace and recompile the step on its second call."""
  if mesh is None:
    return
  replicated = NamedSharding(mesh, PartitionSpec())
  state = nnx.state(module)
  placed = jax.tree.map(
      lambda x: x if isinstance(x.sharding, NamedSharding) else jax.device_put(x, replicated),
      state,
  )
  nnx.update(module, placed)


def train(
    model: nnx.Module,
    batches: Iterable[jax.Array],
    tx: optax.GradientTransformation,
    *,
    steps: int,
    wrt: Any = nnx.Param,
) -> list[float]:
  """Takes ``steps`` optimizer steps on ``batches`` (``[B, T]`` token arrays), in place.

  ``wrt`` selects the trained variables (e.g. only LoRA parameters). Returns the losses.
  Turns on the persistent compilation cache (:mod:`tunix_zoo.compilation_cache`), so a
  restarted process reuses the compiled step.
  """
  compilation_cache.enable()
  optimizer = nnx.Optimizer(model, tx, wrt=wrt)
  _place_on_mesh(optimizer, getattr(model, "mesh", None))
  # Walking the model's graph on every call costs about 0.1 s a step for a 28-layer model;
  # cached_partial walks it once.
  step = nnx.cached_partial(train_step, model, optimizer)
  iterator: Iterator[jax.Array] = iter(batches)
  return [float(step(next(iterator))) for _ in range(steps)]
