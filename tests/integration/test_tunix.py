"""A tunix_zoo model in google-tunix unchanged: its Sampler, PeftTrainer and GRPO.

Tunix's own code runs against the tiny demo model on Auto and Explicit meshes, (1, 1) and
(2, 1) / (1, 2). Explicit meshes are used as JAX asks, under ``jax.set_mesh`` (Tunix
creates its buffers with plain ``jnp.zeros``); Tunix's GRPO rollout runs in a worker
thread that ``jax.set_mesh`` does not reach, so that path is covered too.

Kept fast for CI: one model per mesh for the module, one Sampler per mesh test (Tunix
compiles per Sampler) checked against one greedy reference, the same few shapes
everywhere, few steps and tokens.
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
from jax._src import api_util
from jax.sharding import AxisType, PartitionSpec
from tunix.generate import sampler as sampler_lib
from tunix.generate.tokenizer_adapter import TokenizerAdapter
from tunix.rl import rl_cluster as rl_cluster_lib
from tunix.rl.grpo import grpo_learner
from tunix.rl.rollout import base_rollout
from tunix.sft import peft_trainer
from tunix.sft import utils as sft_utils

from tunix_zoo import AutoModel, Tokenizer, generate
from tunix_zoo.demo import DEMO_PROMPT
from tunix_zoo.lora import apply_lora, lora_layers

PROMPTS = [DEMO_PROMPT, "Flax NNX is"]
# float32 on CPU at "highest" matmul precision, as the parity tests.
LOGPROB_TOLERANCE = 1e-4
NEW_TOKENS = 8
PROMPT_LENGTH = 8
CACHE_SIZE = 32
TUNIX_LORA_NAMES = ".*q_einsum|.*kv_einsum|.*gate_proj|.*down_proj|.*up_proj|.*attn_vec_einsum"
MESHES = [
    (shape, axis_type)
    for axis_type in (AxisType.Auto, AxisType.Explicit) for shape in ((1, 1), (2, 1), (1, 2))
]


def case_id(value) -> str:
  if isinstance(value, tuple):
    return "x".join(map(str, value))
  return str(value).rpartition(".")[2].lower()


def make_mesh(shape, axis_type, first_device=0):
  devices = jax.devices()[first_device:first_device + shape[0] * shape[1]]
  return jax.make_mesh(shape, ("fsdp", "tp"), axis_types=(axis_type,) * 2, devices=devices)


@contextlib.contextmanager
def mesh_context(mesh):
  """``jax.set_mesh(mesh)`` for an Explicit mesh, nothing for an Auto one.

  Tunix's ``_SamplingState`` keeps a jax array (``num_input_tokens``) in a static field,
  and JAX's process-wide ``donation_vector`` cache compares the states of all Samplers
  by value: two such arrays typed on Explicit meshes of different shapes cannot be
  compared, so a Sampler on another Explicit mesh fails in the same process. That cache
  is forgotten on entering an Explicit mesh; the model needs nothing.
  """
  if mesh.axis_types[0] != AxisType.Explicit:
    yield
    return
  forget = getattr(getattr(api_util, "donation_vector", None), "cache_clear", None)
  if forget is not None:
    forget()
  with jax.set_mesh(mesh):
    yield


@pytest.fixture(scope="module")
def demo(demo_folder):
  return str(demo_folder), Tokenizer.from_pretrained(demo_folder)


@pytest.fixture(scope="module")
def shared_model(demo):
  """(shape, axis_type) -> the demo model on that mesh, loaded once; read-only."""
  models = {}

  def load(shape, axis_type):
    if (shape, axis_type) not in models:
      models[shape, axis_type] = AutoModel.from_pretrained(demo[0], make_mesh(shape, axis_type))[0]
    return models[shape, axis_type]

  return load


def cache_config(model):
  c = model.config
  return sampler_lib.CacheConfig(
      cache_size=CACHE_SIZE, num_layers=c.num_layers, num_kv_heads=c.num_kv_heads,
      head_dim=c.head_dim,
  )


def prompt_and_completion(tokenizer, completions):
  """Left-padded ``[B, T]`` prompt + completion tokens and their padding mask."""
  rows = [tokenizer.encode(p) + c.tolist() for p, c in zip(PROMPTS, completions)]
  length = max(map(len, rows))
  tokens = np.zeros((len(rows), length), np.int32)
  mask = np.zeros((len(rows), length), bool)
  for i, row in enumerate(rows):
    tokens[i, length - len(row):] = row
    mask[i, length - len(row):] = True
  return jnp.asarray(tokens), jnp.asarray(mask)


@pytest.fixture(scope="module")
def greedy_reference(demo, shared_model):
  """Our greedy decoding of PROMPTS on the (1, 1) Auto mesh and the logits of one plain
  forward over prompt + completion (those at position t predict token t + 1), once for
  every mesh's Sampler: the same float32 numbers within the tolerance on any mesh."""
  _, tokenizer = demo
  model = shared_model((1, 1), AxisType.Auto)
  ours = generate(model, PROMPTS, NEW_TOKENS, tokenizer=tokenizer, eos_ids=[])
  tokens, mask = prompt_and_completion(tokenizer, ours.tokens)
  logits = nnx.jit(lambda m, t, a: m(t, attention_mask=a)[0])(model, tokens, mask)
  predicting = np.asarray(logits, np.float32)[:, -NEW_TOKENS - 1:-1]
  return ours, predicting


