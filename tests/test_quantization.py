"""Weight-only quantized loading (int8 / int4 / nf4 / fp8) and QLoRA on the tiny references.

Tolerances, against the float32 model (relative to its largest |logit|). The references
have random weights, so their logits are nearly flat (median top-1 margin 5-7% of the
largest logit): even bfloat16 weights flip the top-1 token at 1-2% of positions there.
Top-1 agreement is therefore checked where the float32 top-1 leads by a margin, and over
all positions at a looser level.

* int8, one scale per output channel: max-abs <= 3% (measured <= 2.1%); top-1 agreement
  >= 99% where the margin is >= 1% (measured 100%), >= 95% everywhere (96-99%; bfloat16
  weights: 97.7-99.2%).
* int4 / nf4, groups of 32 inputs: max-abs <= 50% (measured <= 40%; the references are 64
  wide); top-1 agreement >= 90% where the margin is >= 10% (measured 92-100%), >= 60%
  everywhere (65-82%).
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import AxisType

from tests import reference
from tunix_zoo import AutoModel, cli
from tunix_zoo.checkpoint.export import save_pretrained
from tunix_zoo.errors import CheckpointError, ConfigError, ExportError, LoraError
from tunix_zoo.layers.quantized import Quantization
from tunix_zoo.lora import apply_lora, merge_lora, save_lora_adapter
from tunix_zoo.planning import plan_model, plan_training
from tunix_zoo.training import train

INT8_MAX_ABS, INT8_TOP1_MARGIN, INT8_TOP1, INT8_TOP1_ALL = 0.03, 0.01, 0.99, 0.95
INT4_MAX_ABS, INT4_TOP1_MARGIN, INT4_TOP1, INT4_TOP1_ALL = 0.5, 0.10, 0.90, 0.60
GROUPED = {"int4": Quantization("int4", group_size=32), "nf4": Quantization("nf4", group_size=32)}


def one_device():
  return jax.make_mesh((1, 1), ("fsdp", "tp"), devices=jax.devices()[:1],
                       axis_types=(AxisType.Auto,) * 2)


def tokens():
  return jnp.asarray(np.random.RandomState(0).randint(3, reference.VOCAB, (8, 32)))


# One program per model (and mesh): eager op-by-op dispatch compiles far more.
_logits = nnx.jit(lambda model, tokens: model(tokens)[0])


@pytest.fixture(scope="module")
def float_logits(reference_checkpoints):
  """case -> float32 logits of :func:`tokens`, computed once per case."""
  cache = {}

  def get(case):
    if case not in cache:
      model, _ = AutoModel.from_pretrained(str(reference_checkpoints[case][0]), one_device())
      cache[case] = np.asarray(_logits(model, tokens()))
    return cache[case]

  return get


def agreement(logits, ref, margin):
  """(max-abs / max|ref|, top-1 agreement where ref leads by ``margin`` x max|ref|, overall)."""
  scale = np.abs(ref).max()
  top2 = np.sort(ref, -1)[..., -2:]
  clear = (top2[..., 1] - top2[..., 0]) >= margin * scale
  agree = logits.argmax(-1) == ref.argmax(-1)
  return np.abs(logits - ref).max() / scale, agree[clear].mean(), agree.mean()


@pytest.mark.parametrize("case", ["llama3", "gemma2"])
def test_int8_logits_match_float32(reference_checkpoints, float_logits, case):
  model, _ = AutoModel.from_pretrained(str(reference_checkpoints[case][0]), one_device(),
                                       quantization="int8")
  proj = model.layers[0].mlp.down_proj
  assert proj.weight.dtype == jnp.int8 and proj.weight_scale.shape == (64, 1)
  assert model.embed_tokens.weight.dtype == jnp.float32  # embeddings stay unquantized
  max_abs, top1, top1_all = agreement(np.asarray(_logits(model, tokens())), float_logits(case),
                                      INT8_TOP1_MARGIN)
  assert max_abs <= INT8_MAX_ABS and top1 >= INT8_TOP1 and top1_all >= INT8_TOP1_ALL, (
      max_abs, top1, top1_all)


@pytest.fixture(scope="module")
def four_bit_model(reference_checkpoints):
  """kind -> (model, logits of :func:`tokens`) of the qwen3 reference on one device."""
  cache = {}

  def get(kind):
    if kind not in cache:
      model, _ = AutoModel.from_pretrained(str(reference_checkpoints["qwen3"][0]),
                                           one_device(), quantization=GROUPED[kind])
      cache[kind] = model, np.asarray(_logits(model, tokens()))
    return cache[kind]

  return get


@pytest.mark.parametrize("kind", ["int4", "nf4"])
def test_4bit_logits_match_float32(four_bit_model, float_logits, kind):
  model, logits = four_bit_model(kind)
  proj = model.layers[0].mlp.down_proj  # [64, 96]: 48 bytes a row, 3 groups of 32
  assert proj.weight.dtype == jnp.uint8 and proj.weight.shape == (64, 48)
  assert proj.weight_scale.shape == (64, 3)
  max_abs, top1, top1_all = agreement(logits, float_logits("qwen3"),
                                      INT4_TOP1_MARGIN)
  assert max_abs <= INT4_MAX_ABS and top1 >= INT4_TOP1 and top1_all >= INT4_TOP1_ALL, (
      max_abs, top1, top1_all)


def test_quantize_round_trip_of_each_kind():
  w = np.random.RandomState(1).standard_normal((16, 64)).astype(np.float32)
  # Worst case per value: half a step (absmax / 127, / 7), NF4's widest half-gap, fp8
  # e4m3's relative rounding of 2^-4 (plus the scale's bfloat16 rounding).
  bounds = {"int8": 0.5 / 127 + 0.01, "int4": 0.5 / 7 + 0.01, "nf4": 0.16, "fp8": 0.07}
  for kind, bound in bounds.items():
    scheme = Quantization(kind, group_size=32)
    values, scales = scheme.quantize(w, np)
    back = np.asarray(scheme.dequantize(jnp.asarray(values), jnp.asarray(scales), jnp.float32))
    absmax = np.abs(w.reshape(16, 2, 32)).max(-1).repeat(32, -1)
    assert np.abs(back - w).max(initial=0) > 0
    assert (np.abs(back - w) <= bound * absmax).all(), kind
    # The traced quantizer (random init) gives the host one's values.
    traced, _ = scheme.quantize(jnp.asarray(w), jnp)
    assert (np.asarray(traced).view(np.uint8) == values.view(np.uint8)).mean() > 0.999, kind


@pytest.fixture(scope="module", params=[AxisType.Auto, AxisType.Explicit])
def int4_on_2x4(request, reference_checkpoints):
  mesh = jax.make_mesh((2, 4), ("fsdp", "tp"), axis_types=(request.param,) * 2)
  folder = reference_checkpoints["qwen3"][0]
  model, _ = AutoModel.from_pretrained(str(folder), mesh, quantization=GROUPED["int4"])
  return folder, mesh, model


def test_2x4_mesh_shards_scales_with_their_weights(int4_on_2x4, four_bit_model):
  _, mesh, model = int4_on_2x4
  for proj in (model.layers[0].attn.q_proj, model.layers[1].mlp.up_proj):
    values, scales = proj.weight.get_value(), proj.weight_scale.get_value()
    assert values.sharding.mesh == mesh and scales.sharding.mesh == mesh
    assert values.sharding.spec == scales.sharding.spec
    assert any(axis is not None for axis in scales.sharding.spec)
  np.testing.assert_allclose(np.asarray(_logits(model, tokens())), four_bit_model("int4")[1],
                             atol=1e-5)


def test_info_counts_the_bytes_each_device_holds(int4_on_2x4):
  folder, _, model = int4_on_2x4
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    assert cli.main(["info", str(folder), "--mesh", "2x4", "--dtype", "float32", "--json",
                     "--quantization", "int4", "--quantization-group-size", "32"]) == 0
  info = json.loads(out.getvalue())
  per_device: dict = {}
  for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)):
    for shard in leaf.addressable_shards:
      per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
  assert info["quantization"] == "int4" and len(per_device) == 8
  assert set(per_device.values()) == {info["bytes_per_device"]}
  unquantized = plan_model(model.config, (2, 4), "float32").bytes_per_device
  assert info["bytes_per_device"] < unquantized / 2


def test_decode_with_the_cache_reads_quantized_weights(four_bit_model, tmp_path):
  model, logits = four_bit_model("int4")
  batch = tokens()[:2, :12]
  # Jitted, as generate runs it: one program each for prefill and step (eager op-by-op
  # dispatch of the cached path compiles far more).
  forward = nnx.jit(lambda model, tokens, cache: model(tokens, cache=cache))
  _, cache = forward(model, batch[:, :-1], model.init_cache(batch_size=2, max_len=16))
  step, _ = forward(model, batch[:, -1:], cache)
  # Causal: the full forward of tokens() at position 11 is that of the batch's last token.
  np.testing.assert_allclose(np.asarray(step[:, 0]), logits[:2, 11], atol=1e-5)
  with pytest.raises(ExportError, match="quantized weights"):
    save_pretrained(model, tmp_path / "export")


def test_qlora_trains_adapters_over_frozen_quantized_weights(reference_checkpoints, tmp_path):
  model, _ = AutoModel.from_pretrained(str(reference_checkpoints["qwen3"][0]), one_device(),
                                       quantization=GROUPED["nf4"])
  apply_lora(model, rank=4, alpha=8.0)
  frozen = np.asarray(model.layers[0].attn.q_proj.weight.get_value())
  batch = tokens()[:4, :17]
  losses = train(model, iter(lambda: batch, None), optax.adamw(1e-2), steps=4,
                 wrt=nnx.LoRAParam)
  assert losses[-1] < losses[0] - 0.05, losses
  np.testing.assert_array_equal(np.asarray(model.layers[0].attn.q_proj.weight.get_value()),
                                frozen)
  assert model.layers[0].attn.q_proj.lora_a.dtype == jnp.float32
  out = save_lora_adapter(model, tmp_path / "adapter")
  assert {p.name for p in out.iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
  with pytest.raises(LoraError, match="nf4-quantized.*dequantize=True"):
    merge_lora(model)
  before = np.asarray(_logits(model, batch))
  merge_lora(model, dequantize=True)
  q_proj = model.layers[0].attn.q_proj
  assert q_proj.quantization is None and q_proj.weight.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(_logits(model, batch)), before, atol=1e-4)


def test_plan_training_counts_quantized_weights(reference_checkpoints):
  from tunix_zoo.automodel import family_and_config, read_hf_config

  _, config = family_and_config(read_hf_config(reference_checkpoints["qwen3"][0]), None)
  scheme = Quantization("int8")
  plan = plan_training(config, (1, 1), "float32", batch_size=2, seq_len=8, lora_rank=4,
                       quantization=scheme)
  assert plan.weight_bytes == plan_model(config, (1, 1), "float32", quantization=scheme
                                         ).bytes_per_device
  assert plan.weight_bytes < plan_model(config, (1, 1), "float32").bytes_per_device
  with pytest.raises(ConfigError, match="only LoRA adapters train"):
    plan_training(config, (1, 1), "float32", batch_size=2, seq_len=8, quantization=scheme)


def test_bad_quantization_settings_are_config_errors(reference_checkpoints):
  folder = str(reference_checkpoints["qwen3"][0])
  with pytest.raises(ConfigError, match="fp8.*float8 support"):
    AutoModel.from_pretrained(folder, one_device(), quantization="fp8")
  with pytest.raises(ConfigError, match="int3.*int8, int4, nf4, fp8"):
    AutoModel.from_pretrained(folder, one_device(), quantization="int3")
  # 64 inputs are not a multiple of the default group of 128.
  with pytest.raises(ConfigError, match=r"k_proj has 64 inputs, not a multiple of "
                     r"quantization group_size 128"):
    AutoModel.from_pretrained(folder, one_device(), quantization="int4")


def test_checkpoints_quantized_by_other_tools_are_refused(reference_checkpoints, tmp_path):
  from safetensors.numpy import load_file, save_file

  source = reference_checkpoints["llama3"][0]
  with_config = tmp_path / "fp8_config"
  shutil.copytree(source, with_config)
  config = json.loads((with_config / "config.json").read_text())
  config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic"}
  (with_config / "config.json").write_text(json.dumps(config))
  with pytest.raises(CheckpointError, match="quant_method 'fp8'.*quantization='int8'"):
    AutoModel.from_pretrained(str(with_config), one_device())

  with_scales = tmp_path / "fp8_tensors"
  shutil.copytree(source, with_scales)
  tensors = load_file(with_scales / "model.safetensors")
  tensors["model.layers.0.mlp.down_proj.weight_scale"] = np.ones((1,), np.float32)
  save_file(tensors, with_scales / "model.safetensors", metadata={"format": "pt"})
  with pytest.raises(CheckpointError, match=re.escape("down_proj.weight_scale")):
    AutoModel.from_pretrained(str(with_scales), one_device())
