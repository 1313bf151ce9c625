"""generate() against transformers' generate, and its sampling against known distributions.

Greedy decoding must be token-identical to transformers for every family; sampling is
checked on a stand-in model whose logits are fixed, so the empirical distribution of
many draws can be compared with the probabilities the filters should leave.
"""

from __future__ import annotations

import math
import re

import hypothesis
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import strategies as st
from jax.sharding import AxisType

from tests import reference
from tests.reference import one_device_mesh
from tunix_zoo import generation
from tunix_zoo.automodel import load_folder
from tunix_zoo.errors import ArgumentError, GenerationError
from tunix_zoo.generation import filter_logits, generate

NEW_TOKENS = 32
CASES = sorted(reference.CASES)


def unpadded(tokens: np.ndarray, mask: np.ndarray) -> list[list[int]]:
  return [row[m.astype(bool)].tolist() for row, m in zip(tokens, mask)]


class FixedLogits(nnx.Module):
  """A stand-in model whose next-token logits are always ``logits``: sampling in isolation."""

  def __init__(self, logits):
    self.logits = nnx.Param(jnp.asarray(logits, jnp.float32))

  def init_cache(self, batch_size, max_len, dtype=None):
    return {"index": jnp.zeros((), jnp.int32)}

  def __call__(self, input_tokens, positions=None, cache=None, attention_mask=None,
               logits_to_keep=0):
    batch, length = input_tokens.shape
    kept = min(length, logits_to_keep or length)
    logits = jnp.broadcast_to(self.logits[...], (batch, kept, self.logits.shape[-1]))
    return logits, {"index": cache["index"] + length}


class CharTokenizer:
  """Printable ASCII to ids 3.. (below the tiny models' vocabulary of 131)."""

  eos_ids = (44,)

  def encode(self, text):
    return [ord(c) - 29 for c in text]

  def decode(self, ids):
    return "".join(chr(i + 29) for i in ids)


@pytest.mark.parametrize("case", CASES)
def test_greedy_matches_transformers(reference_checkpoints, reference_models, case):
  _, torch_model = reference_checkpoints[case]
  tokens, mask, _ = reference.left_padded_batch(seed=1)
  expected = reference.reference_greedy(torch_model, tokens, mask, NEW_TOKENS)
  out = generate(reference_models(case), unpadded(tokens, mask), NEW_TOKENS)
  np.testing.assert_array_equal(out.tokens, expected)
  np.testing.assert_array_equal(out.lengths, [NEW_TOKENS] * 3)


def test_eos_stops_each_row_as_transformers_does_and_ends_the_loop(reference_checkpoints,
                                                                   reference_models):
  _, torch_model = reference_checkpoints["qwen3"]
  tokens, mask, _ = reference.left_padded_batch(seed=1)
  unstopped = reference.reference_greedy(torch_model, tokens, mask, NEW_TOKENS)
  # Each row's first id that no row produced in its first 3 steps: every row stops, late
  # enough for the loop to run, and (for these prompts) at a different step.
  early = set(unstopped[:, :3].ravel())
  eos_ids = sorted({int(next(t for t in row if t not in early)) for row in unstopped})
  expected = reference.reference_greedy(
      torch_model, tokens, mask, NEW_TOKENS, pad_token_id=7, eos_token_id=eos_ids
  )
  lengths = [1 + next(i for i, t in enumerate(row) if t in eos_ids) for row in unstopped]
  assert len(set(lengths)) == 3 and max(lengths) < NEW_TOKENS

  received = []
  out = generate(
      reference_models("qwen3"), tokens, NEW_TOKENS, attention_mask=mask, eos_ids=eos_ids, pad_id=7,
      stream=lambda step, toks: received.append((step, toks)),
  )
  np.testing.assert_array_equal(out.tokens, expected)
  np.testing.assert_array_equal(out.lengths, lengths)
  # Every token reaches the stream, in order, until the last row stops.
  assert [step for step, _ in received] == list(range(max(lengths)))
  np.testing.assert_array_equal(
      np.stack([t for _, t in received], axis=1), expected[:, :max(lengths)]
  )


