"""Registers the server fixtures of :mod:`tests.sources.fixtures` for this folder."""

from tests.sources.fixtures import (  # noqa: F401  (fixtures are found by name)
    checkpoint, gcs, gcs_emulator, gcs_proxy, hf_hub, hub_server, kaggle, kaggle_server)
