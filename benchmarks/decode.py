"""Decode benchmark: tokens/s with a KV cache, and the fraction of the HBM roofline.

Random weights of a preset's shapes (bf16). tunix_zoo decodes with ``generate`` (one
jitted while_loop); transformers with ``model.generate`` (sdpa; eager with its dynamic cache, and as
``transformers_compile`` with a static cache, which generate compiles itself);
``google_tunix`` one jitted call per token (see google_tunix.py).
Roofline: per step every weight (but an untied input embedding, of which a step reads
only its tokens' rows) and the whole KV cache buffer are read once; the
step's floor is those bytes over the measured device copy bandwidth. Prints JSON.
``--quantization none,int8,int4`` runs tunix_zoo once per weight format (``from_config(...,
quantization=...)``; the weights' bytes are the quantized values plus scales);
each format in its own process; ``--quant-kernel`` picks their decode products' kernel
(``KernelPolicy.quantized_matmul``), ``--gemv`` the one-row products' formulation
(``KernelPolicy.gemv``).

    python benchmarks/decode.py --model qwen3_0p6b --batch 1 --new-tokens 256
    python benchmarks/decode.py --model qwen3_8b --libraries tunix_zoo --quantization none,int8,int4
    python benchmarks/decode.py --model qwen3_8b --libraries tunix_zoo --quant-kernel pallas \
        --quantization none,int8,int4
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time


def copy_bandwidth_bytes_per_s() -> float:
  """Device memory bandwidth from a large jitted copy, counting read + write."""
  import jax
  import jax.numpy as jnp

  # 4 GiB on an accelerator; 64 MiB on CPU, where this runs only as a smoke test.
  x = jnp.ones((1 << 30 if jax.default_backend() != "cpu" else 1 << 24,), jnp.float32)
  copy = jax.jit(lambda a: a + 1)
  copy(x).block_until_ready()
  start = time.perf_counter()
  for _ in range(5):
    y = copy(x)
  y.block_until_ready()
  return 2 * x.nbytes * 5 / (time.perf_counter() - start)


def step_weight_bytes(config, dtype: str = "bfloat16", quantization: str | None = None) -> int:
  """Weight bytes a decoding step reads: every weight but an untied input embedding, of
  which a step reads only its tokens' rows."""
  import jax.numpy as jnp

  from tunix_zoo.planning import plan_model

  weight_bytes = plan_model(config, (1, 1), jnp.dtype(dtype).name,
                            quantization=quantization).bytes_total
  if not config.tie_word_embeddings:
    weight_bytes -= jnp.dtype(dtype).itemsize * config.vocab_size * config.hidden_size
  return weight_bytes


