"""Hand-written kernels beside the model math, chosen by an explicit :class:`KernelPolicy`.

Each kernel module says what it can run (``supports`` / ``why_unsupported``: shapes,
dtypes, platform, mesh layout) and splits itself over a mesh with its own ``shard_map``;
the layers (``tunix_zoo.layers``) hold the plain XLA path, which is the reference the
tests compare every kernel against.

- :mod:`~tunix_zoo.kernels.decode_attention`: one-token attention over the KV cache, one
  Pallas (Triton) kernel.
- :mod:`~tunix_zoo.kernels.flash_attention`: causal attention through cuDNN's flash
  attention.
- :mod:`~tunix_zoo.kernels.grouped_matmul`: the mixture-of-experts grouped matmul as
  Mosaic GPU kernels (forward and gradients).
- :mod:`~tunix_zoo.kernels.gemv`: one-row products (a batch-1 decode step) as a float32
  multiply and sum, which XLA compiles to a faster reduction kernel than its GEMM.
- :mod:`~tunix_zoo.kernels.quantized_matmul`: weight-only quantized products of a decode
  step's few rows, one Pallas (Triton) GEMV that dequantizes in registers.

Example::

    from tunix_zoo.kernels import KernelPolicy, set_kernel_policy

    set_kernel_policy(model, KernelPolicy(decode_attention="xla"))  # XLA's decode kernels
"""

from tunix_zoo.kernels.policy import KernelPolicy, set_kernel_policy

__all__ = ["KernelPolicy", "set_kernel_policy"]
