"""The loader's host memory stays bounded: loading a >= 1 GB checkpoint grows peak RSS
by the weights themselves (on CPU the "device" arrays live in host memory) plus well
under a quarter of the checkpoint, never by a second copy of the model; loaded in blocks
(as accelerators load large tensors), the anonymous memory beyond the weights stays
within a few blocks, far under the tensors' size."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow
REPO = pathlib.Path(__file__).resolve().parents[2]
MAX_OVERHEAD_FRACTION = 0.25
BLOCK_MB = 4
# Two read threads on a 2-core machine, each holding at most two blocks, plus what
# compiling the block writes and the runtime take (about 20 MB here).
MAX_BLOCKED_OVERHEAD_BYTES = 16 * BLOCK_MB << 20


def load_report(folder: pathlib.Path, *flags: str) -> dict:
  result = subprocess.run(
      [sys.executable, str(REPO / "benchmarks" / "load.py"), "--dir", str(folder),
       "--libraries", "tunix_zoo", *flags],
      capture_output=True, text=True, timeout=900, cwd=REPO,
  )
  assert result.returncode == 0, result.stderr
  return json.loads(result.stdout[result.stdout.index("{"):])["tunix_zoo"]


def test_peak_rss_while_loading_qwen3_0p6b(tmp_path):
  load = load_report(tmp_path / "ckpt", "--model", "qwen3_0p6b")
  assert load["bytes"] >= 1_000_000_000
  assert load["rss_overhead_bytes"] < MAX_OVERHEAD_FRACTION * load["bytes"], load


def test_loading_in_blocks_holds_a_few_blocks_beyond_the_weights(tmp_path):
  # Embedding and LM head of 128 MB each (float32: XLA:CPU writes bf16 blocks through
  # f32, a pass over the whole array per block), 32 blocks each.
  load = load_report(tmp_path / "ckpt", "--model", "qwen3_0p6b", "--dtype", "float32",
                     "--set", "num_layers=1", "--set", "vocab_size=32768",
                     "--set", "intermediate_size=1024", "--set", "tie_word_embeddings=false",
                     "--block-mb", str(BLOCK_MB))
  assert (load["block_bytes"], load["blocks_on_cpu"]) == (BLOCK_MB << 20, True)
  assert load["bytes"] >= 2 * 128 << 20
  assert 0 < load["anonymous_overhead_bytes"] < MAX_BLOCKED_OVERHEAD_BYTES, load
