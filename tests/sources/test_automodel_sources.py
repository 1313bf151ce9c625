"""AutoModel.from_pretrained through every remote source, against real local servers:
the model that arrives equals the one loaded from the folder directly."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.sources.fixtures import GCS_URL, HF_REPO, KAGGLE_HANDLE, KAGGLE_VERSION
from tunix_zoo import AutoModel, ModelSource

pytestmark = pytest.mark.servers


def mesh():
  return jax.make_mesh((1, 1), ("fsdp", "tp"), devices=jax.devices()[:1])


def logits(model):
  tokens = jnp.array([[0, 0, 5, 6, 7], [1, 2, 3, 4, 5]])
  mask = jnp.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
  out, _ = model(tokens, attention_mask=mask)
  return np.asarray(out)


@pytest.fixture
def local_logits(checkpoint):
  model, _ = AutoModel.from_pretrained(str(checkpoint), mesh())
  return logits(model)


def test_huggingface_hub(hf_hub, local_logits, tmp_path):
  model, path = AutoModel.from_pretrained(HF_REPO, mesh())
  np.testing.assert_array_equal(logits(model), local_logits)
  assert "snapshots" in path
  into = tmp_path / "into"
  model, path = AutoModel.from_pretrained(HF_REPO, mesh(), model_download_path=str(into))
  assert path == str(into)
  np.testing.assert_array_equal(logits(model), local_logits)


def test_kaggle(kaggle, local_logits, tmp_path):
  model, _ = AutoModel.from_pretrained(
      "tiny-it", mesh(), model_source=ModelSource.KAGGLE,
      model_path=f"{KAGGLE_HANDLE}/{KAGGLE_VERSION}",
  )
  np.testing.assert_array_equal(logits(model), local_logits)


def test_gcs(gcs, local_logits, tmp_path):
  model, path = AutoModel.from_pretrained(
      "tiny", mesh(), model_source="gcs", model_path=GCS_URL, token="anon",
      model_download_path=str(tmp_path / "gcs"),
  )
  assert path == str(tmp_path / "gcs")
  np.testing.assert_array_equal(logits(model), local_logits)
