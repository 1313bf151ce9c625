"""Training-step benchmark: forward + backward + AdamW on one batch, its step time and
MFU, against transformers (+ ``torch.compile``) and Tunix's ``PeftTrainer``.

Random weights of a preset's shapes, bf16 parameters and compute, AdamW (lr 1e-5, its
moments in the parameters' dtype), next-token cross-entropy over ``--batch`` rows of
``--length`` tokens, every layer recomputed in the backward pass (``--remat layer``).
Libraries (``--libraries``), each in its own process:

- ``tunix_zoo``: ``tunix_zoo.training.train_step`` under ``jax.jit`` over the split
  model and optimizer, their buffers donated (updated in place, as a training loop keeps
  one copy of the weights); ``--no-donate`` calls ``train_step`` as it is.
- ``transformers`` / ``transformers_compile``: ``AutoModelForCausalLM`` (sdpa), gradient
  checkpointing (non-reentrant), ``torch.optim.AdamW`` (fused), eager or
  ``torch.compile(model)``.
- ``google_tunix``: google-tunix 0.1.7's ``PeftTrainer`` driving its own Qwen3
  (``RematConfig.DECODER``: each decoder layer recomputed), its default loss; LoRA
  through qwix (``qwix.apply_lora_to_model``), as Tunix's recipe does.

``--lora-rank R`` adds rank-R adapters (alpha 2R) to every attention and MLP projection
(ours: ``apply_lora``; transformers: peft; Tunix: qwix) and trains only them.

MFU: model FLOPs of the step over its time, over 989 TFLOP/s. Full fine-tuning:
6·N·T (N the parameters in products: all but an untied input embedding; T = batch x
length) plus causal attention (QK^T and PV, 4·heads·head_dim·keys a token and layer) 3
times (forward, backward). LoRA: 4·N·T for the frozen weights (forward and input
gradients; they get no weight gradients), 6·N_lora·T for the adapters, the same
attention. Recomputation is not counted. Prints one JSON line.

    python benchmarks/train_step.py --model qwen3_8b --batch 8 --length 2048
    python benchmarks/train_step.py --model qwen3_8b --lora-rank 64 --libraries google_tunix
"""

from __future__ import annotations

import argparse
import functools
import pathlib
import sys
import time

from flops import PEAK_BF16_FLOPS, attention_flops, matmul_parameters
from isolated import compact, run_each

LIBRARIES = ("tunix_zoo", "transformers", "transformers_compile", "google_tunix")
# Every attention and MLP projection, in each library's module names.
TRANSFORMERS_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                             "down_proj"]
TUNIX_LORA_PATH = ".*q_proj|.*k_proj|.*v_proj|.*o_proj|.*gate_proj|.*up_proj|.*down_proj"


def step_flops(config, batch: int, length: int, lora_parameters: int = 0) -> float:
  """Model FLOPs of one training step (see the module docstring)."""
  params = matmul_parameters(config)
  dense = 4 * params + 6 * lora_parameters if lora_parameters else 6 * params
  return batch * (dense * length + 3 * attention_flops(config, length))


def model_config(config_id: str, layers: int | None, overrides: tuple[str, ...]):
  from tunix_zoo import registry
  from tunix_zoo.config_overrides import config_with_overrides, parse_overrides

  config = config_with_overrides(registry.get_config(config_id), parse_overrides(overrides))
  if layers is not None:
    config = config.replace(num_layers=layers, layer_types=config.layer_types[:layers])
  return config


def timed(step, steps: int, finish) -> tuple[float, float, list[float]]:
  """(first call's seconds, mean seconds of ``steps`` more after a second warm call, the
  first and the last loss); ``finish(loss)`` waits for a step's loss, as a float."""
  start = time.perf_counter()
  first_loss = finish(step())
  first_call = time.perf_counter() - start
  finish(step())  # A second program would show here as a slow step.
  start = time.perf_counter()
  for _ in range(steps):
    loss = step()
  last_loss = finish(loss)
  return first_call, (time.perf_counter() - start) / steps, [first_loss, last_loss]


def peak_device_bytes() -> int | None:
  import jax

  stats = jax.devices()[0].memory_stats()
  return stats.get("peak_bytes_in_use") if stats else None