def test_the_configs_eos_is_the_default_as_in_transformers(reference_checkpoints):
  folder, torch_model = reference_checkpoints["qwen3"]
  tokens, mask, _ = reference.left_padded_batch(seed=1)
  unstopped = reference.reference_greedy(torch_model, tokens, mask, NEW_TOKENS)
  eos = int(unstopped[0, 5])
  model = load_folder(folder, one_device_mesh())
  model.config = model.config.replace(eos_token_id=eos)
  expected = reference.reference_greedy(torch_model, tokens, mask, NEW_TOKENS, eos_token_id=eos)
  out = generate(model, tokens, NEW_TOKENS, attention_mask=mask)
  np.testing.assert_array_equal(out.tokens, expected)
  assert out.lengths[0] <= 6
  # An empty list turns stopping off.
  never = generate(model, tokens, NEW_TOKENS, attention_mask=mask, eos_ids=[])
  np.testing.assert_array_equal(never.tokens, unstopped)


def test_second_call_reuses_compiled_programs_and_reports_timings(reference_models):
  tokens, mask, _ = reference.left_padded_batch(seed=1)
  first = generate(reference_models("llama3"), tokens, NEW_TOKENS, attention_mask=mask)
  other_tokens, _, _ = reference.left_padded_batch(seed=5)
  again = generate(reference_models("llama3"), other_tokens, NEW_TOKENS, attention_mask=mask)
  assert again.compile_seconds == 0.0
  assert not np.array_equal(first.tokens, again.tokens)
  for out in (first, again):
    assert out.prefill_seconds > 0 and out.decode_seconds > 0
    assert out.prefill_tokens_per_second == pytest.approx(mask.sum() / out.prefill_seconds)
    assert out.decode_tokens_per_second == pytest.approx(
        3 * (NEW_TOKENS - 1) / out.decode_seconds
    )


def test_seeded_sampling_is_reproducible_and_differs_across_seeds(reference_models):
  tokens, mask, _ = reference.left_padded_batch(seed=1)
  sample = lambda seed: generate(  # noqa: E731
      reference_models("gemma2"), tokens, NEW_TOKENS, attention_mask=mask, temperature=1.5,
      top_k=40, top_p=0.95, seed=seed,
  ).tokens
  np.testing.assert_array_equal(sample(0), sample(0))
  assert not np.array_equal(sample(0), sample(1))


def test_string_prompts_through_a_tokenizer(reference_models):
  tokenizer = CharTokenizer()
  # The padded shape of the greedy test, whose compiled programs this reuses.
  prompts = ["Hello there!", "Hi, you", "Hey"]
  eos = tokenizer.eos_ids[0]
  # The tokenizer's eos_ids.
  out = generate(reference_models("llama3"), prompts, NEW_TOKENS, tokenizer=tokenizer)
  by_ids = generate(
      reference_models("llama3"), [tokenizer.encode(p) for p in prompts], NEW_TOKENS, eos_ids=eos
  )
  np.testing.assert_array_equal(out.tokens, by_ids.tokens)
  assert out.lengths.min() < NEW_TOKENS  # The tokenizer's EOS id stopped a row.
  assert by_ids.text is None
  for row, text in enumerate(out.text):
    generated = out.tokens[row, :out.lengths[row]].tolist()
    assert text == tokenizer.decode([t for t in generated if t != eos])


@pytest.mark.parametrize("axis_type", [AxisType.Explicit, AxisType.Auto], ids=["explicit", "auto"])
def test_mesh_2x4_gives_the_one_device_tokens(reference_checkpoints, axis_type):
  """One-device generate() equals transformers (above), so the mesh is held to transformers."""
  folder, torch_model = reference_checkpoints["llama3_tied_mha"]
  tokens, mask, _ = reference.left_padded_batch(seed=3, batch=2)
  expected = reference.reference_greedy(torch_model, tokens, mask, 8)
  mesh = jax.make_mesh((2, 4), ("fsdp", "tp"), axis_types=(axis_type,) * 2)
  sharded = load_folder(folder, mesh)
  streamed = []
  out = generate(
      sharded, tokens, 8, attention_mask=mask, stream=lambda step, toks: streamed.append(toks)
  )
  np.testing.assert_array_equal(out.tokens, expected)
  np.testing.assert_array_equal(np.stack(streamed, axis=1), expected)


