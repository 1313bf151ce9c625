"""The ``tunix-zoo`` command.

Example::

    tunix-zoo run tiny-demo                      # offline: a tiny model the project trains
    tunix-zoo run Qwen/Qwen3-0.6B --prompt "Hello" --max-new-tokens 32 --mesh 1x8
    tunix-zoo test qwen3_0p6b --steps 3          # forward + backward kick test
    tunix-zoo test qwen3_0p6b --lora-rank 8 --lora-module-path ".*q_proj|.*v_proj" --remat layer
    tunix-zoo export Qwen/Qwen3-0.6B /tmp/out --dtype bfloat16
    tunix-zoo export /ckpt/sft /tmp/out --push-to-hub acme/sft --private
    tunix-zoo export /kaggle/gemma-2-flax /tmp/gemma2-hf --model-id gemma2_2b_it  # orbax
    tunix-zoo download Qwen/Qwen3-0.6B
    tunix-zoo list
    tunix-zoo info qwen3_8b --mesh 1x8 --dtype bfloat16
    tunix-zoo info qwen3_8b --mesh 1x4 --lora-rank 32 --batch-size 8 --seq-len 2048 --remat layer
    tunix-zoo construct qwen3_0p6b --set num_layers=2 --set hidden_size=128 --save-checkpoint /tmp/t
    tunix-zoo cache list
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from typing import Any, Sequence

from tunix_zoo import registry
from tunix_zoo.config import DecoderConfig
from tunix_zoo.errors import ZooError
from tunix_zoo.naming import ModelNaming

EXIT_USER_ERROR = 2
# Commands that compile programs, and so start with the persistent compilation cache on.
COMPILING_COMMANDS = ("run", "test", "export", "construct")


def human_count(n: int) -> str:
  for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
    if n >= size:
      return f"{n / size:.2f}{unit}"
  return str(n)


def human_bytes(n: int) -> str:
  for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
    if n >= size:
      return f"{n / size:.2f} {unit}"
  return f"{n} B"


def positive_int(text: str) -> int:
  """argparse type: an integer >= 1 (argparse turns the ValueError into ``error:``)."""
  value = int(text)
  if value < 1:
    raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
  return value


def non_negative_float(text: str) -> float:
  value = float(text)
  if not value >= 0:  # also refuses nan
    raise argparse.ArgumentTypeError(f"{text} is not a number >= 0")
  return value


def probability(text: str) -> float:
  value = float(text)
  if not 0 < value <= 1:
    raise argparse.ArgumentTypeError(f"{text} is not in (0, 1]")
  return value


def float_dtype_name(text: str) -> str:
  """argparse type: the name of a floating dtype (``bfloat16``, ``float32`` ...)."""
  if text in ("bfloat16", "float16", "float32", "float64"):
    return text  # argparse converts every default too: the common names need no jax
  from tunix_zoo.arguments import float_dtype
  from tunix_zoo.errors import ArgumentError

  try:
    return float_dtype(text, "dtype").name
  except ArgumentError as e:
    raise argparse.ArgumentTypeError(str(e).removeprefix("dtype=")) from None


def resolve_config(model: str, overrides: Sequence[str] = ()) -> tuple[str, DecoderConfig]:
  """A preset id, an HF id naming one, a local checkpoint folder or ``tiny-demo``, with
  the ``--set key=value`` overrides applied."""
  from tunix_zoo.config_overrides import config_with_overrides, parse_overrides
  from tunix_zoo.demo import DEMO_ID, demo_checkpoint

  if model == DEMO_ID:
    model = str(demo_checkpoint())
  if os.path.isdir(model):
    from tunix_zoo.automodel import read_hf_config

    hf = read_hf_config(model)
    label, config = model, registry.family_for_hf_config(hf).config_class.from_hf_config(hf)
  else:
    label = registry.resolve_config_id(ModelNaming(model_id=model).model_config_id)
    config = registry.get_config(label)
  return label, config_with_overrides(config, parse_overrides(overrides))


def cmd_list(args: argparse.Namespace) -> int:
  from tunix_zoo.config import count_parameters

  rows = []
  for config_id in registry.config_ids():
    family = registry.family_of_config(config_id)
    rows.append((family.category, config_id, count_parameters(registry.get_config(config_id))))
  if args.json:
    print(json.dumps([dict(family=f, config_id=c, parameters=p) for f, c, p in rows], indent=1))
    return 0
  width = max(len(c) for _, c, _ in rows)
  print(f"{'family':<8} {'config id':<{width}} parameters")
  for family, config_id, params in rows:
    print(f"{family:<8} {config_id:<{width}} {human_count(params):>10}")
  return 0


def cmd_info(args: argparse.Namespace) -> int:
  label, config = resolve_config(args.model, args.set)
  return describe(label, config, args)


def describe(label: str, config: DecoderConfig, args: argparse.Namespace) -> int:
  """Prints (or, with ``--json``, dumps) the config, parameter count and bytes per device."""
  from tunix_zoo.planning import parse_mesh, plan_model, plan_training

  quantization = getattr(args, "quantization", None)
  if quantization is not None:
    from tunix_zoo.layers.quantized import Quantization

    quantization = Quantization(quantization, group_size=args.quantization_group_size)
  plan = plan_model(config, parse_mesh(args.mesh), args.dtype, quantization=quantization)
  training = None
  if args.batch_size or args.seq_len or args.lora_rank or args.remat != "none":
    training = plan_training(
        config, parse_mesh(args.mesh), args.dtype, batch_size=args.batch_size or 8,
        seq_len=args.seq_len or 2048, remat=args.remat, lora_rank=args.lora_rank,
        lora_module_path=args.lora_module_path, quantization=quantization,
    )
  info = {
      "model": label,
      "family": registry.family_for_config_class(type(config)).category,
      "parameters": plan.parameters,
      "active_parameters": plan.active_parameters,
      "dtype": plan.dtype,
      "quantization": plan.quantization,
      "bytes_total": plan.bytes_total,
      "mesh": args.mesh,
      "bytes_per_device": plan.bytes_per_device,
      "replicated_parameters": len(plan.replicated),
      "config": {k: v for k, v in vars(config).items()},
  }
  if training is not None:
    info["training"] = {
        **{k: v for k, v in vars(training).items() if k != "model"},
        "total_bytes": training.total_bytes,
    }
  if args.json:
    print(json.dumps(info, indent=1, default=str))
    return 0
  print(f"model        {label} ({info['family']}, {type(config).__name__})")
  print(f"parameters   {plan.parameters:,} ({human_count(plan.parameters)})")
  if plan.active_parameters != plan.parameters:
    print(f"active       {plan.active_parameters:,} ({human_count(plan.active_parameters)}) "
          "per token")
  quantized = (f" ({plan.quantization} Linear weights + {plan.dtype} scales)"
               if plan.quantization else "")
  print(f"weights      {human_bytes(plan.bytes_total)} in {plan.dtype}{quantized}")
  print(f"mesh         {args.mesh} (fsdp x tp): {human_bytes(plan.bytes_per_device)} per device")
  if plan.replicated:
    print(f"replicated   {len(plan.replicated)} small tensors (norms) on every device")
  if training is not None:
    t = training
    trained = f"LoRA rank {t.lora_rank} adapters" if t.lora_rank else "all weights"
    print(f"training     batch {t.batch_size} x {t.seq_len} tokens, remat {t.remat}, "
          f"AdamW on {trained} ({human_count(t.trained_parameters)}); per device (estimate):")
    for name, size in (("weights", t.weight_bytes), ("adapters", t.adapter_bytes),
                       ("optimizer", t.optimizer_bytes), ("activations", t.activation_bytes),
                       ("total", t.total_bytes)):
      print(f"  {name:<11} {human_bytes(size):>12}")
  print("config")
  for key, value in vars(config).items():
    print(f"  {key:<32} {value}")
  return 0


def make_mesh(text: str | None):
  """The ``(fsdp, tp)`` mesh of ``--mesh AxB``; by default 1 x all local devices."""
  import jax

  from tunix_zoo.planning import parse_mesh

  shape = parse_mesh(text) if text else (1, len(jax.local_devices()))
  if shape[0] * shape[1] > len(jax.devices()):
    from tunix_zoo.errors import ShardingError

    raise ShardingError(
        f"--mesh {text} needs {shape[0] * shape[1]} devices; {len(jax.devices())} are visible."
    )
  return jax.make_mesh(shape, ("fsdp", "tp"))


def source_kwargs(args: argparse.Namespace) -> dict[str, Any]:
  return dict(
      model_source=args.source, model_path=args.model_path,
      model_download_path=args.download_dir, revision=args.revision,
  )


def load(args: argparse.Namespace):
  """(model, folder) for the command's MODEL argument; ``tiny-demo`` is built locally."""
  from tunix_zoo.automodel import AutoModel
  from tunix_zoo.demo import DEMO_ID, demo_checkpoint

  mesh = make_mesh(args.mesh)
  dtype = args.dtype
  if args.model == DEMO_ID:
    return AutoModel.from_pretrained(str(demo_checkpoint()), mesh, param_dtype=dtype,
                                     scan_layers=args.scan_layers)
  kwargs = source_kwargs(args)
  if args.model_id and kwargs["model_path"] is None:
    # MODEL is the folder (or handle); the preset --model-id names gives the architecture.
    if kwargs["model_source"] == "huggingface":
      kwargs["model_source"] = "local"
    kwargs["model_path"] = args.model
  if args.stream:
    kwargs.update(stream=True, stream_concurrency=args.stream_concurrency)
  return AutoModel.from_pretrained(args.model_id or args.model, mesh, param_dtype=dtype,
                                   scan_layers=args.scan_layers, **kwargs)


