"""Rollout benchmark: sampling at RL batch sizes with per-row EOS, against Tunix's Sampler.

One batch of ``--batch`` random prompts of ``--prompt`` tokens, up to ``--new-tokens``
new tokens each, sampled at temperature 1 (what a GRPO rollout does; no top-k / top-p,
so every library draws one categorical sample from the whole vocabulary). Every
``--eos-every``-th token id ends a row, so each row stops at its own step (were the
samples uniform, after a geometric number of steps of mean ``eos_every``: the rows'
lengths are reported), deterministic for a seed; the batch runs until its longest row
ends. Random weights of a preset's shapes, bf16.

Libraries, each in its own process (``--libraries``):

- ``tunix_zoo``: ``tunix_zoo.generate`` (prefill, then one on-device decode loop).
- ``tunix_sampler``: google-tunix 0.1.7's ``tunix.generate.sampler.Sampler`` driving our
  model (a tunix_zoo model is a Tunix drop-in).
- ``google_tunix``: the same Sampler driving Tunix's own Qwen3 (Qwen3 presets only).

Each library's first call compiles; the second, timed end to end (prefill, decode and
the host's work), is reported. ``tokens_per_s`` counts the tokens each row generated
(its EOS included); ``row_steps_per_s`` every row of every step the loop ran (finished
rows are still computed). The floor of a call is the prefill's FLOPs at the peak
(989 TFLOP/s, the LM head on the last token only) plus, per decoding step, the larger of
its bytes over the measured copy bandwidth — every weight (but an untied input
embedding: its tokens' rows) and the KV cache up to that step's position (a sliding
window's layers only their window) for every row — and its FLOPs at the peak;
``roofline_fraction`` is that floor over the measured time; for ours, whose decoding
steps are timed apart, ``decode_roofline_fraction`` is theirs alone and
``decode_hbm_fraction`` the same counting bytes only. Prints one JSON line.

    python benchmarks/rollout.py --model qwen3_8b --batch 256
    python benchmarks/rollout.py --model gemma3_1b --batch 128 --libraries tunix_zoo,tunix_sampler
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

from flops import PEAK_BF16_FLOPS, attention_flops, keys_attended, matmul_parameters
from isolated import compact, run_each

LIBRARIES = ("tunix_zoo", "tunix_sampler", "google_tunix")
PAD_ID = 0


def model_config(config_id: str, layers: int | None, overrides: tuple[str, ...]):
  from tunix_zoo import registry
  from tunix_zoo.config_overrides import config_with_overrides, parse_overrides

  config = config_with_overrides(registry.get_config(config_id), parse_overrides(overrides))
  if layers is not None:
    config = config.replace(num_layers=layers, layer_types=config.layer_types[:layers])
  return config


def eos_ids(vocab_size: int, every: int) -> list[int]:
  """Every ``every``-th token id: a row stops with probability ~1/every a step."""
  return list(range(every - 1, vocab_size, every))


def floor_seconds(config, batch: int, prompt: int, steps: int, bandwidth: float,
                  dtype: str = "bfloat16") -> dict:
  """The call's floor: the prefill's FLOPs at the peak plus, for each of the ``steps - 1``
  decoding steps (the prefill samples the first token), max(bytes / bandwidth, FLOPs /
  peak); and the bytes-only sum of the decoding steps."""
  import jax.numpy as jnp

  from decode import step_weight_bytes

  itemsize = jnp.dtype(dtype).itemsize
  weights = step_weight_bytes(config, dtype)
  params = matmul_parameters(config)
  head = config.vocab_size * config.hidden_size
  attention_width = config.num_heads * config.head_dim
  kv_width = 2 * config.num_kv_heads * config.head_dim * itemsize  # k and v, one key
  # Prefill: every layer on every prompt token, the LM head on the last; causal attention.
  prefill_flops = batch * (2 * (params - head) * prompt + 2 * head
                           + attention_flops(config, prompt))
  decode, hbm = 0.0, 0.0
  for step in range(1, steps):
    keys = keys_attended(config, prompt + step - 1)  # the step's token is at that position
    step_bytes = weights + batch * kv_width * sum(keys)
    step_flops = batch * (2 * params + 4 * attention_width * sum(keys))
    hbm += step_bytes / bandwidth
    decode += max(step_bytes / bandwidth, step_flops / PEAK_BF16_FLOPS)
  return dict(prefill=prefill_flops / PEAK_BF16_FLOPS, decode=decode, decode_hbm=hbm)


def summary(lengths, seconds: float, batch: int, new_tokens: int) -> dict:
  """Throughput of a call whose rows generated ``lengths`` tokens (EOS included)."""
  import numpy as np

  lengths = np.asarray(lengths)
  steps = int(lengths.max())  # The loop ends when its longest row does.
  return dict(wall_s=seconds, tokens_per_s=float(lengths.sum()) / seconds,
              row_steps_per_s=batch * steps / seconds, tokens=int(lengths.sum()), steps=steps,
              rows_stopped=int((lengths < new_tokens).sum()),
              length_min_median_max=[int(lengths.min()), int(np.median(lengths)), steps])


def with_floor(result: dict, config, batch: int, prompt: int, dtype: str) -> dict:
  from decode import copy_bandwidth_bytes_per_s

  floor = floor_seconds(config, batch, prompt, result["steps"], copy_bandwidth_bytes_per_s(),
                        dtype)
  result["floor_s"] = floor["prefill"] + floor["decode"]
  result["roofline_fraction"] = result["floor_s"] / result["wall_s"]
  if "decode_s" in result:  # What the decoding steps alone reach.
    result["decode_roofline_fraction"] = floor["decode"] / result["decode_s"]
    result["decode_hbm_fraction"] = floor["decode_hbm"] / result["decode_s"]
  return result


def prompts(config, batch: int, prompt: int):
  import numpy as np

  # Ids from 3 on: none is the pad id, which Tunix's Sampler takes for padding.
  return np.random.default_rng(0).integers(3, config.vocab_size, (batch, prompt))


def build_ours(config, dtype: str):
  import jax

  from tunix_zoo.automodel import AutoModel

  mesh = jax.make_mesh((1, len(jax.devices())), ("fsdp", "tp"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  return AutoModel.from_config(config, mesh, dtype=dtype, param_dtype=dtype)


def run_tunix_zoo(config, batch: int, prompt: int, new_tokens: int, every: int,
                  dtype: str) -> dict:
  from tunix_zoo.generation import generate

  model = build_ours(config, dtype)
  tokens = prompts(config, batch, prompt)
  eos = eos_ids(config.vocab_size, every)

  def call():
    start = time.perf_counter()
    out = generate(model, tokens, new_tokens, temperature=1.0, seed=0, eos_ids=eos,
                   pad_id=PAD_ID)
    return out, time.perf_counter() - start

  first, first_seconds = call()
  out, seconds = call()
  result = summary(out.lengths, seconds, batch, new_tokens)
  result.update(first_call_s=first_seconds, compile_s=first.compile_seconds,
                prefill_s=out.prefill_seconds, decode_s=out.decode_seconds)
  return with_floor(result, config, batch, prompt, dtype)


class IdTokenizer:
  """Token ids written as text ("12 7 99"), for Tunix's Sampler, which takes strings."""

  def __init__(self, eos_id: int):
    self._eos_id = eos_id

  def encode(self, text: str) -> list[int]:
    return [int(t) for t in text.split()]

  def decode(self, ids) -> str:
    return " ".join(map(str, ids))

  def bos_id(self) -> None:
    return None

  def eos_id(self) -> int:
    return self._eos_id

  def pad_id(self) -> int:
    return PAD_ID


