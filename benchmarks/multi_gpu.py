"""Multi-GPU check: Qwen3-1.7B-shaped random weights loaded on (1, N) and (N, 1) meshes
give the logits of one GPU. Prints JSON (max abs differences, load seconds).

    python benchmarks/multi_gpu.py --model qwen3_1p7b --dir /tmp/q17
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--model", default="qwen3_1p7b")
  parser.add_argument("--dir", type=pathlib.Path, required=True)
  args = parser.parse_args()
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  from benchmarks.load import make_random_checkpoint
  from tunix_zoo import AutoModel

  # Compare shardings, not TF32 rounding: full float32 matmuls.
  jax.config.update("jax_default_matmul_precision", "highest")
  if not (args.dir / "config.json").exists():
    make_random_checkpoint(args.model, args.dir, dtype="float32")
  n = len(jax.devices())
  tokens = jnp.asarray(np.random.default_rng(0).integers(3, 1000, (4, 256)))
  mask = jnp.ones_like(tokens).at[1, :17].set(0)
  forward = nnx.jit(lambda m, t, k: m(t, attention_mask=k)[0])
  report = dict(model=args.model, devices=n, device=jax.devices()[0].device_kind)
  reference = None
  for shape in [(1, 1), (1, n), (n, 1)]:
    for axis_type in (jax.sharding.AxisType.Explicit, jax.sharding.AxisType.Auto):
      mesh = jax.make_mesh(shape, ("fsdp", "tp"), axis_types=(axis_type,) * 2,
                           devices=jax.devices()[: shape[0] * shape[1]])
      start = time.perf_counter()
      model, _ = AutoModel.from_pretrained(str(args.dir), mesh)
      jax.block_until_ready(nnx.state(model))
      seconds = time.perf_counter() - start
      logits = np.asarray(forward(model, tokens, mask), np.float32)
      if reference is None:
        reference = logits
      real = np.asarray(mask, bool)
      report[f"{shape[0]}x{shape[1]}_{axis_type.name.lower()}"] = dict(
          load_seconds=seconds,
          max_abs_diff_vs_one_gpu=float(np.abs(logits - reference)[real].max()),
          q_proj_spec=str(model.layers[0].attn.q_proj.weight[...].sharding.spec),
      )
      del model
  print(json.dumps(report, indent=1))


if __name__ == "__main__":
  main()
