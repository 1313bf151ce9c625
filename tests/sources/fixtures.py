"""Pytest fixtures serving a tiny checkpoint from real servers on 127.0.0.1.

``tests/conftest.py`` registers them once for every test folder (a session fixture
imported into two modules would start two Kaggle servers on its fixed port)::

    def test_load_from_hub(hf_hub):
      model, path = AutoModel.from_pretrained(hf_hub.REPO, mesh)

Each function-scoped fixture resets the server's faults and request log, and points the
client library (and any subprocess started by the test) at the server and at fresh
cache folders under ``tmp_path``.
"""

from __future__ import annotations

import os
import pathlib
from typing import Iterator

import pytest

from tests.sources import servers

# Read when gcsfs is imported: without it gcsfs probes each bucket over gRPC, which the
# emulator cannot answer, and every first call waits ~60 s.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

HF_REPO = "acme/tiny"
KAGGLE_HANDLE = "acme/tiny/transformers/tiny-it"
KAGGLE_VERSION = 2
GCS_BUCKET = "zoo-test"
GCS_PREFIX = "models/tiny"
GCS_URL = f"gs://{GCS_BUCKET}/{GCS_PREFIX}"


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
  """A tiny checkpoint folder (see :func:`servers.make_checkpoint`)."""
  return servers.make_checkpoint(tmp_path_factory.mktemp("checkpoint"))


@pytest.fixture(scope="session")
def hub_server() -> Iterator[servers.HubServer]:
  with servers.HubServer() as server:
    yield server


@pytest.fixture
def hf_hub(hub_server: servers.HubServer, checkpoint: pathlib.Path, tmp_path: pathlib.Path,
           monkeypatch: pytest.MonkeyPatch) -> servers.HubServer:
  """The Hub server serving ``checkpoint`` as ``acme/tiny``; huggingface_hub points at it.

  huggingface_hub reads its endpoint, cache and offline settings at import, so both the
  environment (for subprocesses) and its constants module (for this process) are set.
  """
  from huggingface_hub import constants  # pylint: disable=import-outside-toplevel
  hub_server.faults.reset()
  hub_server.repos.clear()
  hub_server.add_repo(HF_REPO, checkpoint)
  settings = {"HF_ENDPOINT": hub_server.url, "HF_HOME": str(tmp_path / "hf-home"),
              "HF_HUB_CACHE": str(tmp_path / "hf-cache"), "HF_HUB_DISABLE_XET": "1",
              "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_OFFLINE": "0"}
  for name, value in settings.items():
    monkeypatch.setenv(name, value)
  monkeypatch.delenv("HF_TOKEN", raising=False)
  monkeypatch.setattr(constants, "ENDPOINT", hub_server.url)
  monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                      hub_server.url + "/{repo_id}/resolve/{revision}/{filename}")
  monkeypatch.setattr(constants, "HF_HUB_CACHE", settings["HF_HUB_CACHE"])
  monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
  monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
  monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
  monkeypatch.setattr(constants, "AGENT_HARNESSES_PATH",
                      str(tmp_path / "hf-home" / ".agent_harnesses.json"))
  monkeypatch.setenv("TUNIX_ZOO_CACHE", str(tmp_path / "zoo-cache"))
  return hub_server


@pytest.fixture
def kaggle_server() -> Iterator[servers.KaggleServer]:
  # Per test, not per session: kagglesdk talks only to port 7777, so a server held for a
  # whole session would lock the other pytest-xdist worker out; held for one test (a
  # start costs milliseconds), the other waits at most that test (KaggleServer.BIND_WAIT_S).
  with servers.KaggleServer() as server:
    yield server


@pytest.fixture
def kaggle(kaggle_server: servers.KaggleServer, checkpoint: pathlib.Path,
           tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> servers.KaggleServer:
  """The Kaggle server serving ``checkpoint`` as version 2 of ``acme/tiny/transformers/tiny-it``."""
  kaggle_server.faults.reset()
  kaggle_server.models.clear()
  kaggle_server.add_model(KAGGLE_HANDLE, KAGGLE_VERSION, checkpoint)
  monkeypatch.setenv("KAGGLE_API_ENVIRONMENT", "TEST")
  monkeypatch.setenv("KAGGLEHUB_CACHE", str(tmp_path / "kagglehub"))
  monkeypatch.setenv("TUNIX_ZOO_CACHE", str(tmp_path / "zoo-cache"))
  # No credentials from the developer's machine reach the test server.
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  for name in ("KAGGLE_API_TOKEN", "KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_CONFIG_DIR"):
    monkeypatch.delenv(name, raising=False)
  return kaggle_server


@pytest.fixture(scope="session")
def gcs_emulator() -> Iterator[int]:
  """The port of a ``gcp-storage-emulator`` started on 127.0.0.1 for the session."""
  port = servers.free_port()
  proc = servers.start_gcs_emulator(port)
  try:
    yield port
  finally:
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(scope="session")
def gcs_proxy(gcs_emulator: int, checkpoint: pathlib.Path) -> Iterator[servers.GcsProxy]:
  """The fault-injecting proxy; ``checkpoint`` is uploaded under GCS_URL."""
  with servers.GcsProxy(gcs_emulator) as proxy:
    upload_to_gcs(proxy, checkpoint, GCS_PREFIX)
    yield proxy


def upload_to_gcs(proxy: servers.GcsProxy, folder: pathlib.Path, prefix: str) -> str:
  """Copies ``folder`` to ``gs://zoo-test/<prefix>/`` (to the emulator, not the proxy)."""
  import gcsfs  # pylint: disable=import-outside-toplevel
  fs = gcsfs.GCSFileSystem(token="anon",
                           endpoint_url=f"http://{servers.LOCALHOST}:{proxy.upstream_port}",
                           skip_instance_cache=True, use_listings_cache=False)
  if not fs.exists(GCS_BUCKET):
    fs.mkdir(GCS_BUCKET)
  for path in sorted(folder.rglob("*")):
    if path.is_file():
      fs.pipe(f"{GCS_BUCKET}/{prefix}/{path.relative_to(folder).as_posix()}", path.read_bytes())
  return f"gs://{GCS_BUCKET}/{prefix}"


@pytest.fixture
def gcs(gcs_proxy: servers.GcsProxy, tmp_path: pathlib.Path,
        monkeypatch: pytest.MonkeyPatch) -> servers.GcsProxy:
  """The proxy in front of the emulator; gcsfs points at it; pass ``token="anon"``."""
  gcs_proxy.faults.reset()
  monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_proxy.url)
  monkeypatch.setenv("TUNIX_ZOO_CACHE", str(tmp_path / "zoo-cache"))
  return gcs_proxy
