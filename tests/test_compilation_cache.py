"""The persistent compilation cache: where it goes, when it stays off, and that a second
``tunix-zoo run`` compiles nothing new."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess

import jax
import pytest

from tunix_zoo import compilation_cache

SETTINGS = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
            "jax_persistent_cache_min_entry_size_bytes")


@pytest.fixture(autouse=True)
def restore_jax_settings(monkeypatch):
  saved = {name: getattr(jax.config, name) for name in SETTINGS}
  monkeypatch.delenv(compilation_cache.ENV_VAR, raising=False)
  yield
  for name, value in saved.items():
    jax.config.update(name, value)


def test_default_folder_is_under_the_tunix_zoo_cache(tmp_path, monkeypatch):
  monkeypatch.setenv("TUNIX_ZOO_CACHE", str(tmp_path))
  jax.config.update("jax_compilation_cache_dir", None)
  folder = compilation_cache.enable()
  assert folder == tmp_path / "jax_compilation" and folder.is_dir()
  assert jax.config.jax_compilation_cache_dir == str(folder)
  assert jax.config.jax_persistent_cache_min_compile_time_secs == 0.0


def test_argument_and_environment_choose_the_folder(tmp_path, monkeypatch):
  jax.config.update("jax_compilation_cache_dir", None)
  monkeypatch.setenv(compilation_cache.ENV_VAR, str(tmp_path / "from_env"))
  assert compilation_cache.enable() == tmp_path / "from_env"
  assert compilation_cache.enable(tmp_path / "given") == tmp_path / "given"
  assert jax.config.jax_compilation_cache_dir == str(tmp_path / "given")


def test_a_folder_the_user_gave_jax_is_kept(tmp_path):
  jax.config.update("jax_compilation_cache_dir", str(tmp_path / "users"))
  assert compilation_cache.enable() == tmp_path / "users"
  assert jax.config.jax_compilation_cache_dir == str(tmp_path / "users")


def test_off_leaves_jax_alone(monkeypatch):
  jax.config.update("jax_compilation_cache_dir", None)
  monkeypatch.setenv(compilation_cache.ENV_VAR, "off")
  assert compilation_cache.enable() is None
  assert jax.config.jax_compilation_cache_dir is None


def test_a_folder_that_cannot_be_made_turns_the_cache_off_with_a_warning(tmp_path, caplog):
  jax.config.update("jax_compilation_cache_dir", None)
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  with caplog.at_level("WARNING", logger="tunix_zoo.compilation_cache"):
    assert compilation_cache.enable(blocker / "cache") is None
  assert "compilation cache off" in caplog.text
  assert jax.config.jax_compilation_cache_dir is None


@pytest.mark.slow
def test_second_cli_run_compiles_nothing_new(tmp_path, demo_folder):
  shutil.copytree(demo_folder, tmp_path / demo_folder.name)
  executable = shutil.which("tunix-zoo")
  assert executable, "the console script is installed by `pip install -e .`"
  env = {**os.environ, "TUNIX_ZOO_CACHE": str(tmp_path), "TUNIX_ZOO_QUIET": "1"}
  env.pop(compilation_cache.ENV_VAR, None)
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  folder = pathlib.Path(tmp_path) / "jax_compilation"

  def run() -> set[str]:
    result = subprocess.run([executable, "run", "tiny-demo", "--max-new-tokens", "8"],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return set(os.listdir(folder))

  first = run()
  assert first, "the first run wrote compiled programs to the cache"
  assert run() == first