def refuse_stream(args: argparse.Namespace, command: str) -> None:
  """Commands that need the tokenizer files cannot stream: only weights are streamed."""
  if args.stream:
    from tunix_zoo.errors import SourceError

    raise SourceError(f"{command} --stream: only the weights are streamed, and {command} "
                      "needs the tokenizer files too. Use `tunix-zoo test --load --stream`, "
                      "or drop --stream to download.")


def cmd_run(args: argparse.Namespace) -> int:
  from tunix_zoo.demo import DEMO_ID, DEMO_PROMPT
  from tunix_zoo.generation import generate
  from tunix_zoo.tokenizer import Tokenizer

  refuse_stream(args, "run")
  start = time.perf_counter()
  model, folder = load(args)
  load_seconds = time.perf_counter() - start
  tokenizer = Tokenizer.from_pretrained(folder)
  prompt = args.prompt if args.prompt is not None else (
      DEMO_PROMPT if args.model == DEMO_ID else "Hello")
  if args.chat:
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
  out = generate(
      model, [prompt], args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
      top_p=args.top_p, seed=args.seed, tokenizer=tokenizer,
      pad_id=tokenizer.pad_id() or 0,
  )
  print(prompt + out.text[0])
  print(
      f"\n[load {load_seconds:.2f} s | compile {out.compile_seconds:.2f} s | prefill "
      f"{out.prefill_tokens_per_second:,.0f} tok/s | decode "
      f"{out.decode_tokens_per_second:,.1f} tok/s | {int(out.lengths[0])} new tokens]",
      file=sys.stderr,
  )
  return 0