def run_sampler(model, config, batch: int, prompt: int, new_tokens: int, every: int,
                dtype: str) -> dict:
  """google-tunix's Sampler on ``model`` (ours or its own Qwen3)."""
  import google_tunix

  sampler_lib = google_tunix.import_tunix("tunix.generate.sampler")
  eos = eos_ids(config.vocab_size, every)
  cache = sampler_lib.CacheConfig(cache_size=prompt + new_tokens, num_layers=config.num_layers,
                                  num_kv_heads=config.num_kv_heads, head_dim=config.head_dim)
  # One Sampler for both calls: it bakes the EOS ids of its first call into its programs.
  sampler = sampler_lib.Sampler(model, IdTokenizer(eos[0]), cache)
  text = [" ".join(map(str, row)) for row in prompts(config, batch, prompt)]

  def call():
    start = time.perf_counter()
    out = sampler(text, max_generation_steps=new_tokens, max_prompt_length=prompt,
                  eos_tokens=eos, temperature=1.0, top_p=1.0, seed=0)
    return out, time.perf_counter() - start

  _, first_seconds = call()
  out, seconds = call()
  # ``out.tokens`` stop before each row's EOS; count it, as ours do.
  lengths = [min(len(t) + 1, new_tokens) for t in out.tokens]
  result = summary(lengths, seconds, batch, new_tokens)
  result["first_call_s"] = first_seconds
  return with_floor(result, config, batch, prompt, dtype)


