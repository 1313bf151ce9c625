"""Uploads a finished checkpoint or adapter folder to the Hugging Face Hub as one commit.

``save_pretrained(..., push_to_hub=True)`` and ``save_lora_adapter(..., push_to_hub=True)``
call :func:`push_folder` after the folder is complete on disk. It creates the repo when
missing (``create_repo(exist_ok=True)``) and sends every file in one
``upload_folder`` commit: the weights go up first (LFS), and the commit that makes them
visible comes last, so a failed upload leaves the repo as it was::

    url = push_folder("/ckpt/qwen3-sft", "acme/qwen3-sft", private=True)

``HF_ENDPOINT`` and ``HF_TOKEN`` are read at call time, as for downloads.
"""

from __future__ import annotations

import os
import pathlib

from tunix_zoo.errors import ExportError, http_status
from tunix_zoo.naming import validate_repo_id
from tunix_zoo.progress import quiet

__all__ = ["check_push_arguments", "push_folder"]


def check_push_arguments(push_to_hub: bool, repo_id: str | None, token: str | None,
                         private: bool | None) -> None:
  """Raises before anything is written when the upload arguments cannot be used.

  Raises:
    ExportError: ``repo_id``, ``token`` or ``private`` without ``push_to_hub``.
    SourceError: ``repo_id`` is not a valid Hub repo id.
  """
  given = [n for n, v in (("repo_id", repo_id), ("token", token), ("private", private))
           if v is not None]
  if given and not push_to_hub:
    raise ExportError(f"{', '.join(given)} apply to an upload; pass push_to_hub=True too, "
                      "or leave them out.")
  if push_to_hub and repo_id is not None:
    validate_repo_id(repo_id)


def push_folder(
    folder: str | os.PathLike[str],
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str | None = None,
    revision: str | None = None,
) -> str:
  """Commits every file of ``folder`` to the Hub model repo ``repo_id``; returns the
  commit URL.

  Args:
    folder: a complete checkpoint or adapter folder.
    repo_id: ``owner/name``; created (``private`` as given) if it does not exist.
    token: a Hub token with write access; None uses ``HF_TOKEN`` or the stored login.
    private: visibility of a repo created now; an existing repo keeps its own.
    commit_message: default ``"Upload <folder name> with tunix_zoo"``.
    revision: the branch to commit to (default the repo's main branch).

  Raises:
    SourceError: ``repo_id`` is not a valid Hub repo id.
    ExportError: the Hub refused or failed the upload; the folder stays on disk and the
      repo is unchanged.

  Example::

      push_folder(save_pretrained(model, "/ckpt/sft"), "acme/sft", private=True)
  """
  import huggingface_hub  # pylint: disable=import-outside-toplevel
  from huggingface_hub import constants  # pylint: disable=import-outside-toplevel
  from huggingface_hub import utils as hf_utils  # pylint: disable=import-outside-toplevel

  validate_repo_id(repo_id)
  folder = pathlib.Path(folder)
  endpoint = (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")
  api = huggingface_hub.HfApi(endpoint=endpoint, token=token)
  bars_were_on = not hf_utils.are_progress_bars_disabled()
  if quiet():
    hf_utils.disable_progress_bars()
  try:
    api.create_repo(repo_id, private=private, exist_ok=True)
    commit = api.upload_folder(
        repo_id=repo_id, folder_path=folder, revision=revision,
        commit_message=commit_message or f"Upload {folder.name} with tunix_zoo")
  except Exception as e:  # pylint: disable=broad-except
    raise _push_error(e, folder, repo_id, endpoint) from e
  finally:
    if bars_were_on:
      hf_utils.enable_progress_bars()
  return str(commit.commit_url)


def _push_error(exc: BaseException, folder: pathlib.Path, repo_id: str,
                endpoint: str) -> ExportError:
  status = http_status(exc)  # huggingface_hub wraps a failed LFS upload in a RuntimeError
  first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
  kept = (f"The Hub makes a commit only once every file has arrived, so the repo has no "
          f"partial one; the files are still in {folder}.")
  if status in (401, 403):
    fix = ("Pass token=... (or set HF_TOKEN / run `hf auth login`) with a token that can "
           f"write to {repo_id}.")
  else:
    fix = f"Retry; if it persists check {endpoint}/{repo_id} and HF_ENDPOINT."
  what = f"HTTP {status}" if status else type(exc).__name__
  return ExportError(f"Pushing {folder} to the Hub repo {repo_id} failed ({what}: "
                     f"{first_line}). {kept} {fix}")