def cmd_test(args: argparse.Namespace) -> int:
  import jax
  import optax
  from flax import nnx

  from tunix_zoo.automodel import AutoModel
  from tunix_zoo.training import train

  if args.load:
    if args.set:
      from tunix_zoo.errors import ConfigError

      raise ConfigError("--set changes a config built from scratch; with --load the "
                        "checkpoint's config.json decides. Drop --load or --set.")
    model, _ = load(args)
  else:
    _, config = resolve_config(args.model, args.set)
    dtype = args.dtype or "float32"
    model = AutoModel.from_config(config, make_mesh(args.mesh), param_dtype=dtype, dtype=dtype,
                                  rngs=args.seed, scan_layers=args.scan_layers)
  model.remat = args.remat
  wrt = nnx.Param
  if args.lora_rank:
    from tunix_zoo.lora import apply_lora, lora_layers

    apply_lora(model, rank=args.lora_rank, alpha=args.lora_alpha or float(args.lora_rank),
               module_path=args.lora_module_path, rngs=args.seed)
    wrt = nnx.LoRAParam
    trained = sum(v.size for v in jax.tree.leaves(nnx.state(model, wrt)))
    print(f"LoRA rank {args.lora_rank} on {len(lora_layers(model))} layers: "
          f"{trained:,} trained parameters, the rest frozen")
  vocab = model.config.vocab_size
  # One fixed random batch: a model that learns must drive its loss down on it.
  batch = jax.random.randint(jax.random.key(args.seed), (args.batch_size, args.seq_len + 1),
                             0, vocab)
  losses = train(model, iter(lambda: batch, None), optax.sgd(args.learning_rate),
                 steps=args.steps, wrt=wrt)
  for step, loss in enumerate(losses):
    print(f"step {step}: loss {loss:.4f}")
  fell = losses[-1] < losses[0]
  print(f"loss {'fell' if fell else 'did NOT fall'}: {losses[0]:.4f} -> {losses[-1]:.4f}")
  return 0 if fell else 1