@pytest.mark.parametrize("axis_type", [AxisType.Explicit, AxisType.Auto], ids=["explicit", "auto"])
def test_logits_to_keep_gives_the_last_positions_logits(reference_checkpoints, axis_type):
  """The same numbers as the whole forward's last positions (1e-6 max-abs: the same
  float32 products, possibly fused differently); 0 or more than the prompt keeps all."""
  folder, _ = reference_checkpoints["qwen3"]
  model = load_folder(folder, jax.make_mesh((2, 4), ("fsdp", "tp"), axis_types=(axis_type,) * 2))
  tokens, mask, _ = reference.left_padded_batch(seed=3, batch=2)
  full, _ = model(jnp.asarray(tokens), attention_mask=jnp.asarray(mask))
  for keep in (1, 3, 0, tokens.shape[1] + 5):
    kept, _ = model(jnp.asarray(tokens), attention_mask=jnp.asarray(mask), logits_to_keep=keep)
    want = full[:, -keep:] if keep else full
    assert kept.shape == want.shape
    np.testing.assert_allclose(np.asarray(kept), np.asarray(want), atol=1e-6, rtol=0)
  for bad in (-1, 1.5, True):
    with pytest.raises(ArgumentError, match="logits_to_keep"):
      model(jnp.asarray(tokens), logits_to_keep=bad)


def test_the_prefill_projects_only_the_last_position_onto_the_vocabulary(reference_models):
  """generate samples the first token from each row's last position: its compiled prefill
  has no product of every prompt position with the vocabulary (40 GB of logits for a
  256 x 512 Qwen3-8B rollout batch)."""
  model = reference_models("qwen3")
  vocab = model.config.vocab_size
  rows = [[3 + (i * 7 + j) % 50 for j in range(21)] for i in range(3)]
  generate(model, rows, 2)
  prefill = [v for k, v in generation._compiled.items() if k[0] == "_prefill"][-1]
  shapes = [tuple(map(int, m.group(1).split(",")))
            for m in re.finditer(r"\[([\d,]+)\]\{[\d,]*\} dot\(", prefill.as_text())]
  onto_vocabulary = [s for s in shapes if s[-1] == vocab]
  assert onto_vocabulary and all(math.prod(s) == len(rows) * vocab for s in onto_vocabulary), shapes


# -- filtering and sampling on known logits ---------------------------------------------

PROBS = np.array([0.1, 0.4, 0.05, 0.3, 0.15])  # by rank: 1, 3, 4, 0, 2


def kept(logits) -> set[int]:
  return set(np.flatnonzero(np.isfinite(np.asarray(logits))).tolist())


@pytest.mark.parametrize(
    "top_k, top_p, expected",
    [
        (None, None, {0, 1, 2, 3, 4}),
        (1, None, {1}),
        (3, None, {1, 3, 4}),
        (99, None, {0, 1, 2, 3, 4}),
        (None, 0.3, {1}),
        (None, 0.5, {1, 3}),
        (None, 0.8, {1, 3, 4}),
        (None, 1.0, {0, 1, 2, 3, 4}),
        # Top-p counts the probabilities top-k left, renormalised: 0.4 / 0.7 > 0.55.
        (2, 0.55, {1}),
        (3, 0.9, {1, 3, 4}),
    ],
)
def test_filter_logits_keeps_exactly(top_k, top_p, expected):
  logits = jnp.log(jnp.asarray(PROBS, jnp.float32))
  assert kept(filter_logits(logits, top_k, top_p)) == expected
  traced = jax.jit(filter_logits)(
      logits[None], None if top_k is None else jnp.int32(top_k),
      None if top_p is None else jnp.float32(top_p),
  )
  assert kept(traced[0]) == expected
  np.testing.assert_array_equal(
      np.asarray(filter_logits(logits, top_k, top_p))[list(expected)],
      np.asarray(logits)[list(expected)],
  )


