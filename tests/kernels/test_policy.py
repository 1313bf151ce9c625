"""The kernel policy: its settings are checked, set_kernel_policy reaches every layer
that dispatches, and a model compiles again for another policy."""

from __future__ import annotations

import jax.numpy as jnp
import pytest
from flax import nnx

from tests.reference import tiny_moe_config
from tunix_zoo.automodel import AutoModel
from tunix_zoo.errors import KernelError
from tunix_zoo.kernels import KernelPolicy, set_kernel_policy
from tunix_zoo.kernels.policy import SETTINGS
from tunix_zoo.layers.attention import Attention
from tunix_zoo.layers.moe import Experts


@pytest.mark.parametrize("field", sorted(SETTINGS))
def test_an_unknown_setting_is_refused_with_the_choices(field):
  with pytest.raises(KernelError, match=f"{field}='off'.*choose one of 'auto'"):
    KernelPolicy(**{field: "off"})
  assert getattr(KernelPolicy(), field) == "auto"


def test_set_kernel_policy_reaches_every_dispatching_layer_and_the_graph_definition():
  model = AutoModel.from_config(tiny_moe_config(), rngs=0)
  dispatching = [m for _, m in nnx.iter_modules(model) if isinstance(m, (Attention, Experts))]
  assert len(dispatching) == 2 * model.config.num_layers
  before, _ = nnx.split(model)
  policy = KernelPolicy(decode_attention="xla", moe="mosaic_gpu")
  assert set_kernel_policy(model, policy) is model
  assert all(layer.kernel_policy == policy for layer in dispatching)
  after, _ = nnx.split(model)
  assert before != after  # So jitted calls (and generate) compile again.
  # The layers read it at the next trace: a forced kernel this CPU cannot run refuses.
  with pytest.raises(KernelError, match="moe='mosaic_gpu'"):
    nnx.jit(lambda m, t: m(t))(model, jnp.arange(3, 15)[None])


def test_set_kernel_policy_wants_a_policy():
  with pytest.raises(KernelError, match="must be a KernelPolicy, not str"):
    set_kernel_policy(nnx.Module(), "xla")


def test_an_auto_fallback_on_a_gpu_is_logged_once_per_reason(monkeypatch, caplog):
  from tunix_zoo.kernels import policy

  monkeypatch.setattr(policy.jax, "default_backend", lambda: "gpu")
  message = "test kernel cannot run for %s; XLA serves."
  with caplog.at_level("WARNING", logger=policy.__name__):
    for _ in range(3):
      assert not policy.runs_kernel("moe", "auto", "a reason only this test gives",
                                    fallback=message)
    assert policy.runs_kernel("moe", "auto", None, fallback=message)
  logged = [r.getMessage() for r in caplog.records]
  assert logged == ["test kernel cannot run for a reason only this test gives; XLA serves."]