def cmd_export(args: argparse.Namespace) -> int:
  from tunix_zoo.checkpoint.export import save_pretrained

  refuse_stream(args, "export")
  model, folder = load(args)
  push = args.push_to_hub is not None
  with tempfile.TemporaryDirectory() as tokenizer_dir:
    source_dir = folder
    if not os.path.isfile(os.path.join(folder, "tokenizer.json")) and os.path.isfile(
        os.path.join(folder, "tokenizer.model")):
      # An orbax (Kaggle Flax) checkpoint ships only the SentencePiece model: export the
      # tokenizer files transformers reads beside it.
      from tunix_zoo.tokenizer import SENTENCEPIECE_FILE, Tokenizer

      Tokenizer.from_pretrained(folder).save_hf_files(tokenizer_dir)
      shutil.copyfile(os.path.join(folder, SENTENCEPIECE_FILE),
                      os.path.join(tokenizer_dir, SENTENCEPIECE_FILE))
      source_dir = tokenizer_dir
    out = save_pretrained(model, args.out_dir, dtype=args.out_dtype, source_dir=source_dir,
                          overwrite=args.overwrite, push_to_hub=push,
                          repo_id=args.push_to_hub, private=True if args.private else None)
  print(out)
  return 0


def cmd_construct(args: argparse.Namespace) -> int:
  label, config = resolve_config(args.model, args.set)
  describe(label, config, argparse.Namespace(
      **vars(args), batch_size=None, seq_len=None, lora_rank=None, remat="none"))
  if args.save_checkpoint is None:
    return 0
  from tunix_zoo.automodel import AutoModel
  from tunix_zoo.checkpoint.export import save_pretrained

  model = AutoModel.from_config(config, make_mesh(args.mesh), param_dtype=args.dtype,
                                dtype=args.dtype, rngs=args.seed)
  out = save_pretrained(model, args.save_checkpoint, overwrite=args.overwrite,
                        source_dir=label if os.path.isdir(label) else None)
  # With --json, stdout stays one JSON document.
  print(f"saved        {out}", file=sys.stderr if args.json else sys.stdout)
  return 0


def cmd_download(args: argparse.Namespace) -> int:
  from tunix_zoo.sources import fetch

  kwargs = source_kwargs(args)
  print(fetch(args.model, source=kwargs.pop("model_source"), verify=args.verify, **kwargs))
  return 0


def cmd_cache_list(args: argparse.Namespace) -> int:
  from tunix_zoo import cache

  entries = cache.list_cached()
  if args.json:
    print(json.dumps([dict(source=e.source, model=e.model, path=str(e.path), size=e.size,
                           last_used=e.last_used, refs=list(e.refs)) for e in entries],
                     indent=1))
    return 0
  if not entries:
    print("the cache is empty")
    return 0
  width = max(len(e.model) for e in entries)
  print(f"{'source':<12} {'model':<{width}} {'size':>10}  last used            refs")
  for e in entries:
    used = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.last_used))
    print(f"{e.source:<12} {e.model:<{width}} {human_bytes(e.size):>10}  {used}  "
          f"{','.join(e.refs)}")
  return 0


EXIT_CACHE_MISMATCH = 1
EXIT_CACHE_UNVERIFIED = 3


def cmd_cache_verify(args: argparse.Namespace) -> int:
  from tunix_zoo import cache

  reports = cache.verify(args.model)
  for r in reports:
    detail = f"{r.checked} files" if r.status == cache.VERIFIED else (
        "bad: " + ", ".join(r.bad_files) if r.bad_files else "nothing to compare against")
    print(f"{r.status:<22} {r.model.source:<12} {r.model.model}  ({detail})")
  if any(r.status == cache.MISMATCH for r in reports):
    return EXIT_CACHE_MISMATCH
  return EXIT_CACHE_UNVERIFIED if any(not r.ok for r in reports) else 0