def run_tunix_zoo(config, args) -> dict:
  import jax
  import optax
  from flax import nnx

  from tunix_zoo.automodel import AutoModel
  from tunix_zoo.lora import apply_lora
  from tunix_zoo.training import _place_on_mesh, train_step

  mesh = jax.make_mesh((1, len(jax.devices())), ("fsdp", "tp"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  model = AutoModel.from_config(config, mesh, dtype=args.dtype, param_dtype=args.dtype,
                                remat=args.remat, scan_layers=args.scan_layers)
  wrt = nnx.Param
  if args.lora_rank:
    apply_lora(model, rank=args.lora_rank, alpha=2.0 * args.lora_rank)
    wrt = nnx.LoRAParam
  lora_parameters = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.LoRAParam)))
  optimizer = nnx.Optimizer(model, optax.adamw(1e-5), wrt=wrt)
  _place_on_mesh(optimizer, mesh)
  tokens = jax.random.randint(jax.random.key(0), (args.batch, args.length + 1), 0,
                              config.vocab_size)
  if args.no_donate:
    step = functools.partial(nnx.cached_partial(train_step, model, optimizer), tokens)
  else:
    graphdef, state = nnx.split((model, optimizer))
    # The state comes back as it went in: else the second call compiles a second program.
    placement = (jax.tree.map(lambda x: x.sharding, state),
                 jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))

    @functools.partial(jax.jit, donate_argnums=0, out_shardings=placement)
    def donated_step(state, tokens):
      model, optimizer = nnx.merge(graphdef, state)
      loss = train_step(model, optimizer, tokens)
      return nnx.state((model, optimizer)), loss

    def step():
      nonlocal state
      state, loss = donated_step(state, tokens)
      return loss

  first_call, seconds, losses = timed(step, args.steps, float)
  flops = step_flops(config, args.batch, args.length, lora_parameters)
  return dict(first_call_s=first_call, step_s=seconds,
              tokens_per_s=args.batch * args.length / seconds,
              mfu=flops / seconds / PEAK_BF16_FLOPS, lora_parameters=lora_parameters,
              first_last_loss=losses, peak_bytes=peak_device_bytes(),
              device=jax.devices()[0].device_kind,
              jax=jax.__version__)


def run_transformers(config, args, compiled: bool) -> dict:
  import torch
  import transformers

  import transformers_peer

  device = "cuda" if torch.cuda.is_available() else "cpu"
  _, model = transformers_peer.random_model(None, config, device, getattr(torch, args.dtype))
  model.train()
  model.config.use_cache = False
  if args.remat == "layer":
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
  lora_parameters = 0
  if args.lora_rank:
    import peft

    model = peft.get_peft_model(model, peft.LoraConfig(
        r=args.lora_rank, lora_alpha=2 * args.lora_rank, lora_dropout=0.0,
        target_modules=TRANSFORMERS_LORA_TARGETS))
    lora_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
  trained = [p for p in model.parameters() if p.requires_grad]
  optimizer = torch.optim.AdamW(trained, lr=1e-5, fused=device == "cuda")
  forward = torch.compile(model) if compiled else model
  tokens = torch.randint(0, config.vocab_size, (args.batch, args.length), device=device)

  def step():
    loss = forward(input_ids=tokens, labels=tokens).loss  # Shifted inside.
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss

  first_call, seconds, losses = timed(step, args.steps, lambda loss: loss.item())
  flops = step_flops(config, args.batch, args.length, lora_parameters)
  peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
  return dict(first_call_s=first_call, step_s=seconds,
              tokens_per_s=args.batch * args.length / seconds,
              mfu=flops / seconds / PEAK_BF16_FLOPS, lora_parameters=lora_parameters,
              first_last_loss=losses, peak_bytes=peak, torch=torch.__version__,
              transformers=transformers.__version__)


