"""Prefill benchmark: batch x length tokens through the model, last-token logits.

Random weights of a preset's shapes (``AutoModel.from_config``, bf16) on all local
devices; peers on the same GPU with the same shapes: transformers (torch, sdpa; eager,
or ``transformers_compile`` through ``torch.compile``) and ``google_tunix`` (its Qwen3,
see google_tunix.py). Prints JSON.

    python benchmarks/prefill.py --model qwen3_0p6b --batch 8 --length 2048
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

PEAK_BF16_FLOPS = 989e12  # H100 SXM dense bf16


def prefill_flops(config, parameters: int, batch: int, length: int) -> float:
  """Model FLOPs of a prefill: 2 x decoder-layer parameters per token, causal attention
  (QK^T and PV, half the square), and the LM head on the last token of each row."""
  embed = config.vocab_size * config.hidden_size
  layer_params = parameters - embed * (1 if config.tie_word_embeddings else 2)
  attention = 2 * 2 * config.num_layers * config.num_heads * config.head_dim * length / 2
  return (2 * layer_params + attention) * batch * length + 2 * embed * batch


def bench(fn, warmup: int = 2, iters: int = 5) -> tuple[float, float]:
  start = time.perf_counter()
  fn()
  compile_s = time.perf_counter() - start
  for _ in range(warmup - 1):
    fn()
  start = time.perf_counter()
  for _ in range(iters):
    fn()
  return (time.perf_counter() - start) / iters, compile_s


def run_tunix_zoo(config_id: str, batch: int, length: int, layers: int | None = None,
                  scan_layers: bool = False, overrides: tuple[str, ...] = (),
                  dtype: str = "bfloat16") -> dict:
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from tunix_zoo.automodel import AutoModel
  from tunix_zoo import registry
  from tunix_zoo.config import count_parameters
  from tunix_zoo.config_overrides import config_with_overrides, parse_overrides

  config = config_with_overrides(registry.get_config(config_id), parse_overrides(overrides))
  if layers is not None:  # For compile time against depth.
    config = config.replace(num_layers=layers, layer_types=config.layer_types[:layers])
  mesh = jax.make_mesh((1, len(jax.devices())), ("fsdp", "tp"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  model = AutoModel.from_config(config, mesh, dtype=dtype, param_dtype=dtype,
                                scan_layers=scan_layers)
  tokens = jax.random.randint(jax.random.key(0), (batch, length), 0, config.vocab_size)

  # jax.jit over the split state: nnx.jit walks the model's graph on every call, which
  # costs the 0.6B model about half of its prefill time.
  graphdef, state = nnx.split(model)

  @jax.jit
  def prefill(state, tokens):
    model = nnx.merge(graphdef, state)
    hidden, _ = model.hidden_states(tokens)
    return model.logits(hidden[:, -1:])

  seconds, compile_s = bench(lambda: prefill(state, tokens).block_until_ready())
  params = count_parameters(config)
  flops = prefill_flops(config, params, batch, length)
  return dict(seconds=seconds, compile_seconds=compile_s, tokens_per_s=batch * length / seconds,
              mfu=flops / seconds / PEAK_BF16_FLOPS, device=jax.devices()[0].device_kind,
              jax=jax.__version__)


def run_transformers(config_id: str, batch: int, length: int, compiled: bool = False) -> dict:
  import torch

  import transformers_peer

  config, model = transformers_peer.random_model(config_id)
  tokens = torch.randint(0, config.vocab_size, (batch, length), device="cuda")
  forward = torch.compile(model) if compiled else model

  def step():
    with torch.no_grad():
      forward(input_ids=tokens, logits_to_keep=1).logits.float().sum().item()

  seconds, compile_s = bench(step)
  params = sum(p.numel() for p in model.parameters())
  flops = prefill_flops(config, params, batch, length)
  return dict(seconds=seconds, compile_seconds=compile_s, tokens_per_s=batch * length / seconds,
              mfu=flops / seconds / PEAK_BF16_FLOPS, torch=torch.__version__)


def run_google_tunix(config_id: str, batch: int, length: int) -> dict:
  import jax

  import google_tunix
  from tunix_zoo import registry

  seconds, compile_s, params = google_tunix.prefill_seconds(config_id, batch, length, bench)
  flops = prefill_flops(registry.get_config(config_id), params, batch, length)
  return dict(seconds=seconds, compile_seconds=compile_s, tokens_per_s=batch * length / seconds,
              mfu=flops / seconds / PEAK_BF16_FLOPS, jax=jax.__version__)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--model", default="qwen3_0p6b")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--length", type=int, default=2048)
  parser.add_argument("--libraries", default="tunix_zoo,transformers")
  parser.add_argument("--layers", type=int, help="override the depth (tunix_zoo only)")
  parser.add_argument("--scan-layers", action="store_true",
                      help="tunix_zoo's scanned layer stack (compile time flat in depth)")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="override a config field (tunix_zoo only), e.g. --set hidden_size=256")
  parser.add_argument("--dtype", default="bfloat16", help="tunix_zoo's parameter and compute dtype")
  args = parser.parse_args()
  report = dict(model=args.model, batch=args.batch, length=args.length, layers=args.layers,
                scan_layers=args.scan_layers, overrides=args.set)
  for library in args.libraries.split(","):
    if library == "tunix_zoo":
      report[library] = run_tunix_zoo(args.model, args.batch, args.length, args.layers,
                                      args.scan_layers, tuple(args.set), args.dtype)
    elif library == "google_tunix":
      report[library] = run_google_tunix(args.model, args.batch, args.length)
    else:
      report[library] = run_transformers(args.model, args.batch, args.length,
                                         compiled=library == "transformers_compile")
  if "tunix_zoo" in report and "transformers" in report:
    report["speedup_vs_transformers"] = (
        report["tunix_zoo"]["tokens_per_s"] / report["transformers"]["tokens_per_s"]
    )
  print(json.dumps(report, indent=1))


if __name__ == "__main__":
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
  main()
