"""Every script in examples/ runs as documented (on the offline tiny-demo)."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow
EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


def run_example(name, *args, tmp_path):
  # os.environ carries tests/conftest.py's XLA flags (8 devices, fast compiles) and
  # compilation cache to the scripts.
  env = {**os.environ, "TUNIX_ZOO_CACHE": str(tmp_path / "cache"), "TUNIX_ZOO_QUIET": "1"}
  result = subprocess.run([sys.executable, str(EXAMPLES / name), *args], env=env,
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr
  return result.stdout


def test_examples(tmp_path, demo_folder):
  shutil.copytree(demo_folder, tmp_path / "cache" / demo_folder.name)
  out = run_example("load_and_generate.py", tmp_path=tmp_path)
  assert out.startswith("JAX is a Python library")
  out = run_example("load_on_mesh.py", tmp_path=tmp_path)
  assert "P('tp', 'fsdp')" in out
  assert float(out.strip().splitlines()[-1].split()[-1]) < 1e-4
  out = run_example("export.py", str(tmp_path / "exported"), tmp_path=tmp_path)
  assert "model.safetensors" in out and (tmp_path / "exported" / "config.json").exists()
  out = run_example("tunix_grpo.py", tmp_path=tmp_path)
  assert out.strip().splitlines()[-1].startswith("GRPO steps: 2")
