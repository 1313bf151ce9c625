"""The loader's host memory stays bounded: loading a >= 1 GB checkpoint grows peak RSS
by the weights themselves (on CPU the "device" arrays live in host memory) plus well
under a quarter of the checkpoint, never by a second copy of the model."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow
REPO = pathlib.Path(__file__).resolve().parents[2]
MAX_OVERHEAD_FRACTION = 0.25


def test_peak_rss_while_loading_qwen3_0p6b(tmp_path):
  result = subprocess.run(
      [sys.executable, str(REPO / "benchmarks" / "load.py"), "--model", "qwen3_0p6b",
       "--dir", str(tmp_path / "ckpt"), "--libraries", "tunix_zoo"],
      capture_output=True, text=True, timeout=900, cwd=REPO,
  )
  assert result.returncode == 0, result.stderr
  report = json.loads(result.stdout[result.stdout.index("{"):])
  load = report["tunix_zoo"]
  assert load["bytes"] >= 1_000_000_000
  assert load["rss_overhead_bytes"] < MAX_OVERHEAD_FRACTION * load["bytes"], load