def cmd_cache_remove(args: argparse.Namespace) -> int:
  from tunix_zoo import cache

  for entry in cache.remove(args.model):
    print(f"removed {entry.source} {entry.model} ({human_bytes(entry.size)})")
  return 0


def add_model_arguments(p: argparse.ArgumentParser, *, mesh: bool = True) -> None:
  p.add_argument("model", help="HF id, config id, Kaggle/GCS name (with --model-path), folder")
  p.add_argument("--source", default="huggingface",
                 choices=["huggingface", "kaggle", "gcs", "local"])
  p.add_argument("--model-path", help="Kaggle handle, gs:// path or local folder")
  p.add_argument("--download-dir", help="download into this folder instead of the cache")
  p.add_argument("--revision", help="HF branch, tag or commit")
  p.add_argument("--model-id", help="preset giving the architecture of a checkpoint without "
                 "config.json (an orbax / Kaggle Flax Gemma), e.g. gemma2_2b_it")
  if mesh:
    p.add_argument("--mesh", help="FSDPxTP, e.g. 1x8 (default 1 x all local devices)")
    p.add_argument("--dtype", default=None, type=float_dtype_name,
                   help="parameter dtype (default: the checkpoint's)")
    p.add_argument("--stream", action="store_true",
                   help="gcs/huggingface: read the weights in place with range requests, "
                        "each process only its share; nothing is downloaded")
    p.add_argument("--stream-concurrency", type=positive_int, metavar="N",
                   help="with --stream: ranges fetched at a time (default 16)")
    p.add_argument("--scan-layers", action="store_true",
                   help="hold the layers stacked and scanned: the same model, compiled in "
                        "a time flat in depth")


def add_training_arguments(p: argparse.ArgumentParser) -> None:
  from tunix_zoo.config import DEFAULT_LORA_MODULE_PATH, REMAT_MODES

  p.add_argument("--remat", choices=REMAT_MODES, default="none",
                 help="recompute each decoder layer / attention block in the backward pass")
  p.add_argument("--lora-rank", type=positive_int, help="train LoRA adapters of this rank only")
  p.add_argument("--lora-module-path", default=DEFAULT_LORA_MODULE_PATH,
                 help="regex over module paths (layers.3.attn.q_proj) that get adapters "
                 "(default: every attention and MLP projection)")


