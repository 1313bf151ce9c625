"""The test harness itself: what the README's parallel test command relies on."""

from __future__ import annotations

import os

import pytest


@pytest.mark.xdist_group("harness_check")
def test_xdist_groups_reach_the_scheduler(request):
  """Under ``-n N --dist loadgroup`` a test's xdist_group must be in its node id (the
  scheduler keeps tests of one group in one worker by it): module fixtures shared through
  a group, and the Kaggle server's fixed port, depend on it."""
  if not os.environ.get("PYTEST_XDIST_WORKER") or not request.config.getvalue("loadgroup"):
    pytest.skip("runs under pytest-xdist's --dist loadgroup (the README's command)")
  assert request.node.nodeid.endswith("@harness_check"), request.node.nodeid
