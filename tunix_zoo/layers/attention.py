"""Multi-head attention with GQA, optional q/k/v bias, QK-norm, sliding window,
logit soft-capping and a KV cache.

The cache of one layer is ``{"k": [B, S, K, H], "v": [B, S, K, H]}``; new keys and
values are written at the model-wide cache index. Masks are built once per forward
by the decoder (see :func:`attention_masks`) and shared by all layers.

Example::

    attn = Attention(config, layer=0, rngs=nnx.Rngs(0))
    out, layer_cache = attn(x, positions, mask, layer_cache=None, cache_index=0)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import AbstractMesh, Mesh

from tunix_zoo import sharding
from tunix_zoo.config import DecoderConfig
from tunix_zoo.kernels import decode_attention, flash_attention
from tunix_zoo.kernels.policy import KernelPolicy
from tunix_zoo.layers.basic import Linear, RMSNorm
from tunix_zoo.layers.rope import RotaryAngles, apply_rope, inverse_frequencies, rotary_angles

LayerCache = dict[str, jax.Array]


def attention_masks(
    query_slots: jax.Array,
    key_valid: jax.Array,
    windows: set[int | None],
    full_mask: jax.Array | None = None,
) -> dict[int | None, jax.Array]:
  """Boolean ``[B, T, S]`` masks, one per sliding window size (``None`` = full).

  ``query_slots`` ``[T]`` are the cache slots the queries are written to; key slot
  ``s`` is visible when it is valid (not padding), not in the future and, for a
  window ``w``, within ``w`` slots of the query — as transformers counts it.
  ``full_mask`` (Tunix's ``[B, T, S]`` convention) replaces causal + padding.
  """
  key_slots = jnp.arange(key_valid.shape[1])
  distance = query_slots[:, None] - key_slots[None, :]  # [T, S]
  if full_mask is None:
    base = (distance >= 0)[None] & key_valid[:, None, :].astype(bool)
  else:
    base = full_mask.astype(bool)
  return {w: base if w is None else base & (distance < w)[None] for w in windows}


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array | None,
    scale: float,
    softcap: float | None = None,
    window: int | None = None,
) -> jax.Array:
  """Attention of ``q`` ``[B, T, N, H]`` over ``k, v`` ``[B, S, K, H]`` (``N % K == 0``).

  ``mask`` is a boolean ``[B, T, S]``; None means plain causal attention over a sequence
  without padding or cache (limited to ``window`` keys when given). XLA's path: the
  reference the kernels of :mod:`tunix_zoo.kernels` are checked against.
  """
  if softcap is None:
    if mask is None:
      local = None if window is None else (window - 1, 0)
      return jax.nn.dot_product_attention(
          q, k, v, scale=scale, is_causal=True, local_window_size=local
      )
    return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], scale=scale)
  if mask is None:
    distance = jnp.arange(q.shape[1])[:, None] - jnp.arange(k.shape[1])[None, :]
    allowed = (distance >= 0) & (True if window is None else distance < window)
    mask = jnp.broadcast_to(allowed, (q.shape[0],) + allowed.shape)
  b, t, n, h = q.shape
  groups = n // k.shape[2]
  q = q.reshape(b, t, k.shape[2], groups, h)
  logits = jnp.einsum("btkgh,bskh->bkgts", q, k).astype(jnp.float32) * scale
  logits = jnp.tanh(logits / softcap) * softcap
  logits = jnp.where(mask[:, None, None], logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("bkgts,bskh->btkgh", probs, v).reshape(b, t, n, h)


class Attention(nnx.Module):
  """Self-attention of one decoder layer, configured by the shared DecoderConfig."""

  def __init__(
      self,
      config: DecoderConfig,
      layer: int,
      *,
      rngs: nnx.Rngs | None,
      dtype: Any = jnp.float32,
      param_dtype: Any = jnp.float32,
      sharding_rules: sharding.Rules | None = None,
      kernel_policy: KernelPolicy | None = None,
  ):
    c = config
    self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
    self.scale = c.attention_scale
    self.softcap = c.attn_logit_softcap
    self.window = c.layer_window(layer)
    self.rope = c.layer_rope(layer)
    self.sharding_rules = sharding_rules
    self.kernel_policy = kernel_policy or KernelPolicy()
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    q_dim, kv_dim = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    self.q_proj = Linear(c.hidden_size, q_dim, ("heads", "embed"), use_bias=c.attention_bias, **kw)
    self.k_proj = Linear(
        c.hidden_size, kv_dim, ("kv_heads", "embed"), use_bias=c.attention_bias, **kw
    )
    self.v_proj = Linear(
        c.hidden_size, kv_dim, ("kv_heads", "embed"), use_bias=c.attention_bias, **kw
    )
    self.o_proj = Linear(q_dim, c.hidden_size, ("embed", "heads"), **kw)
    norm_kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.q_norm = RMSNorm.of(c.head_dim, c, **norm_kw) if c.qk_norm else None
    self.k_norm = RMSNorm.of(c.head_dim, c, **norm_kw) if c.qk_norm else None

  @property
  def mesh(self) -> Mesh | AbstractMesh | None:
    """The mesh the layer's parameters are on (abstract inside a trace)."""
    return sharding.mesh_of(self.q_proj.weight.get_value())

  def _heads(self, x: jax.Array, num: int, logical: str, mesh) -> jax.Array:
    x = x.reshape(*x.shape[:2], num, self.head_dim)
    return sharding.constrain(
        x, ("batch", None, logical, None), mesh, self.sharding_rules, {logical: num}
    )

  def rotary_angles(self, positions: jax.Array) -> RotaryAngles:
    """The cos and sin this layer rotates its queries and keys at ``positions`` ``[B, T]``
    by; ``__call__`` takes them in place of the positions.

    Example::

        out, cache = attn(x, attn.rotary_angles(positions), masks, None, 0)
    """
    return rotary_angles(positions, inverse_frequencies(self.rope, self.head_dim))

  def __call__(
      self,
      x: jax.Array,
      positions: jax.Array | RotaryAngles,
      masks: dict[int | None, jax.Array | None],
      layer_cache: LayerCache | None,
      cache_index: jax.Array | int,
  ) -> tuple[jax.Array, LayerCache | None]:
    mesh = self.mesh
    q = self._heads(self.q_proj(x), self.num_heads, "heads", mesh)
    k = self._heads(self.k_proj(x), self.num_kv_heads, "kv_heads", mesh)
    v = self._heads(self.v_proj(x), self.num_kv_heads, "kv_heads", mesh)
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    angles = positions if isinstance(positions, RotaryAngles) else self.rotary_angles(positions)
    q, k = apply_rope(q, angles), apply_rope(k, angles)
    # A scanned layer stack passes its whole [B, L, S, K, H] cache and the layer's number
    # (see tunix_zoo.layers.decoder.LayerStack): only this layer's new slots are written.
    layer = None if layer_cache is None else layer_cache.get("layer")
    if layer_cache is not None:
      if layer is not None:
        k, v = k[:, None], v[:, None]
      start = (0, cache_index, 0, 0) if layer is None else (0, layer, cache_index, 0, 0)
      layer_cache = {
          name: jax.lax.dynamic_update_slice(layer_cache[name], new.astype(
              layer_cache[name].dtype), start)
          for name, new in (("k", k), ("v", v))
      }
      k, v = layer_cache["k"], layer_cache["v"]
    mask = masks[self.window]
    out = self._kernel_attention(q, k, v, mask, mesh, layer)
    if out is None:
      if layer is not None:
        # XLA's path takes this layer's slice out of the stack (a copy of its K and V).
        k, v = (jax.lax.dynamic_index_in_dim(x, layer, 1, keepdims=False) for x in (k, v))
      k, v = k.astype(q.dtype), v.astype(q.dtype)
      out = dot_product_attention(q, k, v, mask, self.scale, self.softcap, self.window)
    return self.o_proj(out.reshape(*out.shape[:2], -1)), layer_cache

  def _kernel_attention(self, q, k, v, mask, mesh, layer) -> jax.Array | None:
    """The attention as the ``kernel_policy``'s kernel computes it; None where XLA's
    :func:`dot_product_attention` serves. With ``layer``, ``k`` and ``v`` are the layer
    stack's whole cache, which the decode kernel reads in place."""
    policy = self.kernel_policy
    if mask is None:
      return flash_attention.attend(
          q, k, v, self.scale, self.window, setting=policy.flash_attention, softcap=self.softcap
      )
    return decode_attention.attend(
        q, k, v, mask, self.scale, self.softcap, setting=policy.decode_attention, mesh=mesh,
        rules=self.sharding_rules, layer=layer,
    )