def test_filter_logits_keeps_ties_and_at_least_one_token():
  assert kept(filter_logits(jnp.array([1.0, 3.0, 3.0, 0.0]), top_k=1)) == {1, 2}
  assert kept(filter_logits(jnp.array([0.0, 5.0, 1.0]), top_p=1e-9)) == {1}


@hypothesis.settings(max_examples=40, deadline=None)
@hypothesis.given(
    # One length: every new shape would compile the filter's operations again.
    probs=st.lists(st.floats(0.01, 1.0), min_size=8, max_size=8, unique=True),
    top_p=st.floats(0.05, 0.99),
)
def test_top_p_keeps_the_smallest_sufficient_set(probs, top_p):
  probs = np.asarray(probs) / np.sum(probs)
  # Distinct in float32 too: the filter keeps tied tokens together (see the test above).
  hypothesis.assume(len(set(probs.astype(np.float32).tolist())) == len(probs))
  order = np.argsort(-probs)
  mass_before = np.cumsum(probs[order]) - probs[order]
  hypothesis.assume(np.all(np.abs(mass_before - top_p) > 1e-4))  # float32 cannot decide ties
  expected = set(order[mass_before < top_p].tolist())
  assert kept(filter_logits(jnp.log(jnp.asarray(probs, jnp.float32)), top_p=top_p)) == expected


SAMPLED_ROWS, SAMPLED_STEPS = 2000, 10


def sample_fixed(**kwargs) -> np.ndarray:
  model = FixedLogits(np.log(PROBS))
  return generate(model, [[0]] * SAMPLED_ROWS, SAMPLED_STEPS, **kwargs).tokens


@pytest.mark.parametrize(
    "temperature, top_k, top_p, kept_ids",
    [(0.5, 3, None, [1, 3, 4]), (1.0, None, 0.8, [1, 3, 4]), (2.0, 4, 0.6, [1, 3])],
)
def test_samples_follow_the_renormalised_probabilities(temperature, top_k, top_p, kept_ids):
  tokens = sample_fixed(temperature=temperature, top_k=top_k, top_p=top_p, seed=3)
  expected = np.zeros_like(PROBS)
  expected[kept_ids] = PROBS[kept_ids] ** (1 / temperature)
  expected /= expected.sum()
  frequencies = np.bincount(tokens.ravel(), minlength=len(PROBS)) / tokens.size
  # 20000 draws: a standard error below 0.0036, so 0.02 is over five of them.
  np.testing.assert_allclose(frequencies, expected, atol=0.02)
  assert frequencies[expected == 0].sum() == 0


def test_top_k_one_samples_greedily():
  assert (sample_fixed(temperature=1.0, top_k=1) == np.argmax(PROBS)).all()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(tokens_or_prompts=["text"]), "no tokenizer"),
        (dict(tokens_or_prompts=[[3], []]), "empty"),
        (dict(tokens_or_prompts=[]), "no prompts"),
        (dict(tokens_or_prompts=np.ones((2, 3), int), attention_mask=[[1, 1, 0], [1, 1, 1]]),
         "left-padded"),
        (dict(tokens_or_prompts=np.ones((2, 3), int), attention_mask=np.ones((2, 4))), "shape"),
        (dict(tokens_or_prompts=[[3]], attention_mask=[[1]]), "attention_mask is only"),
        (dict(tokens_or_prompts=np.ones(3, int)), "batch, length"),
        (dict(tokens_or_prompts=[[3]], max_new_tokens=0), "max_new_tokens"),
        (dict(tokens_or_prompts=[[3]], temperature=-1.0), "temperature"),
        (dict(tokens_or_prompts=[[3]], top_k=0), "top_k"),
        (dict(tokens_or_prompts=[[3]], top_p=1.5), "top_p"),
    ],
)
def test_unusable_arguments_raise(kwargs, message):
  kwargs = {"max_new_tokens": 4, **kwargs}
  with pytest.raises(GenerationError, match=message):
    generate(FixedLogits(np.log(PROBS)), **kwargs)
