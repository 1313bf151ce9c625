"""The loader's transfer window: host bytes in flight stay under its limit, the oldest
transfers are waited for first, and a model loads the same under any limit."""

from __future__ import annotations

import concurrent.futures

import jax
import jax.numpy as jnp
import numpy as np

from tests import reference
from tests.reference import MAX_ABS
from tunix_zoo.automodel import AutoModel
from tunix_zoo.checkpoint import loader
from tunix_zoo.checkpoint.loader import TransferWindow



class Transfer:
  """Stands in for a jax.Array: records when it is waited for."""

  def __init__(self, name, waited):
    self.name, self._waited = name, waited

  def block_until_ready(self):
    self._waited.append(self.name)
    return self


def test_oldest_transfers_are_waited_for_until_the_rest_fit():
  waited = []
  window = TransferWindow(limit=100)
  window.add(Transfer("a", waited), 60)
  assert (waited, window.bytes_in_flight) == ([], 60)
  window.add(Transfer("b", waited), 30)
  assert (waited, window.bytes_in_flight) == ([], 90)
  window.add(Transfer("c", waited), 50)  # 140 > 100: wait for "a".
  assert (waited, window.bytes_in_flight) == (["a"], 80)
  window.add(Transfer("d", waited), 90)  # 170: "b", then "c".
  assert (waited, window.bytes_in_flight) == (["a", "b", "c"], 90)


def test_a_transfer_larger_than_the_limit_is_not_waited_for_by_its_own_add():
  waited = []
  window = TransferWindow(limit=10)
  window.add(Transfer("big", waited), 1000)
  assert (waited, window.bytes_in_flight) == ([], 1000)
  window.add(Transfer("small", waited), 1)
  assert (waited, window.bytes_in_flight) == (["big"], 1)


def test_threads_adding_real_arrays_end_within_the_limit():
  window = TransferWindow(limit=4096)

  def add_many(seed):
    for n in range(40):
      array = jax.device_put(np.full((256,), seed * 100 + n, np.float32))
      window.add(array, array.nbytes)

  with concurrent.futures.ThreadPoolExecutor(8) as pool:
    list(pool.map(add_many, range(8)))
  assert 0 < window.bytes_in_flight <= 4096


def test_model_loads_the_same_when_every_transfer_is_waited_for(tmp_path, monkeypatch):
  torch_model = reference.make_checkpoint("qwen3", tmp_path)
  tokens, mask, positions = reference.left_padded_batch()
  expected = reference.reference_logits(torch_model, tokens, mask, positions)
  monkeypatch.setattr(loader, "MAX_BYTES_IN_FLIGHT", 1)
  mesh = jax.make_mesh((1, 1), ("fsdp", "tp"), devices=jax.devices()[:1])
  model, _ = AutoModel.from_pretrained(str(tmp_path), mesh)
  logits, _ = model(jnp.asarray(tokens), attention_mask=jnp.asarray(mask))
  assert np.abs(np.asarray(logits) - expected)[mask.astype(bool)].max() <= MAX_ABS
