"""Scanned layers (``scan_layers=True``) against the unrolled model of the same checkpoint:
logits within 1e-5, the same greedy tokens, the same router logits, byte-identical
exports and PEFT adapters, and parameters sharded like the unrolled ones.

Per family, the scanned model's greedy tokens are checked against transformers' generate,
which the unrolled model's equal on these checkpoints (tests/models/test_parity.py,
test_qwen3_moe.py): two decode programs fewer per family than decoding the unrolled one."""

from __future__ import annotations

import filecmp
import pathlib
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests import moe_reference, reference
from tunix_zoo import AutoModel
from tunix_zoo.checkpoint.export import save_pretrained
from tunix_zoo.errors import LoraError
from tunix_zoo.layers.stacked import LAYER_NUMBER, STACKED_LAYERS
from tunix_zoo.lora import apply_lora, lora_layers, merge_lora, save_lora_adapter

# Scanned against unrolled, float32: the same operations in another order of compilation.
MAX_ABS = 1e-5
NEW_TOKENS = 4
MOE = "e16_k3_step2_norm"  # dense/sparse pairs: experts stacked inside stacked layers
EVERY_CASE = ["llama3", "qwen2p5", "qwen3", "gemma", "gemma2", "gemma3", MOE, "e6_k2_mlp_only"]


@pytest.fixture(scope="module")
def checkpoints(reference_checkpoints, moe_checkpoints):
  """case -> (checkpoint folder, transformers model), made on first use."""
  return lambda case: (moe_checkpoints if case in moe_reference.CASES
                       else reference_checkpoints)[case]


@pytest.fixture(scope="module")
def folders(checkpoints):
  """case -> checkpoint folder, made on first use."""
  return lambda case: checkpoints(case)[0]


@pytest.fixture(scope="module")
def pairs(folders, reference_models):
  """case -> (unrolled, scanned) models of the case's checkpoint on one device; the
  unrolled one of a dense case is the session's (read-only)."""
  made = {}

  def pair(case):
    if case not in made:
      mesh = reference.one_device_mesh()
      unrolled = (AutoModel.from_pretrained(str(folders(case)), mesh)[0]
                  if case in moe_reference.CASES else reference_models(case))
      scanned = AutoModel.from_pretrained(str(folders(case)), mesh, scan_layers=True)[0]
      made[case] = unrolled, scanned
    return made[case]

  return pair


_forward = nnx.jit(lambda m, t, k: m(t, attention_mask=k)[0])
_forward_moe = nnx.jit(lambda m, t, k: m.forward_with_router_logits(t, attention_mask=k))


def check_parity(unrolled, scanned, case, greedy=True, torch_model=None):
  """Logits (and router logits) within MAX_ABS of the unrolled model's; with ``greedy``,
  the scanned model's greedy tokens equal ``torch_model``'s generate, or, without one, the
  unrolled model's greedy tokens."""
  tokens, mask, _ = reference.left_padded_batch()
  real = mask.astype(bool)
  if case in moe_reference.CASES:
    (ours, _, router), (theirs, _, router_scanned) = (
        _forward_moe(m, jnp.asarray(tokens), jnp.asarray(mask)) for m in (unrolled, scanned)
    )
    assert len(router) == len(router_scanned) > 0
    for a, b in zip(router, router_scanned):
      np.testing.assert_allclose(np.asarray(b)[real], np.asarray(a)[real], atol=MAX_ABS, rtol=0)
  else:
    ours, theirs = (_forward(m, jnp.asarray(tokens), jnp.asarray(mask))
                    for m in (unrolled, scanned))
  np.testing.assert_allclose(np.asarray(theirs)[real], np.asarray(ours)[real], atol=MAX_ABS,
                             rtol=0)
  if not greedy:
    return
  expected = (reference.greedy(unrolled, tokens, mask, NEW_TOKENS) if torch_model is None
              else reference.reference_greedy(torch_model, tokens, mask, NEW_TOKENS))
  np.testing.assert_array_equal(reference.greedy(scanned, tokens, mask, NEW_TOKENS), expected)


