"""``push_to_hub`` of save_pretrained, save_lora_adapter and ``tunix-zoo export``, through
huggingface_hub's real upload path (create_repo, preupload, LFS batch + PUT, commit) to
the local Hub server with Xet off; every push is downloaded back and compared byte for
byte."""

from __future__ import annotations

import pathlib

import huggingface_hub
import pytest

from tests.sources import servers
from tests.reference import one_device_mesh
from tunix_zoo import cli
from tunix_zoo.automodel import load_folder
from tunix_zoo.checkpoint.export import save_pretrained
from tunix_zoo.errors import ExportError, SourceError
from tunix_zoo.lora import apply_lora, save_lora_adapter
from tunix_zoo.sources import fetch

WRITE_TOKEN = "hf_write_token"
pytestmark = pytest.mark.servers


@pytest.fixture
def hub(hf_hub):
  """The Hub server with empty upload state; writes need WRITE_TOKEN."""
  hf_hub.lfs_objects.clear()
  hf_hub.commits.clear()
  hf_hub.created.clear()
  hf_hub.write_token = WRITE_TOKEN
  yield hf_hub
  hf_hub.write_token = None


@pytest.fixture
def model(checkpoint):
  return load_folder(checkpoint, one_device_mesh())


def files_of(folder: pathlib.Path) -> dict[str, bytes]:
  """Every file but huggingface_hub's hidden ``.cache`` bookkeeping of a ``local_dir``."""
  return {p.relative_to(folder).as_posix(): p.read_bytes()
          for p in folder.rglob("*") if p.is_file()
          and not p.relative_to(folder).as_posix().startswith(".cache/")}


def test_push_a_model_and_download_it_back(hub, model, checkpoint, tmp_path):
  out = save_pretrained(model, tmp_path / "out", source_dir=checkpoint, push_to_hub=True,
                        repo_id="acme/pushed", token=WRITE_TOKEN, private=True)
  written = files_of(out)
  assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(written)
  assert hub.created == {"acme/pushed": {"private": True}}
  assert [(repo, summary) for repo, _, summary in hub.commits] == [
      ("acme/pushed", "Upload out with tunix_zoo")]
  # The weights went through LFS; the JSON files inside the commit itself.
  lfs = set(hub.lfs_objects.values())
  assert written["model.safetensors"] in lfs and written["config.json"] not in lfs

  with pytest.raises(SourceError, match=r"refused access \(HTTP 401\)"):
    fetch("acme/pushed")  # private: not readable without the token
  back = fetch("acme/pushed", token=WRITE_TOKEN, model_download_path=tmp_path / "back")
  assert files_of(back) == written
  reloaded = load_folder(back, one_device_mesh())
  assert reloaded.config == model.config


def test_push_a_lora_adapter_and_download_it_back(hub, model, tmp_path):
  apply_lora(model, rank=2, alpha=4.0, rngs=1)
  out = save_lora_adapter(model, tmp_path / "adapter", base_model_name_or_path="acme/tiny",
                          push_to_hub=True, repo_id="acme/tiny-lora", token=WRITE_TOKEN)
  back = huggingface_hub.snapshot_download("acme/tiny-lora", local_dir=tmp_path / "back",
                                           token=WRITE_TOKEN)
  assert files_of(pathlib.Path(back)) == files_of(out)
  assert sorted(files_of(out)) == ["adapter_config.json", "adapter_model.safetensors"]
  assert hub.created == {"acme/tiny-lora": {"private": False}}


def test_a_failed_upload_leaves_no_partial_commit(hub, model, tmp_path):
  save_pretrained(model, tmp_path / "v1", push_to_hub=True, repo_id="acme/pushed",
                  token=WRITE_TOKEN)
  before = dict(hub.repos["acme/pushed"].files), hub.repos["acme/pushed"].sha
  # Other weights: a new safetensors file to upload.
  retrained = load_folder(servers.make_checkpoint(tmp_path / "retrained", seed=5),
                          one_device_mesh())

  hub.faults.reset()
  hub.faults.status(403, match="/lfs-upload/", method="PUT")
  with pytest.raises(ExportError, match="HTTP 403.*no partial one") as caught:
    save_pretrained(retrained, tmp_path / "v2", push_to_hub=True, repo_id="acme/pushed",
                    token=WRITE_TOKEN, commit_message="v2")
  assert "acme/pushed" in str(caught.value) and str(tmp_path / "v2") in str(caught.value)
  assert (tmp_path / "v2" / "model.safetensors").is_file()  # the local folder is complete
  assert hub.faults.count("/lfs-upload/", "PUT") == 1
  assert hub.faults.count("/commit/") == 0
  assert (dict(hub.repos["acme/pushed"].files), hub.repos["acme/pushed"].sha) == before

  hub.faults.status(500, match="/commit/", method="POST")
  with pytest.raises(ExportError, match="HTTP 500"):
    save_pretrained(retrained, tmp_path / "v2", overwrite=True, push_to_hub=True,
                    repo_id="acme/pushed", token=WRITE_TOKEN)
  assert hub.repos["acme/pushed"].sha == before[1]
  assert len(hub.commits) == 1

  # Once the Hub answers again, the same push lands whole.
  save_pretrained(retrained, tmp_path / "v2", overwrite=True, push_to_hub=True,
                  repo_id="acme/pushed", token=WRITE_TOKEN)
  back = fetch("acme/pushed", model_download_path=tmp_path / "back")
  assert files_of(back) == files_of(tmp_path / "v2")


def test_refused_token_and_bad_arguments(hub, model, tmp_path):
  with pytest.raises(ExportError, match="HTTP 401.*token"):
    save_pretrained(model, tmp_path / "a", push_to_hub=True, repo_id="acme/x", token="wrong")
  assert "acme/x" not in hub.repos
  with pytest.raises(ExportError, match="repo_id apply to an upload"):
    save_pretrained(model, tmp_path / "b", repo_id="acme/x")
  with pytest.raises(SourceError, match="not a valid Hub repo id"):
    save_pretrained(model, tmp_path / "c", push_to_hub=True, repo_id="../etc")
  assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


def test_cli_export_push_to_hub(hub, checkpoint, tmp_path, monkeypatch, capsys):
  monkeypatch.setenv("HF_TOKEN", WRITE_TOKEN)
  out = tmp_path / "out"
  assert cli.main(["export", str(checkpoint), str(out), "--mesh", "1x1", "--push-to-hub",
                   "acme/from-cli", "--private"]) == 0
  assert capsys.readouterr().out.strip() == str(out)
  assert hub.created == {"acme/from-cli": {"private": True}}
  back = fetch("acme/from-cli", model_download_path=tmp_path / "back")
  assert files_of(back) == files_of(out)
