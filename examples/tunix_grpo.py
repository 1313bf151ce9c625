"""A short GRPO run through Tunix on the offline tiny-demo model.

    python examples/tunix_grpo.py            # 2 GRPO steps, on one CPU device

A tunix_zoo model goes into Tunix's RLCluster and GRPOLearner as it is: Tunix samples
completions with its own Sampler on our KV cache, scores them with a toy reward (longer
completions of the demo text score higher) and updates the actor with our LoRA adapters
against the frozen base model as the reference.
"""

import jax
import numpy as np
import optax
from tunix.rl import rl_cluster as rl_cluster_lib
from tunix.rl.grpo import grpo_learner
from tunix.rl.rollout import base_rollout

from tunix_zoo import AutoModel, Tokenizer
from tunix_zoo.lora import apply_lora, lora_layers
from tunix_zoo.demo import DEMO_PROMPT, demo_checkpoint

STEPS = 2


def reward_length(prompts, completions, **kwargs):
  """Toy reward: the number of words generated."""
  return [float(len(text.split())) for text in completions]


def main() -> None:
  mesh = jax.make_mesh((1, 1), ("fsdp", "tp"), devices=jax.devices()[:1],
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  reference, path = AutoModel.from_pretrained(str(demo_checkpoint()), mesh)
  actor, _ = AutoModel.from_pretrained(path, mesh)
  apply_lora(actor, rank=4, alpha=8.0)
  tokenizer = Tokenizer.from_pretrained(path)
  cluster = rl_cluster_lib.RLCluster(
      actor=actor,
      reference=reference,
      tokenizer=tokenizer,
      cluster_config=rl_cluster_lib.ClusterConfig(
          role_to_mesh={role: mesh for role in rl_cluster_lib.Role},
          rollout_engine="vanilla",
          offload_to_cpu=False,
          training_config=rl_cluster_lib.RLTrainingConfig(
              actor_optimizer=optax.adamw(1e-3),
              eval_every_n_steps=100,
              max_steps=STEPS,
          ),
          rollout_config=base_rollout.RolloutConfig(
              max_tokens_to_generate=8, max_prompt_length=8, kv_cache_size=32,
              temperature=0.9, top_p=1.0,
          ),
      ),
  )
  learner = grpo_learner.GRPOLearner(
      rl_cluster=cluster,
      reward_fns=reward_length,
      algo_config=grpo_learner.GRPOConfig(num_generations=2, num_iterations=1, beta=0.04),
  )
  # Tunix repeats every field of a batch per generation: an array, not a list.
  prompts = [{"prompts": np.array([DEMO_PROMPT, "Flax NNX"])}] * STEPS
  learner.train(prompts)
  moved = max(float(abs(layer.lora_b.get_value()).max()) for layer in lora_layers(actor).values())
  print(f"GRPO steps: {cluster.global_steps}  max |lora_b| after training: {moved:.2e}")

if __name__ == "__main__":
  main()
