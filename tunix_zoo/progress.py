"""Progress bars for downloads and loading, silent under ``TUNIX_ZOO_QUIET=1``.

Example::

    with progress_class()(total=nbytes, unit="B", unit_scale=True, desc="load") as bar:
        bar.update(chunk)
"""

from __future__ import annotations

import os
from typing import Any

import tqdm.auto


def quiet() -> bool:
  """Whether progress bars are off (``TUNIX_ZOO_QUIET=1``)."""
  return os.environ.get("TUNIX_ZOO_QUIET", "").strip().lower() in ("1", "true", "yes", "on")


class _SilentTqdm(tqdm.auto.tqdm):
  """A tqdm that never draws: handed to libraries that accept a progress-bar class."""

  def __init__(self, *args: Any, **kwargs: Any) -> None:
    kwargs["disable"] = True
    super().__init__(*args, **kwargs)


def progress_class() -> type[tqdm.auto.tqdm]:
  """The tqdm class to draw download progress with, silent under ``TUNIX_ZOO_QUIET=1``."""
  return _SilentTqdm if quiet() else tqdm.auto.tqdm