def run_library(library: str, args) -> dict:
  import jax

  from tunix_zoo.config_overrides import parse_overrides

  config = model_config(args.model, args.layers, tuple(args.set))
  work = (config, args.batch, args.prompt, args.new_tokens, args.eos_every, args.dtype)
  if library == "tunix_zoo":
    result = run_tunix_zoo(*work)
  elif library == "tunix_sampler":
    result = run_sampler(build_ours(config, args.dtype), *work)
  else:
    import google_tunix

    fields = google_tunix.tunix_fields(
        {k: int(v) for k, v in parse_overrides(args.set).items()
         if k in google_tunix.TUNIX_FIELDS})
    model, _ = google_tunix.build(args.model, args.layers, args.dtype, **fields)
    result = run_sampler(model, *work)
  result["jax"] = jax.__version__
  return result


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model", default="qwen3_8b")
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--prompt", type=int, default=512)
  parser.add_argument("--new-tokens", type=int, default=512)
  parser.add_argument("--eos-every", type=int, default=256,
                      help="every N-th token id is an EOS: rows stop after ~N tokens")
  parser.add_argument("--libraries", default=",".join(LIBRARIES))
  parser.add_argument("--library", choices=LIBRARIES, help=argparse.SUPPRESS)
  parser.add_argument("--layers", type=int, help="override the depth")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="override a config field, e.g. --set hidden_size=256 (Tunix's "
                      "Qwen3 takes the widths, heads and vocabulary)")
  parser.add_argument("--dtype", default="bfloat16", help="parameter and compute dtype")
  args = parser.parse_args()
  if args.library:  # A child: one library, its result alone.
    print(json.dumps(run_library(args.library, args)))
    return
  report = dict(model=args.model, batch=args.batch, prompt=args.prompt,
                new_tokens=args.new_tokens, eos_every=args.eos_every, layers=args.layers,
                overrides=args.set)
  report.update(run_each(__file__, args.libraries, args.model, sys.argv[1:]))
  ours = report.get("tunix_zoo", {})
  for peer in ("tunix_sampler", "google_tunix"):
    theirs = report.get(peer, {})
    if "tokens_per_s" in ours and "tokens_per_s" in theirs:
      # Generated tokens, and (the same work when both loops ran all steps) row-steps.
      report[f"speedup_vs_{peer}"] = ours["tokens_per_s"] / theirs["tokens_per_s"]
      report[f"row_step_speedup_vs_{peer}"] = (ours["row_steps_per_s"]
                                                / theirs["row_steps_per_s"])
  print(compact(report))


if __name__ == "__main__":
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
  main()
