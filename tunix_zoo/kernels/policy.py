"""Which kernel each layer runs: one frozen :class:`KernelPolicy`, held by the layers.

The policy is a static attribute of the layers that dispatch (``Attention``,
``Experts``, ``Linear``), so it is part of the model's graph definition: ``nnx.jit`` and
``generate`` compile again when it changes, and two models may hold different ones.

Every field takes ``"auto"`` (the kernel where it can run and is the faster choice, XLA
elsewhere), ``"xla"`` (never the kernel) or the kernel's own name, which forces it: a
forced kernel that cannot serve a call of its kind raises :class:`KernelError` at trace
time instead of falling back.

Example::

    policy = KernelPolicy(decode_attention="interpret")  # Pallas's interpreter, on any device
    set_kernel_policy(model, policy)
    logits, cache = model(next_token, cache=cache)
"""

from __future__ import annotations

import dataclasses
import logging

import jax
from flax import nnx

from tunix_zoo.errors import KernelError

# field -> its settings; the first is the default.
SETTINGS: dict[str, tuple[str, ...]] = {
    "decode_attention": ("auto", "pallas", "interpret", "xla"),
    "flash_attention": ("auto", "cudnn", "xla"),
    "moe": ("auto", "mosaic_gpu", "xla"),
    "quantized_matmul": ("auto", "pallas", "interpret", "xla"),
    "gemv": ("auto", "reduction", "xla"),
}


@dataclasses.dataclass(frozen=True)
class KernelPolicy:
  """The kernel each layer runs.

  - ``decode_attention``: one-token attention over the KV cache. ``"pallas"`` (the
    Triton kernel, GPU), ``"interpret"`` (the same kernel in Pallas's interpreter, any
    device: for tests); ``"auto"`` runs it on GPUs for 16-bit floats.
  - ``flash_attention``: causal attention without a mask array (training, a prefill
    without padding). ``"cudnn"``; ``"auto"`` asks cuDNN on GPUs for 16-bit floats and
    takes XLA's path where cuDNN refuses the shapes.
  - ``moe``: the experts' grouped matmuls. ``"mosaic_gpu"`` (Hopper, 16-bit floats,
    expert matrices tiling by 128, per device under ``shard_map`` on a mesh); ``"auto"``
    runs it where it can and logs once on a GPU where it cannot.
  - ``quantized_matmul``: the products of weight-only quantized Linears (int8, int4, nf4,
    fp8) with a few rows (a decode step). ``"pallas"`` (a Triton GEMV that dequantizes in
    registers, GPU), ``"interpret"`` (Pallas's interpreter, any device); ``"auto"`` runs
    it for int4 and nf4 on GPUs where the shapes tile (XLA's int8 product is faster, see
    ``quantized_matmul.AUTO_KINDS``). Calls of more rows (a prefill) are XLA's always.
  - ``gemv``: one-row products of Linear layers and of a tied LM head (a batch-1 decode
    step). ``"reduction"`` writes them as a float32 multiply and sum, which XLA compiles
    to a reduction kernel that streams the weight faster than its GEMM (and decodes int8
    / int4 weights in its loads); ``"auto"`` does so on GPUs for float and int8 weights
    in products of 8M multiply-adds and more (:mod:`tunix_zoo.kernels.gemv`: Qwen3-8B
    decodes 9% faster at batch 1, int8 13%), ahead of an ``"auto"`` ``quantized_matmul``.

  Example::

    KernelPolicy(moe="xla")  # XLA's ragged_dot for the experts, the default elsewhere
  """

  decode_attention: str = "auto"
  flash_attention: str = "auto"
  moe: str = "auto"
  quantized_matmul: str = "auto"
  gemv: str = "auto"

  def __post_init__(self):
    for field, settings in SETTINGS.items():
      value = getattr(self, field)
      if value not in settings:
        raise KernelError(
            f"KernelPolicy({field}={value!r}): not a setting; choose one of "
            f"{', '.join(map(repr, settings))}."
        )


def set_kernel_policy(model: nnx.Module, policy: KernelPolicy) -> nnx.Module:
  """Sets ``policy`` on every layer of ``model`` that dispatches to a kernel; returns
  ``model``. Takes effect at the next trace (jitted calls compile again).

  Example::

    set_kernel_policy(model, KernelPolicy(decode_attention="xla", moe="xla"))
  """
  if not isinstance(policy, KernelPolicy):
    raise KernelError(f"policy must be a KernelPolicy, not {type(policy).__name__}.")
  for _, module in nnx.iter_modules(model):
    if hasattr(module, "kernel_policy"):
      module.kernel_policy = policy
  return model


log = logging.getLogger(__name__)
_logged: set[tuple[str, str]] = set()  # (field, why-not) fallbacks already logged


def runs_kernel(field: str, setting: str, why_not: str | None, preferred: bool = True,
                fallback: str | None = None) -> bool:
  """Whether a call of the kernel's kind runs the kernel under ``setting``.

  ``why_not`` says why the kernel cannot serve the call (None: it can); ``preferred``
  whether ``"auto"`` should take it (e.g. 16-bit floats only). A forced setting that
  cannot serve raises KernelError. ``fallback``, a message with one ``%s`` for
  ``why_not``, is logged once per reason when ``"auto"`` falls back on a GPU.
  """
  if setting == "xla":
    return False
  if setting == "auto":
    if (why_not is not None and fallback and (field, why_not) not in _logged
        and jax.default_backend() == "gpu"):
      _logged.add((field, why_not))
      log.warning(fallback, why_not)
    return why_not is None and preferred
  if why_not is not None:
    raise KernelError(
        f"KernelPolicy({field}={setting!r}) cannot run here: {why_not}. Use "
        f"{field}='auto' (the kernel where it can run, XLA elsewhere) or 'xla'."
    )
  return True
