"""Worker subprocesses of the two-process tests (jax.distributed on CPU)."""

from __future__ import annotations

import contextlib
import pathlib
import subprocess
import time
from typing import Iterator

import pytest


def log_tails(logs: list[pathlib.Path]) -> str:
  return "\n".join(f"--- {log.name} ---\n{log.read_text()[-3000:]}" for log in logs)


@contextlib.contextmanager
def running_workers(logs: list[pathlib.Path],
                    timeout_s: float) -> Iterator[list[subprocess.Popen]]:
  """Yields a list for the started workers; on leaving, waits until every one has exited,
  kills any left, and fails the test if one exited non-zero or they ran past
  ``timeout_s``. A worker that fails leaves the other waiting in a collective, so the
  wait stops at the first failure rather than at the deadline."""
  workers: list[subprocess.Popen] = []
  try:
    yield workers
    deadline = time.monotonic() + timeout_s
    while any(w.poll() is None for w in workers) and not any(w.poll() for w in workers):
      if time.monotonic() > deadline:
        pytest.fail(f"workers ran past {timeout_s} s\n{log_tails(logs)}")
      time.sleep(0.2)
  finally:
    for worker in workers:
      if worker.poll() is None:
        worker.kill()
        worker.wait()
  codes = [worker.returncode for worker in workers]
  if any(codes):
    pytest.fail(f"workers exited with {codes}\n{log_tails(logs)}")
