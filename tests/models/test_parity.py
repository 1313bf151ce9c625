"""Every family against HF transformers on tiny random checkpoints.

Tolerance: float32 logits within MAX_ABS = 1e-4 (max absolute difference over real,
non-padding tokens); greedy decoding with our KV cache must be token-identical to
transformers' ``generate``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType

from tests import reference
from tests.reference import MAX_ABS, greedy, mesh_2x4, one_device_mesh
from tunix_zoo.automodel import load_folder

NEW_TOKENS = 32
CASES = sorted(reference.CASES)

# Module-level jitted calls: one compiled program per model structure and input shapes,
# shared by every test (and checkpoint) that runs the same case at the same shapes.
_forward = nnx.jit(lambda m, t, k: m(t, attention_mask=k))
_forward_at = nnx.jit(lambda m, t, p, k: m(t, positions=p, attention_mask=k))
_forward_cached = nnx.jit(lambda m, t, c, k: m(t, cache=c, attention_mask=k))


def real(mask):
  return mask.astype(bool)


@pytest.mark.parametrize("case", CASES)
def test_logits_match_transformers(reference_checkpoints, reference_models, case):
  _, torch_model = reference_checkpoints[case]
  tokens, mask, positions = reference.left_padded_batch()
  expected = reference.reference_logits(torch_model, tokens, mask, positions)
  model = reference_models(case)
  logits, cache = _forward(model, jnp.asarray(tokens), jnp.asarray(mask))
  assert cache is None
  diff = np.abs(np.asarray(logits) - expected)[real(mask)].max()
  assert diff <= MAX_ABS, f"{case}: max abs logit diff {diff}"
  # Explicit positions (Tunix passes them) give the same result.
  logits2, _ = _forward_at(model, jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(mask))
  np.testing.assert_allclose(np.asarray(logits2), np.asarray(logits), atol=1e-6)


@pytest.mark.parametrize("case", CASES)
def test_greedy_decode_matches_generate(reference_checkpoints, reference_models, case):
  _, torch_model = reference_checkpoints[case]
  tokens, mask, _ = reference.left_padded_batch(seed=1)
  expected = reference.reference_greedy(torch_model, tokens, mask, NEW_TOKENS)
  np.testing.assert_array_equal(greedy(reference_models(case), tokens, mask, NEW_TOKENS), expected)


@pytest.mark.parametrize("case", CASES)
def test_prefill_then_steps_reproduce_full_sequence(reference_models, case):
  model = reference_models(case)
  tokens, mask, _ = reference.left_padded_batch(seed=2)
  full, _ = _forward(model, jnp.asarray(tokens), jnp.asarray(mask))
  cache = model.init_cache(tokens.shape[0], 16)
  prefix = 5
  # One compiled program per input length (prefix, then 1) instead of op-by-op calls.
  stepped, cache = _forward_cached(
      model, jnp.asarray(tokens[:, :prefix]), cache, jnp.asarray(mask[:, :prefix])
  )
  outs = [np.asarray(stepped)]
  for t in range(prefix, tokens.shape[1]):
    step_logits, cache = _forward_cached(
        model, jnp.asarray(tokens[:, t:t + 1]), cache, jnp.asarray(mask[:, t:t + 1])
    )
    outs.append(np.asarray(step_logits))
  stepped = np.concatenate(outs, axis=1)
  diff = np.abs(stepped - np.asarray(full))[real(mask)].max()
  assert diff <= MAX_ABS


# The 2x4 tests are about the mesh, not depth: Gemma 3 keeps one local, local, global
# period and Qwen3 the two layers of the other families (compiling 6 layers on 8 devices
# took 4x the time of 2).
MESH_LAYERS = {"gemma3": 3, "qwen3": 2}


@pytest.fixture(scope="module")
def mesh_checkpoints(reference_checkpoints, tmp_path_factory):
  """case -> (folder, transformers model) for the 2x4 tests, made on first use."""
  made = {}

  def checkpoint(case):
    if case not in MESH_LAYERS:
      return reference_checkpoints[case]
    if case not in made:
      folder = tmp_path_factory.mktemp(f"{case}_mesh")
      made[case] = folder, reference.make_checkpoint(case, folder, layers=MESH_LAYERS[case])
    return made[case]

  return checkpoint


@pytest.mark.slow
@pytest.mark.parametrize("axis_type", [AxisType.Explicit, AxisType.Auto], ids=["explicit", "auto"])
@pytest.mark.parametrize("case", CASES)
def test_mesh_2x4_matches_transformers(mesh_checkpoints, case, axis_type):
  # Against transformers directly: the one-device model already matches it (the tests
  # above), and a second, unsharded copy here would double the compiles.
  folder, torch_model = mesh_checkpoints(case)
  tokens, mask, positions = reference.left_padded_batch(seed=3, batch=2)
  mesh = mesh_2x4(axis_type)
  sharded = load_folder(folder, mesh)
  q_proj = sharded.layers[0].attn.q_proj.weight[...]
  assert q_proj.sharding.mesh == mesh
  assert q_proj.sharding.spec == jax.sharding.PartitionSpec("tp", "fsdp")
  assert sharded.embed_tokens.weight[...].sharding.spec[1] == "fsdp"
  expected = reference.reference_logits(torch_model, tokens, mask, positions)
  got, _ = _forward(sharded, jnp.asarray(tokens), jnp.asarray(mask))
  diff = np.abs(np.asarray(got) - expected)[real(mask)].max()
  assert diff <= MAX_ABS
  np.testing.assert_array_equal(
      greedy(sharded, tokens, mask, 8), reference.reference_greedy(torch_model, tokens, mask, 8)
  )


@pytest.mark.parametrize("case", ["llama3", "qwen3", "gemma3"])
def test_sharded_checkpoint_in_hub_spelling(tmp_path, case):
  torch_model = reference.make_checkpoint(case, tmp_path, max_shard_size="100KB")
  reference.to_hub_spelling(tmp_path)
  assert (tmp_path / "model.safetensors.index.json").exists()
  tokens, mask, positions = reference.left_padded_batch(seed=4)
  expected = reference.reference_logits(torch_model, tokens, mask, positions)
  model = load_folder(tmp_path, one_device_mesh())
  logits, _ = _forward(model, jnp.asarray(tokens), jnp.asarray(mask))
  assert np.abs(np.asarray(logits) - expected)[real(mask)].max() <= MAX_ABS