def run_google_tunix(config, args) -> dict:
  import jax
  import jax.numpy as jnp
  import optax
  from flax import nnx

  import google_tunix
  from tunix_zoo.config_overrides import parse_overrides

  qwen3 = google_tunix.qwen3_module()
  peft_trainer = google_tunix.import_tunix("tunix.sft.peft_trainer")
  sft_utils = google_tunix.import_tunix("tunix.sft.utils")
  fields = google_tunix.tunix_fields(
      {k: int(v) for k, v in parse_overrides(args.set).items() if k in google_tunix.TUNIX_FIELDS})
  remat = qwen3.RematConfig.DECODER if args.remat == "layer" else qwen3.RematConfig.NONE
  model, _ = google_tunix.build(args.model, args.layers, args.dtype, remat_config=remat,
                                **fields)
  if args.lora_rank:
    import qwix

    provider = qwix.LoraProvider(module_path=TUNIX_LORA_PATH, rank=args.lora_rank,
                                 alpha=2.0 * args.lora_rank)
    model = qwix.apply_lora_to_model(model, provider, rngs=nnx.Rngs(0),
                                     **model.get_model_input())
  lora_parameters = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.LoRAParam)))
  trainer = peft_trainer.PeftTrainer(
      model, optax.adamw(1e-5), peft_trainer.TrainingConfig(eval_every_n_steps=10**9))
  trainer.is_managed_externally = True  # train() runs every batch given, and stays open.

  def model_inputs(batch):  # What its default loss takes, as Tunix's SFT examples build it.
    mask = batch["input_mask"].astype(bool)
    return {"input_tokens": batch["input_tokens"], "input_mask": batch["input_mask"],
            "positions": sft_utils.build_positions_from_mask(mask),
            "attention_mask": sft_utils.make_causal_attn_mask(mask)}

  trainer.with_gen_model_input_fn(model_inputs)
  tokens = jax.random.randint(jax.random.key(0), (args.batch, args.length), 0,
                              config.vocab_size)
  batch = {"input_tokens": tokens, "input_mask": jnp.ones_like(tokens)}
  trainer.train([batch])  # Compiles.
  start = time.perf_counter()
  trainer.train([batch])
  second = time.perf_counter() - start
  start = time.perf_counter()
  trainer.train([batch] * args.steps)  # Waits for its steps before it returns.
  seconds = (time.perf_counter() - start) / args.steps
  assert trainer.train_steps == args.steps + 2, trainer.train_steps
  flops = step_flops(config, args.batch, args.length, lora_parameters)
  return dict(second_call_s=second, step_s=seconds,
              tokens_per_s=args.batch * args.length / seconds,
              mfu=flops / seconds / PEAK_BF16_FLOPS, lora_parameters=lora_parameters,
              peak_bytes=peak_device_bytes(), jax=jax.__version__)


def run_library(library: str, args) -> dict:
  config = model_config(args.model, args.layers, tuple(args.set))
  if library == "tunix_zoo":
    return run_tunix_zoo(config, args)
  if library == "google_tunix":
    return run_google_tunix(config, args)
  return run_transformers(config, args, compiled=library == "transformers_compile")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model", default="qwen3_0p6b")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--length", type=int, default=1024)
  parser.add_argument("--libraries", default="tunix_zoo")
  parser.add_argument("--library", choices=LIBRARIES, help=argparse.SUPPRESS)
  parser.add_argument("--lora-rank", type=int, default=0,
                      help="train rank-R LoRA adapters on every projection instead")
  parser.add_argument("--layers", type=int, help="override the depth")
  parser.add_argument("--scan-layers", action="store_true",
                      help="tunix_zoo's scanned layer stack")
  parser.add_argument("--remat", default="layer", choices=("none", "layer", "attention"),
                      help="recomputation (transformers and Tunix: layer or none)")
  parser.add_argument("--no-donate", action="store_true",
                      help="tunix_zoo: call training.train_step as it is, nothing donated")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="override a config field, e.g. --set hidden_size=256 (Tunix's "
                      "Qwen3 takes the widths, heads and vocabulary)")
  parser.add_argument("--dtype", default="bfloat16", help="parameter and compute dtype")
  parser.add_argument("--steps", type=int, default=5, help="timed steps")
  args = parser.parse_args()
  if args.library:  # A child: one library, its result alone.
    print(compact(run_library(args.library, args)))
    return
  report = dict(model=args.model, batch=args.batch, length=args.length, layers=args.layers,
                scan_layers=args.scan_layers, remat=args.remat, lora_rank=args.lora_rank,
                overrides=args.set)
  report.update(run_each(__file__, args.libraries, args.model, sys.argv[1:]))
  ours = report.get("tunix_zoo", {}).get("step_s")
  for peer in LIBRARIES[1:]:
    theirs = report.get(peer, {}).get("step_s")
    if ours and theirs:
      report[f"speedup_vs_{peer}"] = theirs / ours
  print(compact(report))


if __name__ == "__main__":
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
  main()
