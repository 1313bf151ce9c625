"""JAX's persistent compilation cache, on by default for the CLI and ``training.train``.

A process that starts again (a notebook kernel restart, the next RL run) then reads its
compiled programs from disk instead of compiling them again. The folder is, in order:
the ``cache_dir`` argument, ``$TUNIX_ZOO_COMPILATION_CACHE``, or ``jax_compilation`` in
tunix_zoo's cache folder (``$TUNIX_ZOO_CACHE``, else ``~/.cache/tunix_zoo``). Set
``TUNIX_ZOO_COMPILATION_CACHE=off`` to leave JAX's cache alone. A cache folder the user
already gave JAX (``JAX_COMPILATION_CACHE_DIR``) is kept.

In a notebook, before the first jitted call::

    from tunix_zoo import compilation_cache
    compilation_cache.enable()            # or enable("/mnt/shared/jax_cache")
"""

from __future__ import annotations

import logging
import os
import pathlib

ENV_VAR = "TUNIX_ZOO_COMPILATION_CACHE"
OFF_VALUES = ("off", "0", "false", "no", "none")

log = logging.getLogger(__name__)


def default_dir() -> pathlib.Path:
  """The cache folder used when none is given."""
  from tunix_zoo.sources import cache_root

  return cache_root() / "jax_compilation"


def enable(cache_dir: str | os.PathLike[str] | None = None) -> pathlib.Path | None:
  """Turns JAX's persistent compilation cache on; returns its folder (None when off).

  Example::

      compilation_cache.enable()  # ~/.cache/tunix_zoo/jax_compilation
  """
  import jax

  configured = jax.config.jax_compilation_cache_dir
  if cache_dir is None:
    if configured:
      return pathlib.Path(configured)
    setting = os.environ.get(ENV_VAR, "").strip()
    if setting.lower() in OFF_VALUES:
      return None
    cache_dir = setting or default_dir()
  folder = pathlib.Path(cache_dir).expanduser()
  try:
    folder.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    # A cache is an optimisation: a folder we cannot create must not stop the run.
    log.warning("compilation cache off: cannot create %s (%s); set %s to another folder",
                folder, e.strerror or e, ENV_VAR)
    return None
  jax.config.update("jax_compilation_cache_dir", str(folder))
  # Small programs too: a decode step compiles in well under JAX's default 1 s threshold,
  # and a restart pays for every one of them.
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return folder
