"""Each library of a benchmark in its own process, so its device memory is its own, and
the merged report as one short JSON line."""

from __future__ import annotations

import json
import subprocess
import sys


def run_isolated(script: str, library: str, argv: list[str]) -> dict:
  """``script argv --library library`` in a new process: the JSON its last stdout line
  holds, or ``{"error": ...}`` with the last error line of its stderr."""
  done = subprocess.run([sys.executable, script, *argv, "--library", library],
                        capture_output=True, text=True)
  lines = done.stdout.strip().splitlines()
  if done.returncode != 0 or not lines:
    stderr = [line for line in done.stderr.strip().splitlines() if line.strip()]
    # The exception's line, not a warning printed after it.
    errors = [line for line in stderr if "Error" in line or "Exception" in line] or stderr
    return {"error": (errors[-1] if errors else f"exit {done.returncode}")[-300:]}
  return json.loads(lines[-1])



def run_each(script: str, libraries: str, model: str, argv: list[str]) -> dict:
  """``library -> result`` for the comma-separated ``libraries``, each from its own
  process; google_tunix is skipped, with a reason, for models other than Qwen3."""
  report = {}
  for library in libraries.split(","):
    if library == "google_tunix" and not model.startswith("qwen3_"):
      report[library] = {"skipped": "Tunix's own model here is Qwen3 only"}
      continue
    report[library] = run_isolated(script, library, argv)
  return report

def rounded(tree):
  """Floats to 4 significant digits."""
  if isinstance(tree, dict):
    return {k: rounded(v) for k, v in tree.items()}
  if isinstance(tree, list):
    return [rounded(v) for v in tree]
  return float(f"{tree:.4g}") if isinstance(tree, float) else tree


def compact(report: dict) -> str:
  """``report`` as one JSON line, floats rounded."""
  return json.dumps(rounded(report), separators=(",", ":"))
