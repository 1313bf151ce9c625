"""Test-wide set-up: 8 CPU devices for mesh tests, float32 matmuls."""

import os
import tempfile

import pytest

# Must precede the first jax import anywhere in the test session (subprocesses inherit
# it). 8 CPU devices for mesh tests. The test models are tiny, so compiling dominates the
# suite: LLVM's optimisation passes and XLA:CPU's MLIR fusion emitters cost over half of
# it and buy nothing at these sizes (the MoE tests: 128 s -> 81 s of CPU; float32 results
# match within the tests' tolerances). Large arrays run slower unoptimised (a 168M-value
# random init 7 s -> 38 s), so the few tests that need them avoid it (``demo_folder``).
_TEST_XLA_FLAGS = ("--xla_force_host_platform_device_count=8",
                   "--xla_backend_optimization_level=0",
                   "--xla_llvm_disable_expensive_passes=true",
                   "--xla_cpu_use_fusion_emitters=false")
_user_flags = os.environ.get("XLA_FLAGS", "")
os.environ["XLA_FLAGS"] = " ".join(
    [_user_flags] + [f for f in _TEST_XLA_FLAGS if f.split("=")[0] not in _user_flags]).strip()
os.environ.setdefault("TUNIX_ZOO_QUIET", "1")
# One OpenMP thread for PyTorch (the transformers references): its spinning worker threads
# on a busy 2-core machine cost ~13x the CPU time of one thread on these tiny models.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# One persistent compilation cache for the test run, outside the user's own cache: the
# pytest processes (pytest-xdist's workers share one folder, named by the run's id) and
# the CLI / example subprocesses they start all read and fill it, so a program one of
# them compiled is not compiled again by another.
_xdist_run = os.environ.get("PYTEST_XDIST_TESTRUNUID")
os.environ.setdefault(
    "TUNIX_ZOO_COMPILATION_CACHE",
    os.path.join(tempfile.gettempdir(), f"tunix_zoo_test_jax_cache_{_xdist_run}")
    if _xdist_run else tempfile.mkdtemp(prefix="tunix_zoo_test_jax_cache_"))

import jax  # noqa: E402

from tunix_zoo import compilation_cache  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
# On from the start, not from the first train() on: tunix_zoo jits a fresh initialiser
# per model build, and a second build of the same config then reads it (8 s -> 0.2 s).
compilation_cache.enable()

# The real-server fixtures, registered once for every folder: a session fixture imported
# into two test modules would start two Kaggle servers on its one fixed port.
from tests.sources.fixtures import (  # noqa: E402,F401  (fixtures are found by name)
    checkpoint, gcs, gcs_emulator, gcs_proxy, hf_hub, hub_server, kaggle, kaggle_server)

@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's, which reads the groups
def pytest_collection_modifyitems(items):
  # kagglesdk only talks to a fixed port (tests/sources/servers.py): with pytest-xdist
  # (`--dist loadgroup`) every test that starts the Kaggle server runs in one worker.
  for item in items:
    if "kaggle_server" in getattr(item, "fixturenames", ()):
      item.add_marker(pytest.mark.xdist_group("kaggle_port"))


@pytest.fixture(scope="session")
def reference_checkpoints(tmp_path_factory):
  """case -> (folder, transformers model) of :data:`tests.reference.CASES`, made once per
  session on first use. Read-only: copy a folder before changing it."""
  from tests import reference

  return reference.Checkpoints(tmp_path_factory)


@pytest.fixture(scope="session")
def reference_models(reference_checkpoints):
  """case -> our model of :func:`reference_checkpoints`' folder on one device, loaded once
  per session on first use. Read-only: tests must not change it."""
  from tests import reference
  from tunix_zoo.automodel import load_folder

  made = {}

  def model(case):
    if case not in made:
      made[case] = load_folder(reference_checkpoints[case][0], reference.one_device_mesh())
    return made[case]

  return model


@pytest.fixture(scope="session")
def moe_checkpoints(tmp_path_factory):
  """case -> (folder, transformers model) of :data:`tests.moe_reference.CASES`, made once
  per session on first use. Read-only: copy a folder before changing it."""
  from tests import moe_reference

  return moe_reference.Checkpoints(tmp_path_factory)


@pytest.fixture(scope="session")
def demo_folder(tmp_path_factory):
  """The tiny-demo checkpoint folder, trained once per session (training it is most of a
  first ``tunix-zoo run tiny-demo``). Read-only: tests copy it into the
  ``$TUNIX_ZOO_CACHE`` folder they give a subprocess, as ``tiny-demo``."""
  import fcntl
  import subprocess
  import sys

  from tunix_zoo.demo import DEMO_ID

  # pytest-xdist's workers share their temporary folders' parent: the first to get here
  # trains the model, the other waits for it rather than training a second copy.
  root = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    root = root.parent
  folder = root / "demo" / DEMO_ID
  folder.parent.mkdir(exist_ok=True)
  with open(root / "demo.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not folder.exists():  # build_demo_checkpoint writes it atomically
      # Running its 300 steps, not compiling them, dominates: at XLA's default optimisation
      # level, in a process of its own, it takes a quarter less time than at the suite's.
      fast_compile = _TEST_XLA_FLAGS[1:]
      flags = " ".join(f for f in os.environ["XLA_FLAGS"].split() if f not in fast_compile)
      subprocess.run(
          [sys.executable, "-c", "import pathlib, sys; from tunix_zoo.demo import "
           "build_demo_checkpoint; build_demo_checkpoint(pathlib.Path(sys.argv[1]))",
           str(folder)],
          env={**os.environ, "XLA_FLAGS": flags}, check=True, timeout=600)
  return folder
