"""Test-wide set-up: 8 CPU devices for mesh tests, float32 matmuls."""

import os
import tempfile

import pytest

# Must precede the first jax import anywhere in the test session (subprocesses inherit
# it). 8 CPU devices for mesh tests. The test models are tiny, so compiling dominates the
# suite: LLVM's optimisation passes cost ~30% of its time and buy nothing at these sizes
# (numerics are XLA's either way; float32 results match within the tests' tolerances).
_TEST_XLA_FLAGS = ("--xla_force_host_platform_device_count=8",
                   "--xla_backend_optimization_level=0",
                   "--xla_llvm_disable_expensive_passes=true")
_user_flags = os.environ.get("XLA_FLAGS", "")
os.environ["XLA_FLAGS"] = " ".join(
    [_user_flags] + [f for f in _TEST_XLA_FLAGS if f.split("=")[0] not in _user_flags]).strip()
os.environ.setdefault("TUNIX_ZOO_QUIET", "1")
# PyTorch (the transformers references) on one thread: its OpenMP workers spin while they
# wait, so on 2 shared cores a 32-token generate() of a tiny model burnt 1-6 s of CPU
# instead of 0.15 s.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# One persistent compilation cache for the session and the CLI / example subprocesses it
# starts (training.train and the CLI turn it on), outside the user's own cache.
os.environ.setdefault("TUNIX_ZOO_COMPILATION_CACHE",
                      tempfile.mkdtemp(prefix="tunix_zoo_test_jax_cache_"))

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

# The real-server fixtures, registered once for every folder: a session fixture imported
# into two test modules would start two Kaggle servers on its one fixed port.
from tests.sources.fixtures import (  # noqa: E402,F401  (fixtures are found by name)
    checkpoint, gcs, gcs_emulator, gcs_proxy, hf_hub, hub_server, kaggle, kaggle_server)

@pytest.fixture(scope="session")
def reference_checkpoints(tmp_path_factory):
  """case -> (folder, transformers model) of :data:`tests.reference.CASES`, made once per
  session on first use. Read-only: copy a folder before changing it."""
  from tests import reference

  return reference.Checkpoints(tmp_path_factory)