def test_scanned_logits_match_unrolled(pairs):
  unrolled, scanned = pairs("gemma3")  # a block of 3 (sliding, sliding, full) scanned twice
  assert scanned.scan_layers and not unrolled.scan_layers
  check_parity(unrolled, scanned, "gemma3", greedy=False)


@pytest.mark.slow
@pytest.mark.parametrize("case", EVERY_CASE)
def test_every_family_scanned_matches_unrolled_in_logits_router_logits_and_greedy(
    checkpoints, pairs, case):
  unrolled, scanned = pairs(case)
  check_parity(unrolled, scanned, case, torch_model=checkpoints(case)[1])


def test_layers_stack_as_a_repeating_block_with_the_rest_unrolled(pairs):
  _, gemma3 = pairs("gemma3")  # sliding, sliding, full; twice
  assert (gemma3.layers.period, gemma3.layers.repeats, len(gemma3.layers.rest)) == (3, 2, 0)
  q = gemma3.layers.blocks[2].attn.q_proj.weight
  assert q.shape[0] == 2 and q.get_metadata()[STACKED_LAYERS] == (2, 5)
  _, moe = pairs(MOE)  # dense, sparse; twice, experts [layers, experts, out, in]
  assert moe.layers.blocks[1].mlp.experts.up_proj.shape[:2] == (2, 16)
  _, mlp_only = pairs("e6_k2_mlp_only")  # sparse, dense, sparse: a pair, then one left
  assert (mlp_only.layers.period, mlp_only.layers.repeats, len(mlp_only.layers.rest)) == (2, 1, 1)
  assert mlp_only.layers.rest[0].pre_attn_norm.weight.get_metadata()[LAYER_NUMBER] == 2


def test_cache_is_one_batch_leading_stack(pairs):
  unrolled, scanned = pairs("gemma3")
  cache = scanned.init_cache(3, 16)
  per_layer = unrolled.init_cache(3, 16)["layers"][0]["k"].shape
  assert cache["layers"]["k"].shape == (3, 6) + per_layer[1:]
  assert {leaf.shape[0] for leaf in jax.tree.leaves(cache)} == {3}


@pytest.mark.parametrize("case", ["gemma3", "e6_k2_mlp_only"])
def test_scanned_export_writes_the_unrolled_files(pairs, tmp_path, case):
  unrolled, scanned = pairs(case)
  save_pretrained(unrolled, tmp_path / "unrolled")
  save_pretrained(scanned, tmp_path / "scanned")
  files = sorted(p.name for p in (tmp_path / "unrolled").iterdir())
  _, mismatch, errors = filecmp.cmpfiles(tmp_path / "unrolled", tmp_path / "scanned", files,
                                         shallow=False)
  assert "model.safetensors" in files and not mismatch and not errors


def _unrolled_name(path: str, layer) -> list[str]:
  metadata = layer.lora_a.get_metadata()
  numbers = metadata.get(STACKED_LAYERS) or [metadata.get(LAYER_NUMBER)]
  return [re.sub(r"layers\.(blocks|rest)\.\d+\.", f"layers.{n}.", path) for n in numbers]