def add_set_argument(p: argparse.ArgumentParser) -> None:
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="override a config field, e.g. --set num_layers=4 --set rope.theta=1e6 "
                 "(repeatable; field names as `info` prints them)")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
  """The argument parser; given the ``command`` being run, it skips the training
  arguments of other commands, whose choices import the model code (and so jax)."""
  parser = argparse.ArgumentParser(
      prog="tunix-zoo", description="HF checkpoints as sharded Flax NNX models."
  )
  sub = parser.add_subparsers(dest="command", required=True)
  p = sub.add_parser("list", help="registered families and config ids with parameter counts")
  p.add_argument("--json", action="store_true")
  p.set_defaults(run=cmd_list)
  p = sub.add_parser("info", help="config, parameter count and bytes per device (no allocation)")
  p.add_argument("model", help="config id (qwen3_8b), HF id (Qwen/Qwen3-8B) or checkpoint folder")
  p.add_argument("--mesh", default="1x1", help="FSDPxTP, e.g. 2x4 (default 1x1)")
  p.add_argument("--dtype", default="bfloat16", type=float_dtype_name,
                 help="parameter dtype (default bfloat16)")
  p.add_argument("--json", action="store_true")
  p.add_argument("--batch-size", type=positive_int,
                 help="estimate a training step's memory for this batch (default 8)")
  p.add_argument("--seq-len", type=positive_int,
                 help="... of rows of this many tokens (default 2048)")
  p.add_argument("--quantization", choices=("int8", "int4", "nf4", "fp8"),
                 help="count the Linear weights quantized (values + scales; int4/nf4 in "
                 "groups of 128 inputs), as from_pretrained(quantization=...) loads them")
  p.add_argument("--quantization-group-size", type=positive_int,
                 help="inputs per scale (default: 128 for int4/nf4, a row for int8/fp8)")
  if command in (None, "info"):
    add_training_arguments(p)
  add_set_argument(p)
  p.set_defaults(run=cmd_info)

  p = sub.add_parser("construct", help="build a preset or config.json folder with fields "
                     "overridden; print its plan, optionally save it initialised")
  p.add_argument("model", help="config id (qwen3_0p6b), HF id naming one, or checkpoint folder")
  add_set_argument(p)
  p.add_argument("--dtype", default="float32", type=float_dtype_name,
                 help="parameter dtype (default float32)")
  p.add_argument("--mesh", default="1x1", help="FSDPxTP for bytes per device (default 1x1)")
  p.add_argument("--json", action="store_true")
  p.add_argument("--save-checkpoint", metavar="DIR",
                 help="write a randomly initialised HF checkpoint (config.json + safetensors, "
                 "and the tokenizer files of a MODEL folder) to DIR")
  p.add_argument("--overwrite", action="store_true", help="replace a non-empty DIR")
  p.add_argument("--seed", type=int, default=0)
  p.set_defaults(run=cmd_construct)

  p = sub.add_parser("run", help="load a model and generate text (tiny-demo works offline)")
  add_model_arguments(p)
  p.add_argument("--prompt")
  p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
  p.add_argument("--max-new-tokens", type=positive_int, default=48)
  p.add_argument("--temperature", type=non_negative_float, default=0.0)
  p.add_argument("--top-k", type=positive_int)
  p.add_argument("--top-p", type=probability)
  p.add_argument("--seed", type=int, default=0)
  p.set_defaults(run=cmd_run)

  p = sub.add_parser("test", help="kick test: a few forward+backward SGD steps, loss must fall")
  add_model_arguments(p)
  p.add_argument("--load", action="store_true", help="load the checkpoint (default: random)")
  p.add_argument("--batch-size", type=positive_int, default=2)
  p.add_argument("--seq-len", type=positive_int, default=128)
  p.add_argument("--steps", type=positive_int, default=3)
  p.add_argument("--learning-rate", type=non_negative_float, default=0.5)
  p.add_argument("--seed", type=int, default=0)
  if command in (None, "test"):
    add_training_arguments(p)
  add_set_argument(p)
  p.add_argument("--lora-alpha", type=float, help="LoRA alpha (default: the rank)")
  p.set_defaults(run=cmd_test)

  p = sub.add_parser("export", help="load MODEL and write it as an HF safetensors checkpoint")
  add_model_arguments(p)
  p.add_argument("out_dir")
  p.add_argument("--out-dtype", type=float_dtype_name,
                 help="dtype of the written weights, e.g. bfloat16")
  p.add_argument("--overwrite", action="store_true")
  p.add_argument("--push-to-hub", metavar="REPO",
                 help="then upload OUT_DIR to this Hub repo in one commit (token: HF_TOKEN)")
  p.add_argument("--private", action="store_true", help="create the pushed repo private")
  p.set_defaults(run=cmd_export)

  p = sub.add_parser("cache", help="list, verify or remove downloaded models")
  cache_sub = p.add_subparsers(dest="cache_command", required=True)
  q = cache_sub.add_parser("list", help="cached models per source: size, last used")
  q.add_argument("--json", action="store_true")
  q.set_defaults(run=cmd_cache_list)
  q = cache_sub.add_parser(
      "verify", help="re-hash cached files; exit 1 naming any file that changed, 3 when a "
      "model has no recorded checksums")
  q.add_argument("model", nargs="?", help="repo[@revision], Kaggle handle or gs:// URL "
                 "(default: everything cached)")
  q.set_defaults(run=cmd_cache_verify)
  q = cache_sub.add_parser("remove", help="delete one model's files (shared blobs stay)")
  q.add_argument("model", help="repo[@revision], Kaggle handle[/version] or gs:// URL")
  q.set_defaults(run=cmd_cache_remove)

  p = sub.add_parser("download", help="fetch a checkpoint into the cache and print its folder")
  add_model_arguments(p, mesh=False)
  p.add_argument("--verify", action="store_true",
                 help="re-hash files already in the cache against the server's checksums")
  p.set_defaults(run=cmd_download)
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  args = build_parser(argv[0] if argv and not argv[0].startswith("-") else None).parse_args(argv)
  if args.command in COMPILING_COMMANDS:
    from tunix_zoo import compilation_cache

    compilation_cache.enable()
  try:
    return args.run(args)
  except ZooError as e:
    print(f"tunix-zoo: error: {e}", file=sys.stderr)
    return EXIT_USER_ERROR


if __name__ == "__main__":
  sys.exit(main())