@pytest.mark.parametrize("shape,axis_type", MESHES, ids=case_id)
def test_sampler_greedy_beam_top_p_and_logits(demo, shared_model, greedy_reference, shape,
                                              axis_type):
  _, tokenizer = demo
  ours, predicting = greedy_reference
  model = shared_model(shape, axis_type)
  with mesh_context(model.mesh):
    sampler = sampler_lib.Sampler(model, tokenizer, cache_config(model))
    # No EOS: every row runs all steps, as ours did.
    out = sampler(PROMPTS, max_generation_steps=NEW_TOKENS, max_prompt_length=PROMPT_LENGTH,
                  eos_tokens=[-1], return_logits=True, return_logprobs=True)
    # The batch is split over an fsdp axis of 2: Tunix repeats the cache per beam.
    beam = sampler(PROMPTS, max_generation_steps=NEW_TOKENS, max_prompt_length=PROMPT_LENGTH,
                   beam_size=2)
    top_p = sampler(PROMPTS, max_generation_steps=NEW_TOKENS, max_prompt_length=PROMPT_LENGTH,
                    temperature=0.8, top_p=0.9, seed=3)
  assert [np.asarray(t).tolist() for t in out.tokens] == ours.tokens.tolist()
  assert out.text == ours.text
  # Logprobs and logits of the sampled tokens against the plain forward.
  logp = jax.nn.log_softmax(predicting, axis=-1)
  expected = np.take_along_axis(logp, ours.tokens[..., None], axis=-1)[..., 0]
  np.testing.assert_allclose(np.asarray(out.logprobs), expected, atol=LOGPROB_TOLERANCE)
  np.testing.assert_allclose(np.stack(out.logits), predicting, atol=LOGPROB_TOLERANCE)
  # The demo model memorised its text: the best beam continues it as greedy does.
  assert len(beam.text) == len(PROMPTS)
  for text, greedy in zip(beam.text, ours.text):
    assert text.startswith(greedy[:10])
  assert all(len(t) for t in top_p.tokens)


def test_tokenizer_ids_are_what_tunix_reads(demo):
  _, tokenizer = demo
  adapter = TokenizerAdapter(tokenizer)
  assert adapter.eos_id() == tokenizer.eos_ids[0]
  assert adapter.pad_id() == tokenizer.token_to_id("<|endoftext|>")
  assert adapter.bos_id() is None