@pytest.mark.slow
def test_lora_selects_stacked_adapters_and_exports_the_same_peft_files(folders, tmp_path):
  mesh = reference.one_device_mesh()
  folder = str(folders("e6_k2_mlp_only"))
  unrolled, scanned = (AutoModel.from_pretrained(folder, mesh, scan_layers=scan)[0]
                       for scan in (False, True))
  regex = r"layers\.\d+\.attn\.(q|v)_proj|.*down_proj"
  for model in (unrolled, scanned):
    apply_lora(model, rank=2, alpha=4.0, module_path=regex)
  plain = lora_layers(unrolled)
  rng = np.random.RandomState(0)
  for layer in plain.values():
    layer.lora_b.set_value(jnp.asarray(rng.normal(size=layer.lora_b.shape), jnp.float32) * 0.1)
  stacked = lora_layers(scanned)
  names = {name for path, layer in stacked.items() for name in _unrolled_name(path, layer)}
  assert names == set(plain)
  for path, layer in stacked.items():
    sources = [plain[name] for name in _unrolled_name(path, layer)]
    for part in ("lora_a", "lora_b"):
      values = [getattr(s, part).get_value() for s in sources]
      getattr(layer, part).set_value(values[0] if len(values) == 1 and layer.lora_a.ndim == 2
                                     else jnp.stack(values))
  check_parity(unrolled, scanned, "e6_k2_mlp_only")
  for model, name in ((unrolled, "unrolled"), (scanned, "scanned")):
    save_lora_adapter(model, tmp_path / f"{name}_adapter", base_model_name_or_path="base")
    merge_lora(model)
    save_pretrained(model, tmp_path / f"{name}_merged")
  for kind in ("adapter", "merged"):
    left, right = tmp_path / f"unrolled_{kind}", tmp_path / f"scanned_{kind}"
    files = sorted(p.name for p in left.iterdir())
    _, mismatch, errors = filecmp.cmpfiles(left, right, files, shallow=False)
    assert len(files) >= 2 and not mismatch and not errors, (kind, mismatch)


def test_a_regex_selecting_part_of_a_stack_is_a_lora_error(pairs):
  _, scanned = pairs("gemma3")
  with pytest.raises(LoraError, match="layers.0.attn.q_proj.*scanned with it"):
    apply_lora(scanned, rank=2, alpha=4.0, module_path=r"layers\.0\.attn\.q_proj")


@pytest.mark.slow
@pytest.mark.parametrize("axis_type", [jax.sharding.AxisType.Auto,
                                       jax.sharding.AxisType.Explicit])
def test_stacked_parameters_shard_as_the_per_layer_ones(folders, pairs, axis_type):
  mesh = reference.mesh_2x4(axis_type)
  folder = str(folders(MOE))
  unrolled, scanned = (AutoModel.from_pretrained(folder, mesh, scan_layers=scan)[0]
                       for scan in (False, True))
  for p, block in enumerate(scanned.layers.blocks):
    for path, var in nnx.to_flat_state(nnx.state(block, nnx.Param)):
      spec = var.get_value().sharding.spec
      layer = unrolled.layers[p]
      for part in path:
        layer = layer[part] if isinstance(part, int) else getattr(layer, part)
      expected = tuple(layer.get_value().sharding.spec)
      assert tuple(spec)[0] is None and tuple(spec)[1:len(expected) + 1] == expected, path
  # Against the unrolled model on one device (compiled once for the parity test): a
  # second 2x4 program of the unrolled model would only recheck the mesh it is on.
  tokens, mask, _ = reference.left_padded_batch()
  ours, theirs = (_forward_moe(m, jnp.asarray(tokens), jnp.asarray(mask))[0]
                  for m in (pairs(MOE)[0], scanned))
  real = mask.astype(bool)
  np.testing.assert_allclose(np.asarray(theirs)[real], np.asarray(ours)[real], atol=MAX_ABS,
                             rtol=0)


@pytest.mark.slow
def test_tunix_sampler_greedy_and_beam_search_on_scanned_layers(demo_folder):
  from tunix.generate import sampler as sampler_lib

  from tunix_zoo import Tokenizer, generate
  from tunix_zoo.demo import DEMO_PROMPT

  folder = demo_folder
  tokenizer = Tokenizer.from_pretrained(folder)
  mesh = jax.make_mesh((1, 1), ("fsdp", "tp"), axis_types=(jax.sharding.AxisType.Auto,) * 2,
                       devices=jax.devices()[:1])
  prompts = [DEMO_PROMPT, "Flax NNX is"]
  model, _ = AutoModel.from_pretrained(str(folder), mesh, scan_layers=True)
  ours = generate(model, prompts, 8, tokenizer=tokenizer, eos_ids=[])
  c = model.config
  sampler = sampler_lib.Sampler(model, tokenizer, sampler_lib.CacheConfig(
      cache_size=64, num_layers=c.num_layers, num_kv_heads=c.num_kv_heads, head_dim=c.head_dim))
  greedy = sampler(prompts, max_generation_steps=8, max_prompt_length=8, eos_tokens=[-1])
  assert greedy.text == ours.text
  # Beam search repeats and gathers every cache leaf along its leading (batch) axis.
  beam = sampler(prompts, max_generation_steps=6, max_prompt_length=8, beam_size=2)
  # The demo model memorised its text: the best beam continues it as greedy does.
  assert beam.text[0].startswith(ours.text[0][:10])


