"""A checkpoint folder already on disk.

Example::

    folder = fetch("/data/checkpoints/qwen3-0.6b")  # holds config.json + *.safetensors
"""

from __future__ import annotations

import os
import pathlib

from tunix_zoo.sources import _download

SOURCE = "local"


def fetch(path: str | os.PathLike[str]) -> pathlib.Path:
  """Returns ``path`` resolved, after checking it holds config.json and safetensors.

  Args:
    path: a folder on local disk (``~`` is expanded).

  Returns:
    The absolute folder.

  Raises:
    SourceError: the folder is missing, is a file, or holds no loadable checkpoint.
  """
  ref = os.fspath(path)
  folder = pathlib.Path(ref).expanduser()
  if not folder.exists():
    raise _download.source_error(
        SOURCE, ref, "the folder does not exist.",
        "Pass an existing folder holding config.json and *.safetensors as model_path, or "
        "use source=ModelSource.HUGGINGFACE to download a Hub repo id.")
  if not folder.is_dir():
    raise _download.source_error(
        SOURCE, ref, "this is a file, not a folder.",
        "Pass the folder that holds config.json and the *.safetensors files.")
  return _download.check_folder(folder.resolve(), source=SOURCE, ref=ref)
