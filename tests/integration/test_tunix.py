"""A tunix_zoo model in google-tunix unchanged: its Sampler, PeftTrainer and GRPO.

Tunix's own code runs against the tiny demo model (built once for the module), on Auto
and Explicit meshes. Explicit meshes are used as JAX asks, under ``jax.set_mesh`` (Tunix
creates its buffers with plain ``jnp.zeros``). Tunix's Sampler keeps an array in its
state's static fields, which cannot be compared across Explicit meshes of different
shapes in one process: the Explicit Sampler and GRPO cases therefore all use (2, 1)
meshes, and Explicit (1, 1) is exercised by the trainers.
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
import qwix
from flax import nnx
from jax.sharding import AxisType, PartitionSpec
from tunix.generate import sampler as sampler_lib
from tunix.rl import rl_cluster as rl_cluster_lib
from tunix.rl.grpo import grpo_learner
from tunix.rl.rollout import base_rollout
from tunix.sft import peft_trainer
from tunix.sft import utils as sft_utils

from tunix_zoo import AutoModel, Tokenizer, generate
from tunix_zoo.demo import DEMO_PROMPT, build_demo_checkpoint
from tunix_zoo.lora import apply_lora, lora_layers

PROMPTS = [DEMO_PROMPT, "Flax NNX is"]
# float32 on CPU at "highest" matmul precision, as the parity tests.
LOGPROB_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
  folder = build_demo_checkpoint(tmp_path_factory.mktemp("tunix") / "tiny-demo")
  return str(folder), Tokenizer.from_pretrained(folder)


def case_id(value) -> str:
  if isinstance(value, tuple):
    return "x".join(map(str, value))
  return str(value).rpartition(".")[2].lower()


def make_mesh(shape, axis_type, first_device=0):
  devices = jax.devices()[first_device:first_device + shape[0] * shape[1]]
  return jax.make_mesh(shape, ("fsdp", "tp"), axis_types=(axis_type,) * 2, devices=devices)


def mesh_context(mesh):
  explicit = mesh.axis_types[0] == AxisType.Explicit
  return jax.set_mesh(mesh) if explicit else contextlib.nullcontext()


def cache_config(model, size=64):
  c = model.config
  return sampler_lib.CacheConfig(
      cache_size=size, num_layers=c.num_layers, num_kv_heads=c.num_kv_heads, head_dim=c.head_dim
  )


SAMPLER_MESHES = [
    ((1, 1), AxisType.Auto), ((2, 1), AxisType.Auto), ((1, 2), AxisType.Auto),
    ((2, 1), AxisType.Explicit),
]


@pytest.mark.parametrize("shape,axis_type", SAMPLER_MESHES, ids=case_id)
def test_sampler_greedy_beam_top_p_and_logits(demo, shape, axis_type):
  folder, tokenizer = demo
  mesh = make_mesh(shape, axis_type)
  model, _ = AutoModel.from_pretrained(folder, mesh)
  ours = generate(model, PROMPTS, 12, tokenizer=tokenizer, eos_ids=[])
  with mesh_context(mesh):
    sampler = sampler_lib.Sampler(model, tokenizer, cache_config(model))
    # No EOS: every row runs all steps, as ours did.
    out = sampler(PROMPTS, max_generation_steps=12, max_prompt_length=8, eos_tokens=[-1],
                  return_logits=True, return_logprobs=True)
    assert [np.asarray(t).tolist() for t in out.tokens] == ours.tokens.tolist()
    assert out.text == ours.text
    # Logprobs of the sampled tokens against a plain forward over prompt + completion.
    for i, prompt in enumerate(PROMPTS):
      ids = tokenizer.encode(prompt) + ours.tokens[i].tolist()
      logits, _ = model(jnp.asarray([ids]))
      logp = jax.nn.log_softmax(np.asarray(logits[0], np.float32), axis=-1)
      start = len(ids) - 12
      expected = [float(logp[start + j - 1, t]) for j, t in enumerate(ours.tokens[i])]
      np.testing.assert_allclose(out.logprobs[i], expected, atol=LOGPROB_TOLERANCE)
      np.testing.assert_allclose(
          np.asarray(out.logits[i]), np.asarray(logits[0, start - 1:-1]), atol=LOGPROB_TOLERANCE
      )
    # Tunix's beam search repeats the cache with a plain jnp.repeat, which an Explicit
    # mesh refuses on a batch-sharded array: one prompt there (its cache is replicated).
    explicit = axis_type == AxisType.Explicit
    beam_prompts = PROMPTS[:1] if explicit and shape[0] > 1 else PROMPTS
    beam = sampler(beam_prompts, max_generation_steps=8, max_prompt_length=8, beam_size=2)
    assert len(beam.text) == len(beam_prompts) and all(beam.text)
    # The demo model memorised its text: the best beam continues it as greedy does.
    assert beam.text[0].startswith(ours.text[0][:10])
    top_p = sampler(PROMPTS, max_generation_steps=8, max_prompt_length=8, temperature=0.8,
                    top_p=0.9, seed=3)
    assert all(len(t) for t in top_p.tokens)


def test_tokenizer_ids_are_what_tunix_reads(demo):
  from tunix.generate.tokenizer_adapter import TokenizerAdapter

  _, tokenizer = demo
  adapter = TokenizerAdapter(tokenizer)
  assert adapter.eos_id() == tokenizer.eos_ids[0]
  assert adapter.pad_id() == tokenizer.token_to_id("<|endoftext|>")
  assert adapter.bos_id() is None


def test_partition_specs_reshard_onto_another_mesh(demo):
  folder, _ = demo
  model, _ = AutoModel.from_pretrained(folder, make_mesh((1, 1), AxisType.Auto))
  specs = nnx.get_partition_spec(nnx.state(model, nnx.Param))
  # Size-1 mesh axes stay in the spec: a reshard onto a larger mesh shards.
  assert specs["layers"][0]["attn"]["q_proj"]["weight"].get_value() == PartitionSpec("tp", "fsdp")
  assert specs["embed_tokens"]["weight"].get_value() == PartitionSpec("tp", "fsdp")
  target = make_mesh((2, 2), AxisType.Auto, first_device=4)
  graphdef, state = nnx.split(model)
  shardings = jax.tree.map(
      lambda s: jax.sharding.NamedSharding(target, s if s is not None else PartitionSpec()),
      nnx.get_partition_spec(state),
  )
  moved = nnx.merge(graphdef, jax.device_put(state, shardings))
  assert moved.mesh == target
  cache = moved.init_cache(2, 64)
  assert all(set(leaf.devices()) == set(target.devices.flat) for leaf in jax.tree.leaves(cache))
  tokens = jnp.asarray([[1, 2, 3, 4], [5, 6, 7, 8]])
  np.testing.assert_allclose(moved(tokens)[0], model(tokens)[0], atol=1e-5)


def model_inputs(batch):
  """What Tunix's default loss needs, built as Tunix's SFT examples build it."""
  mask = batch["input_mask"].astype(bool)
  return {
      "input_tokens": batch["input_tokens"], "input_mask": batch["input_mask"],
      "positions": sft_utils.build_positions_from_mask(mask),
      "attention_mask": sft_utils.make_causal_attn_mask(mask),
  }


def sft_batches(tokenizer, steps, batch=2, length=16):
  ids = tokenizer.encode("JAX is a Python library for accelerator-oriented array computation")
  rows = np.array([ids[:length]] * batch, np.int32)
  return [{"input_tokens": rows, "input_mask": np.ones_like(rows)}] * steps


TRAINER_CASES = [
    ("full", (1, 1), AxisType.Auto), ("apply_lora", (1, 1), AxisType.Explicit),
    ("qwix", (1, 1), AxisType.Auto), ("qwix", (2, 1), AxisType.Explicit),
]


@pytest.mark.slow
@pytest.mark.parametrize("adapters,shape,axis_type", TRAINER_CASES, ids=case_id)
def test_peft_trainer(demo, adapters, shape, axis_type, tmp_path):
  folder, tokenizer = demo
  mesh = make_mesh(shape, axis_type)
  model, _ = AutoModel.from_pretrained(folder, mesh)
  if adapters == "apply_lora":
    apply_lora(model, rank=4, alpha=8.0,
               module_path=".*q_einsum|.*kv_einsum|.*gate_proj|.*down_proj|.*up_proj"
                           "|.*attn_vec_einsum")
    # Tunix's module names reach every attention and MLP projection.
    assert len(lora_layers(model)) == 7 * model.config.num_layers
  elif adapters == "qwix":
    provider = qwix.LoraProvider(module_path=".*q_proj|.*v_proj|.*down_proj", rank=4, alpha=8.0)
    with mesh_context(mesh):
      model = qwix.apply_lora_to_model(model, provider, rngs=nnx.Rngs(0),
                                       **model.get_model_input())
    lora = nnx.state(model, nnx.LoRAParam)
    assert len(jax.tree.leaves(lora)) == 2 * 3 * model.config.num_layers
  before = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
  config = peft_trainer.TrainingConfig(
      eval_every_n_steps=100, max_steps=2, checkpoint_root_directory=str(tmp_path / "ckpt"),
      checkpointing_options=ocp.CheckpointManagerOptions(save_interval_steps=1),
  )
  with mesh_context(mesh), mesh:
    trainer = peft_trainer.PeftTrainer(model, optax.sgd(1e-2), config)
    trainer.with_gen_model_input_fn(model_inputs)
    trainer.train(sft_batches(tokenizer, 2))
  assert trainer.train_steps == 2
  after = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
  changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after))]
  assert any(changed)
  trained = nnx.state(model, nnx.LoRAParam) if adapters != "full" else nnx.state(model, nnx.Param)
  # A fresh trainer restores the step-2 checkpoint into a fresh model.
  fresh, _ = AutoModel.from_pretrained(folder, mesh)
  if adapters == "apply_lora":
    apply_lora(fresh, rank=4, alpha=8.0,
               module_path=".*q_einsum|.*kv_einsum|.*gate_proj|.*down_proj|.*up_proj"
                           "|.*attn_vec_einsum")
  elif adapters == "qwix":
    with mesh_context(mesh):
      fresh = qwix.apply_lora_to_model(fresh, provider, rngs=nnx.Rngs(1),
                                       **fresh.get_model_input())
  with mesh_context(mesh), mesh:
    restored = peft_trainer.PeftTrainer(fresh, optax.sgd(1e-2), config)
  assert restored.train_steps == 2
  kind = nnx.LoRAParam if adapters != "full" else nnx.Param
  for a, b in zip(jax.tree.leaves(trained), jax.tree.leaves(nnx.state(fresh, kind))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def reward_words(prompts, completions, **kwargs):
  return [float(len(text.split())) for text in completions]


# Explicit meshes are left out: Tunix's Sampler then fails inside XLA's buffer donation
# (a batch-sharded donated buffer aliased to a replicated output).
GRPO_CASES = [
    ("colocated", (1, 1), AxisType.Auto), ("rollout_elsewhere", (1, 1), AxisType.Auto),
]


@pytest.mark.slow
@pytest.mark.parametrize("placement,shape,axis_type", GRPO_CASES, ids=case_id)
def test_grpo_two_steps(demo, placement, shape, axis_type):
  folder, tokenizer = demo
  mesh = make_mesh(shape, axis_type)
  rollout_mesh = mesh if placement == "colocated" else make_mesh(shape, axis_type, 4)
  actor, _ = AutoModel.from_pretrained(folder, mesh)
  reference, _ = AutoModel.from_pretrained(folder, mesh)
  apply_lora(actor, rank=4, alpha=8.0)
  meshes = {role: mesh for role in rl_cluster_lib.Role}
  meshes[rl_cluster_lib.Role.ROLLOUT] = rollout_mesh
  with mesh_context(mesh):
    cluster = rl_cluster_lib.RLCluster(
        actor=actor, reference=reference, tokenizer=tokenizer,
        cluster_config=rl_cluster_lib.ClusterConfig(
            role_to_mesh=meshes, rollout_engine="vanilla", offload_to_cpu=False,
            training_config=rl_cluster_lib.RLTrainingConfig(
                actor_optimizer=optax.adamw(1e-3), eval_every_n_steps=100, max_steps=2,
            ),
            rollout_config=base_rollout.RolloutConfig(
                max_tokens_to_generate=8, max_prompt_length=8, kv_cache_size=32,
                temperature=0.9, top_p=1.0,
            ),
        ),
    )
    learner = grpo_learner.GRPOLearner(
        rl_cluster=cluster, reward_fns=reward_words,
        algo_config=grpo_learner.GRPOConfig(num_generations=2, num_iterations=1, beta=0.04),
    )
    learner.train([{"prompts": np.array(PROMPTS)}] * 2)
  assert cluster.global_steps == 2
  rollout_model = cluster.rollout.model()
  assert set(rollout_model.mesh.devices.flat) == set(rollout_mesh.devices.flat)
  assert any(float(abs(layer.lora_b.get_value()).max()) > 0 for layer in lora_layers(actor).values())