@pytest.mark.slow
def test_cli_runs_and_trains_scanned_layers(demo_folder, tmp_path):
  import os
  import shutil
  import subprocess

  from tunix_zoo.demo import DEMO_ID, DEMO_TEXT

  executable = shutil.which("tunix-zoo")
  assert executable, "the console script is installed by `pip install -e .`"
  # The CLI builds tiny-demo into an empty cache: 300 training steps this test is not about.
  shutil.copytree(demo_folder, tmp_path / "cache" / DEMO_ID)
  env = {**os.environ, "TUNIX_ZOO_CACHE": str(tmp_path / "cache"), "TUNIX_ZOO_QUIET": "1"}

  def cli(*args):
    result = subprocess.run([executable, *args], env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr
    return result.stdout

  text = cli("run", "tiny-demo", "--max-new-tokens", "16", "--scan-layers")
  assert DEMO_TEXT.replace("\\\n", "").startswith(text.strip()[:60])
  trained = cli("test", "tiny-demo", "--scan-layers", "--steps", "2", "--seq-len", "16",
                "--lora-rank", "4", "--remat", "layer")
  assert "loss fell" in trained and "LoRA rank 4" in trained


def test_generate_compiles_scanned_models_for_gpus_with_dynamic_slice_fusion(pairs):
  """On GPUs XLA copies each layer's weights out of the stack every decode step unless
  its cuBLAS calls read them in place (benchmarks/README.md: 2.3x at Qwen3-8B batch 1)."""
  import types

  from tunix_zoo.generation import SCANNED_GPU_COMPILER_OPTIONS, compiler_options

  unrolled, scanned = pairs("qwen3")
  gpus = [types.SimpleNamespace(platform="gpu")] * 2
  assert compiler_options(scanned, gpus) == SCANNED_GPU_COMPILER_OPTIONS
  assert compiler_options(unrolled, gpus) is None
  assert compiler_options(scanned, jax.devices()) is None  # CPUs: XLA's defaults
  assert compiler_options(scanned, [jax.devices()[0], gpus[0]]) is None
  # XLA checks option names: a CPU compile accepts these and refuses a misspelt one.
  program = jax.jit(lambda x: x + 1).lower(jnp.ones(2))
  program.compile(compiler_options=SCANNED_GPU_COMPILER_OPTIONS)
  with pytest.raises(Exception, match="No such compile option"):
    program.compile(compiler_options={"xla_gpu_enable_dynamic_slice_fusions": True})


def test_the_documented_xla_flags_are_generates_scanned_options():
  """Code that jits a scanned model itself (Tunix's samplers and trainers) is told which
  XLA_FLAGS give it what ``generate`` compiles with: the docs' flags are exactly those."""
  from tunix_zoo.generation import SCANNED_GPU_COMPILER_OPTIONS

  expected = {f"--{name}={str(value).lower()}" for name, value in
              SCANNED_GPU_COMPILER_OPTIONS.items()}
  root = pathlib.Path(__file__).resolve().parents[1]
  for doc in ("README.md", "benchmarks/README.md"):
    documented = re.findall(r'XLA_FLAGS="([^"]*--xla_gpu_enable_dynamic_slice_fusion[^"]*)"',
                            (root / doc).read_text())
    assert documented, doc
    for flags in documented:
      assert set(flags.split()) == expected, (doc, flags)


def _equations(jaxpr, inside_scan: bool = False) -> list[tuple[Any, bool]]:
  """Every equation of ``jaxpr`` and its inner jaxprs (scan bodies, shard_maps), with
  whether it runs inside a scan."""
  found = []
  for eqn in jaxpr.eqns:
    found.append((eqn, inside_scan))
    for param in eqn.params.values():
      for inner in param if isinstance(param, (tuple, list)) else (param,):
        inner = getattr(inner, "jaxpr", inner)
        if hasattr(inner, "eqns"):
          found += _equations(inner, inside_scan or eqn.primitive.name == "scan")
  return found


def _dynamic_slices(jaxpr) -> list:
  """The shapes every ``dynamic_slice`` in ``jaxpr`` and its inner jaxprs takes its slice from."""
  return [eqn.invars[0].aval.shape for eqn, _ in _equations(jaxpr)
          if eqn.primitive.name == "dynamic_slice"]


@pytest.mark.parametrize("case", ["qwen3", "gemma3"])
def test_scanned_layers_compute_rotary_angles_once_outside_the_loop(case, pairs):
  """XLA does not hoist loop-invariant work out of the scan: RoPE's cos and sin computed
  in the body ran again in every layer (two extra kernels a layer in a GPU decode step,
  benchmarks/README.md). They are computed once per block position, before the loop."""
  _, scanned = pairs(case)
  graphdef, state = nnx.split(scanned)
  step = lambda state: nnx.merge(graphdef, state)(  # noqa: E731
      jnp.ones((2, 1), jnp.int32), cache=scanned.init_cache(2, 16))
  found = [(eqn.primitive.name, looped)
           for eqn, looped in _equations(jax.make_jaxpr(step)(state).jaxpr)]
  assert ("scan", False) in found
  assert not [name for name, looped in found if looped and name in ("cos", "sin")]
  # One per block position (Gemma 3's six: five local layers, one global) and leftover layer.
  outside = [name for name, looped in found if not looped and name == "cos"]
  assert len(outside) == scanned.layers.period + len(scanned.layers.rest)


def test_scanned_decoding_through_the_kernel_reads_the_stacked_cache_in_place(checkpoints,
                                                                             pairs):
  """With the decode-attention kernel (Pallas's interpreter), a scanned model passes the
  whole [B, L, S, K, H] cache and the layer number to it, scanned layers' traced numbers
  and the leftover layer's fixed one: a decode step slices no layer out of the cache,
  and greedy decoding gives transformers' tokens (which the unrolled model's equal)."""
  from tunix_zoo.kernels import KernelPolicy, set_kernel_policy

  case = "e6_k2_mlp_only"  # sparse, dense: scanned once; then a sparse layer left over
  _, scanned = pairs(case)
  stacked = scanned.init_cache(3, 64)["layers"]["k"].shape

  def cache_slices():
    graphdef, state = nnx.split(scanned)
    step = lambda state: nnx.merge(graphdef, state)(  # noqa: E731
        jnp.ones((3, 1), jnp.int32), cache=scanned.init_cache(3, 64))
    return [shape for shape in _dynamic_slices(jax.make_jaxpr(step)(state).jaxpr)
            if shape == stacked]

  assert cache_slices(), "XLA's path slices each layer out of the stack"
  shared_policy = scanned.layers.blocks[0].attn.kernel_policy  # the module's pair: restored
  set_kernel_policy(scanned, KernelPolicy(decode_attention="interpret"))
  try:
    assert not cache_slices()
    tokens, mask, _ = reference.left_padded_batch()
    np.testing.assert_array_equal(
        reference.greedy(scanned, tokens, mask, NEW_TOKENS),
        reference.reference_greedy(checkpoints(case)[1], tokens, mask, NEW_TOKENS))
  finally:
    set_kernel_policy(scanned, shared_policy)