@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit], ids=case_id)
def test_partition_specs_reshard_onto_another_mesh(shared_model, axis_type):
  model = shared_model((1, 1), axis_type)
  specs = nnx.get_partition_spec(nnx.state(model, nnx.Param))
  # Size-1 mesh axes stay in the spec: a reshard onto a larger mesh shards.
  assert specs["layers"][0]["attn"]["q_proj"]["weight"].get_value() == PartitionSpec("tp", "fsdp")
  assert specs["embed_tokens"]["weight"].get_value() == PartitionSpec("tp", "fsdp")
  # What RLCluster does for a rollout on other devices.
  target = make_mesh((2, 2), axis_type, first_device=4)
  graphdef, state = nnx.split(model)
  shardings = jax.tree.map(
      lambda s: jax.sharding.NamedSharding(target, s if s is not None else PartitionSpec()),
      nnx.get_partition_spec(state),
  )
  moved = nnx.merge(graphdef, jax.device_put(state, shardings))
  assert moved.mesh == target
  weight = moved.embed_tokens.weight.get_value()
  assert weight.sharding.shard_shape(weight.shape) == (weight.shape[0] // 2, weight.shape[1] // 2)
  cache = moved.init_cache(2, CACHE_SIZE)
  assert all(set(leaf.devices()) == set(target.devices.flat) for leaf in jax.tree.leaves(cache))
  tokens = jnp.asarray([[1, 2, 3, 4], [5, 6, 7, 8]])
  # Jitted: one compiled program per mesh rather than one per op.
  forward = nnx.jit(lambda m, t: m(t)[0])
  with mesh_context(target):
    moved_logits = forward(moved, tokens)
  with mesh_context(model.mesh):
    logits = forward(model, tokens)
  np.testing.assert_allclose(moved_logits, logits, atol=1e-5)


@pytest.mark.parametrize("shape,axis_type", MESHES, ids=case_id)
def test_qwix_lora_recipe_creates_adapters(shared_model, shape, axis_type):
  """Tunix's recipe, ``qwix.apply_lora_to_model(model, provider, **model.get_model_input())``,
  adds typed LoRA parameters on every mesh, and the model still runs."""
  # qwix adapts a clone: the shared model stays as it was.
  model = shared_model(shape, axis_type)
  provider = qwix.LoraProvider(module_path=".*q_proj|.*v_proj|.*down_proj", rank=4, alpha=8.0)
  with mesh_context(model.mesh):
    lora_model = qwix.apply_lora_to_model(model, provider, rngs=nnx.Rngs(0),
                                          **model.get_model_input())
    lora = jax.tree.leaves(nnx.state(lora_model, nnx.LoRAParam))
    assert len(lora) == 2 * 3 * model.config.num_layers
    assert all(set(a.devices()) == set(model.mesh.devices.flat) for a in lora)
    # Eager on the recipe's own inputs: the ops qwix's initialising call compiled, reused.
    logits, _ = lora_model(**model.get_model_input())
  assert logits.shape == (2, 1, model.config.vocab_size)
  assert not nnx.state(model, nnx.LoRAParam)


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


def with_adapters(model, adapters, seed):
  """``model`` with the adapters of a trainer case: ours, qwix's (Tunix's recipe), none."""
  if adapters == "apply_lora":
    apply_lora(model, rank=4, alpha=8.0, module_path=TUNIX_LORA_NAMES)
    # Tunix's module names reach every attention and MLP projection.
    assert len(lora_layers(model)) == 7 * model.config.num_layers
  elif adapters == "qwix":
    provider = qwix.LoraProvider(module_path=".*q_proj|.*v_proj|.*down_proj", rank=4, alpha=8.0)
    with mesh_context(model.mesh):
      model = qwix.apply_lora_to_model(model, provider, rngs=nnx.Rngs(seed),
                                       **model.get_model_input())
  return model


# Each adapter kind on both mesh kinds, one (1, 1) and one larger mesh each.
TRAINER_CASES = [
    ("full", (1, 1), AxisType.Auto), ("full", (2, 1), AxisType.Explicit),
    ("apply_lora", (1, 1), AxisType.Explicit), ("apply_lora", (1, 2), AxisType.Auto),
    ("qwix", (1, 1), AxisType.Auto), ("qwix", (2, 1), AxisType.Explicit),
]


@pytest.mark.slow
@pytest.mark.parametrize("adapters,shape,axis_type", TRAINER_CASES, ids=case_id)
def test_peft_trainer(demo, adapters, shape, axis_type, tmp_path):
  folder, tokenizer = demo
  mesh = make_mesh(shape, axis_type)
  model = with_adapters(AutoModel.from_pretrained(folder, mesh)[0], adapters, seed=0)
  kind = nnx.LoRAParam if adapters != "full" else nnx.Param
  before = jax.tree.map(np.asarray, nnx.state(model, kind))
  config = peft_trainer.TrainingConfig(
      eval_every_n_steps=100, max_steps=2, checkpoint_root_directory=str(tmp_path / "ckpt"),
      checkpointing_options=ocp.CheckpointManagerOptions(save_interval_steps=2),
  )
  # AdamW: its states are placed by nnx.get_partition_spec (Tunix's _shard_optimizer).
  with mesh_context(mesh), mesh:
    trainer = peft_trainer.PeftTrainer(model, optax.adamw(1e-2), config)
    trainer.with_gen_model_input_fn(model_inputs)
    trainer.train(sft_batches(tokenizer, 2))
  assert trainer.train_steps == 2
  trained = nnx.state(model, kind)
  assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(trained)))
  # A fresh trainer restores the step-2 checkpoint into a fresh model.
  fresh = with_adapters(AutoModel.from_pretrained(folder, mesh)[0], adapters, seed=1)
  with mesh_context(mesh), mesh:
    restored = peft_trainer.PeftTrainer(fresh, optax.adamw(1e-2), config)
  assert restored.train_steps == 2
  for a, b in zip(jax.tree.leaves(trained), jax.tree.leaves(nnx.state(fresh, kind))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def reward_words(prompts, completions, **kwargs):
  return [float(len(text.split())) for text in completions]


# Each placement on both mesh kinds, one (1, 1) and one larger mesh each; the rollout
# elsewhere is on devices 4.. of the 8.
GRPO_CASES = [
    ("colocated", (1, 1), AxisType.Auto), ("colocated", (2, 1), AxisType.Explicit),
    ("rollout_elsewhere", (1, 1), AxisType.Explicit),
    ("rollout_elsewhere", (1, 2), AxisType.Auto),
]


@pytest.mark.slow
@pytest.mark.parametrize("placement,shape,axis_type", GRPO_CASES, ids=case_id)
def test_grpo_two_steps(demo, shared_model, placement, shape, axis_type):
  folder, tokenizer = demo
  mesh = make_mesh(shape, axis_type)
  rollout_mesh = mesh if placement == "colocated" else make_mesh(shape, axis_type, 4)
  actor, _ = AutoModel.from_pretrained(folder, mesh)
  # The reference model is only read (its log-probabilities): the module's shared one.
  reference = shared_model(shape, axis_type)
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
                max_tokens_to_generate=4, max_prompt_length=PROMPT_LENGTH,
                kv_cache_size=16, temperature=0.9, top_p=1.0,
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