def run_tunix_zoo(config_id: str, batch: int, prompt: int, new_tokens: int,
                  decode_kernel: str = "auto", layers: int | None = None,
                  quantization: str | None = None, scan_layers: bool = False,
                  overrides: tuple[str, ...] = (), dtype: str = "bfloat16",
                  quant_kernel: str = "auto", gemv: str = "auto") -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np

  from tunix_zoo import registry
  from tunix_zoo.automodel import AutoModel
  from tunix_zoo.generation import generate
  from tunix_zoo.config_overrides import config_with_overrides, parse_overrides
  from tunix_zoo.kernels import KernelPolicy, set_kernel_policy

  config = config_with_overrides(registry.get_config(config_id), parse_overrides(overrides))
  if layers is not None:  # For compile time against depth.
    config = config.replace(num_layers=layers, layer_types=config.layer_types[:layers])
  mesh = jax.make_mesh((1, len(jax.devices())), ("fsdp", "tp"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  model = AutoModel.from_config(config, mesh, dtype=dtype, param_dtype=dtype,
                                quantization=quantization, scan_layers=scan_layers)
  set_kernel_policy(model, KernelPolicy(decode_attention=decode_kernel,
                                        quantized_matmul=quant_kernel, gemv=gemv))
  tokens = np.random.default_rng(0).integers(3, config.vocab_size, (batch, prompt))
  start = time.perf_counter()
  first = generate(model, tokens, new_tokens)
  first_call_seconds = time.perf_counter() - start
  compile_seconds = first.compile_seconds  # Prefill + decode.
  out = generate(model, tokens, new_tokens)
  step_seconds = out.decode_seconds / (new_tokens - 1)
  itemsize = jnp.dtype(dtype).itemsize
  weight_bytes = step_weight_bytes(config, dtype, quantization)
  cache_len = prompt + new_tokens  # What must be read; generate's buffer may be longer.
  # k and v, every layer, the whole cache buffer.
  cache_bytes = (2 * itemsize * config.num_layers * batch * cache_len * config.num_kv_heads
                 * config.head_dim)
  bandwidth = copy_bandwidth_bytes_per_s()
  floor = (weight_bytes + cache_bytes) / bandwidth
  return dict(
      decode_tokens_per_s=out.decode_tokens_per_second, step_ms=1e3 * step_seconds,
      roofline_step_ms=1e3 * floor, roofline_fraction=floor / step_seconds,
      copy_bandwidth_tb_s=bandwidth / 1e12, compile_seconds=compile_seconds,
      first_call_seconds=first_call_seconds,
      prefill_tokens_per_s=out.prefill_tokens_per_second,
      weight_bytes=weight_bytes, device_bytes_in_use=device_bytes_in_use(),
      quant_kernel=quant_kernel if quantization else None, gemv=gemv,
      device=jax.devices()[0].device_kind, jax=jax.__version__,
  )


def device_bytes_in_use() -> int | None:
  """The first device's allocated bytes (None where the backend keeps no statistics)."""
  import jax

  stats = jax.devices()[0].memory_stats()
  return stats.get("bytes_in_use") if stats else None


def run_transformers(config_id: str, batch: int, prompt: int, new_tokens: int,
                     compiled: bool = False) -> dict:
  """transformers ``generate``: eager with its dynamic cache, or (``compiled``) with a
  static cache, for which generate compiles the decoding step itself (torch.compile,
  CUDA graphs)."""
  import torch
  import transformers

  import transformers_peer

  config, model = transformers_peer.random_model(config_id)
  tokens = torch.randint(3, config.vocab_size, (batch, prompt), device="cuda")
  cache = dict(cache_implementation="static") if compiled else {}

  def run(n):
    with torch.no_grad():
      model.generate(tokens, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                     pad_token_id=0, **cache)
    torch.cuda.synchronize()

  # A static cache's length is part of the compiled shapes: both lengths once first.
  start = time.perf_counter()
  run(1)
  run(new_tokens if compiled else 4)
  warmup_s = time.perf_counter() - start
  start = time.perf_counter()
  run(1)
  one = time.perf_counter() - start  # prefill + first token
  start = time.perf_counter()
  run(new_tokens)
  seconds = time.perf_counter() - start - one
  step = seconds / (new_tokens - 1)
  return dict(decode_tokens_per_s=batch / step, step_ms=1e3 * step, warmup_seconds=warmup_s,
              torch=torch.__version__, transformers=transformers.__version__)


def run_google_tunix(config_id: str, batch: int, prompt: int, new_tokens: int) -> dict:
  import jax

  import google_tunix

  step = google_tunix.decode_step_seconds(config_id, batch, prompt, new_tokens)
  return dict(decode_tokens_per_s=batch / step, step_ms=1e3 * step, jax=jax.__version__)


def run_format_in_child(quantization: str) -> dict:
  """This benchmark for tunix_zoo and one weight format, in a new process: a process that
  builds a second 8B model after freeing the first stopped in XLA's BFC allocator
  (``central_gap_ == kInvalidChunkHandle``, jax 0.11.2)."""
  import subprocess

  argv, skip = [], False
  for arg in sys.argv[1:]:
    if skip:
      skip = False
    elif arg in ("--quantization", "--libraries"):
      skip = True
    elif not arg.startswith(("--quantization=", "--libraries=")):
      argv.append(arg)
  child = subprocess.run(
      [sys.executable, __file__, *argv, "--libraries", "tunix_zoo", "--quantization",
       quantization], capture_output=True, text=True)
  text = child.stdout
  start = 0 if text.startswith("{") else text.rfind("\n{\n") + 1
  try:
    report = json.loads(text[start:])
  except ValueError:
    return dict(error=f"exit {child.returncode}: {child.stderr[-400:]}")
  return report["tunix_zoo" if quantization == "none" else f"tunix_zoo_{quantization}"]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--model", default="qwen3_0p6b")
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--prompt", type=int, default=128)
  parser.add_argument("--new-tokens", type=int, default=256)
  parser.add_argument("--libraries", default="tunix_zoo,transformers")
  parser.add_argument("--layers", type=int, help="override the depth (tunix_zoo only)")
  parser.add_argument("--scan-layers", action="store_true",
                      help="tunix_zoo's scanned layer stack (compile time flat in depth)")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="override a config field (tunix_zoo only), e.g. --set hidden_size=256")
  parser.add_argument("--dtype", default="bfloat16", help="tunix_zoo's parameter and compute dtype")
  parser.add_argument("--decode-kernel", default="auto", choices=("auto", "pallas", "xla"),
                      help="tunix_zoo's one-kernel decode attention (xla: XLA's kernels)")
  parser.add_argument("--quant-kernel", default="auto",
                      choices=("auto", "pallas", "interpret", "xla"),
                      help="tunix_zoo's quantized products in a decode step: the GEMV kernel "
                      "(pallas; interpret: Pallas's interpreter, a CPU smoke test) or XLA's")
  parser.add_argument("--gemv", default="auto", choices=("auto", "reduction", "xla"),
                      help="tunix_zoo's one-row products (KernelPolicy.gemv): a reduction "
                      "kernel or XLA's dot")
  parser.add_argument("--quantization", default="none",
                      help="comma-separated weight formats for tunix_zoo: none, int8, int4, "
                      "nf4, fp8 (each a separate run; reported as tunix_zoo_<format>)")
  args = parser.parse_args()
  report = dict(model=args.model, batch=args.batch, prompt=args.prompt,
                new_tokens=args.new_tokens, layers=args.layers, scan_layers=args.scan_layers,
                overrides=args.set)
  for library in args.libraries.split(","):
    if library == "tunix_zoo":
      formats = args.quantization.split(",")
      for quantization in formats:
        name = library if quantization == "none" else f"{library}_{quantization}"
        if len(formats) > 1:
          report[name] = run_format_in_child(quantization)
          continue
        try:
          report[name] = run_tunix_zoo(
              args.model, args.batch, args.prompt, args.new_tokens, args.decode_kernel,
              args.layers, None if quantization == "none" else quantization, args.scan_layers,
              tuple(args.set), args.dtype, args.quant_kernel, args.gemv)
        except Exception as e:  # e.g. a kernel that does not compile: the other formats run.
          report[name] = dict(error=f"{type(e).__name__}: {str(e)[:400]}")
      if "none" in formats and "error" not in report[library]:
        base = report[library]["decode_tokens_per_s"]
        for quantization in formats:
          if quantization != "none" and "error" not in report[f"{library}_{quantization}"]:
            report[f"{library}_{quantization}"]["speedup_vs_bf16"] = (
                report[f"{library}_{quantization}"]["decode_tokens_per_s"] / base)
    elif library == "google_tunix":
      report[library] = run_google_tunix(args.model, args.batch, args.prompt, args.new_tokens)
    else:
      report[library] = run_transformers(args.model, args.batch, args.prompt, args.new_tokens,
                                         compiled=library == "transformers_compile")
  print(json.dumps(report, indent=1))


if __name__ == "__main__":
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
  main()
