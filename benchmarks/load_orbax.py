"""Orbax (Kaggle Flax) Gemma 3 load: tunix_zoo vs google-tunix 0.1.7 on the same folder.

Prints one JSON object: per loader, seconds, bytes, peak RSS and peak anonymous-memory
growth and their ratio to the weights' bytes. The checkpoint is random, of the real
Gemma 3 1B shapes, in gemma's layout, written with orbax as gemma saves it::

    python benchmarks/load_orbax.py --dir /tmp/gemma3_1b_orbax
    python benchmarks/load_orbax.py --dir /tmp/gemma3_1b_orbax --loaders tunix_zoo

Each loader runs in its own subprocess so the peaks are its own. tunix_zoo reads each
device's slice with tensorstore; Tunix's ``gemma3/params.py`` restores the whole tree on
the host (``StandardCheckpointer().restore``), then places it on the mesh. On a CPU host
the loaded weights themselves live in host memory, so a ratio of 1.0 is the floor.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import pathlib
import subprocess
import sys
import time
import types

import numpy as np

from benchmarks.load import AnonymousPeak, current_rss_bytes, peak_rss_bytes

REPO = pathlib.Path(__file__).resolve().parents[1]


def make_random_orbax(preset: str, folder: pathlib.Path, seed: int = 0) -> int:
  """Writes random bf16 weights of a Gemma 3 preset in gemma's flat orbax tree; returns bytes."""
  import ml_dtypes
  import orbax.checkpoint as ocp

  from tunix_zoo import registry

  c = registry.get_config(preset)
  n, k, h, d, f = c.num_heads, c.num_kv_heads, c.head_dim, c.hidden_size, c.intermediate_size
  rng = np.random.default_rng(seed)

  def rand(*shape):
    return (rng.standard_normal(shape, np.float32) * 0.02).astype(ml_dtypes.bfloat16)

  tree = {"transformer/embedder": {"input_embedding": rand(c.vocab_size, d)},
          "transformer/final_norm": {"scale": rand(d)}}
  for i in range(c.num_layers):
    layer = f"transformer/layer_{i}/"
    tree[layer + "attn/q_einsum"] = {"w": rand(n, d, h)}
    tree[layer + "attn/kv_einsum"] = {"w": rand(2, k, d, h)}
    tree[layer + "attn/attn_vec_einsum"] = {"w": rand(n, h, d)}
    tree[layer + "attn/_query_norm"] = {"scale": rand(h)}
    tree[layer + "attn/_key_norm"] = {"scale": rand(h)}
    tree[layer + "mlp/gating_einsum"] = {"w": rand(2, f, d)}
    tree[layer + "mlp/linear"] = {"w": rand(f, d)}
    for norm in ("pre_attention_norm", "post_attention_norm", "pre_ffw_norm", "post_ffw_norm"):
      tree[layer + norm] = {"scale": rand(d)}
  ocp.PyTreeCheckpointer().save(folder.absolute(), tree)
  return sum(leaf.nbytes for leaves in tree.values() for leaf in leaves.values())


def tunix_gemma3_params() -> types.ModuleType:
  """``tunix.models.gemma3.params`` without running the packages' ``__init__`` files
  (they import every trainer); see benchmarks/google_tunix.py."""
  spec = importlib.util.find_spec("tunix")
  if spec is None:
    raise SystemExit("google-tunix is not importable; see benchmarks/google_tunix.py.")
  root = spec.submodule_search_locations[0]
  for name, path in (("tunix", root), ("tunix.models", f"{root}/models"),
                     ("tunix.models.gemma3", f"{root}/models/gemma3")):
    if name not in sys.modules:
      package = types.ModuleType(name)
      package.__path__ = [path]
      sys.modules[name] = package
  try:
    importlib.import_module("jax.experimental.shard_map")
  except ImportError:  # Removed from newer jax; only Tunix's TPU paths use it.
    import jax

    shim = types.ModuleType("jax.experimental.shard_map")
    shim.shard_map = jax.shard_map
    sys.modules["jax.experimental.shard_map"] = shim
  return importlib.import_module("tunix.models.gemma3.params")


def measure(loader: str, preset: str, folder: str) -> dict:
  import jax
  from flax import nnx
  from jax.sharding import AxisType

  from tunix_zoo import AutoModel, ModelSource

  if loader == "google_tunix":
    params = tunix_gemma3_params()
    config = getattr(sys.modules["tunix.models.gemma3.model"].ModelConfig, f"{preset}_it")()
  else:
    # Imported before the baseline, as Tunix's loader is above: the peaks are the loads'.
    importlib.import_module("tunix_zoo.automodel")
    importlib.import_module("tunix_zoo.checkpoint.orbax_io")
  jax.numpy.zeros(1).block_until_ready()  # Start the backend before the clock.
  # Auto axes, as Tunix passes them (its loader's sharding constraints need them).
  mesh = jax.make_mesh((1, len(jax.devices())), ("fsdp", "tp"), axis_types=(AxisType.Auto,) * 2)
  baseline = current_rss_bytes()
  anonymous = AnonymousPeak()
  start = time.perf_counter()
  if loader == "tunix_zoo":
    model, _ = AutoModel.from_pretrained(preset, mesh, model_source=ModelSource.LOCAL,
                                         model_path=folder)
  else:
    with mesh:
      model = params.create_model_from_checkpoint(folder, config, mesh)
  state = nnx.state(model, nnx.Param)
  jax.block_until_ready(state)
  seconds = time.perf_counter() - start
  nbytes = sum(x.nbytes for x in jax.tree.leaves(state))
  rss, anon = peak_rss_bytes() - baseline, anonymous.growth()
  return dict(seconds=seconds, bytes=nbytes, peak_rss_growth_bytes=rss,
              peak_anonymous_growth_bytes=anon, peak_rss_ratio=rss / nbytes,
              peak_anonymous_ratio=anon / nbytes, device=str(jax.devices()[0].device_kind))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--model", default="gemma3_1b", help="a Gemma 3 preset, e.g. gemma3_270m")
  parser.add_argument("--dir", required=True, type=pathlib.Path)
  parser.add_argument("--loaders", default="tunix_zoo,google_tunix")
  parser.add_argument("--measure", choices=["tunix_zoo", "google_tunix"], help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.measure:
    print(json.dumps(measure(args.measure, args.model, str(args.dir))))
    return
  made = None
  if not (args.dir / "_METADATA").exists():
    start = time.perf_counter()
    made = dict(bytes=make_random_orbax(args.model, args.dir), seconds=time.perf_counter() - start)
  report = dict(model=args.model, checkpoint=str(args.dir), made=made)
  for loader in args.loaders.split(","):
    out = subprocess.run([sys.executable, "-m", "benchmarks.load_orbax", "--measure", loader,
                          "--model", args.model, "--dir", str(args.dir)], check=True, capture_output=True, text=True,
                         cwd=REPO)
    report[loader] = json.loads(out.stdout.strip().splitlines()[-1])
  print(json.dumps(report, indent=1))


if __name__ == "__main__":
  main()
