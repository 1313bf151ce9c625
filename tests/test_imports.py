"""Imports follow the data path: naming -> registry -> config -> build -> checkpoint -> API.

A module may import only modules of its own layer or a lower one, at module level or
inside a function alike, so naming a model, listing families or reading a config.json
never pays for jax, and no layer reaches up.
"""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "tunix_zoo"

# Lowest first. Where several patterns match a module, the first wins.
LAYERS: list[tuple[str, ...]] = [
    ("tunix_zoo.errors", "tunix_zoo.progress"),
    ("tunix_zoo.registry",),
    ("tunix_zoo.naming",),
    ("tunix_zoo.config", "tunix_zoo.config_overrides"),
    ("tunix_zoo.models", "tunix_zoo.models.*.config"),  # family tables: no jax
    ("tunix_zoo.sharding", "tunix_zoo.arguments", "tunix_zoo.checkpoint.keymap", "tunix_zoo.models.decoder_params",
     "tunix_zoo.models.*.params"),
    ("tunix_zoo.kernels", "tunix_zoo.kernels.*"),  # below the model math that calls them
    ("tunix_zoo.layers.*", "tunix_zoo.models.*.model"),  # model math
    ("tunix_zoo.build",),
    ("tunix_zoo.checkpoint.reader",),  # below writer, which lays files out in its format
    ("tunix_zoo.checkpoint", "tunix_zoo.checkpoint.*"),
    ("tunix_zoo.sources", "tunix_zoo.sources.*", "tunix_zoo.tokenizer", "tunix_zoo.generation",
     "tunix_zoo.training", "tunix_zoo.lora", "tunix_zoo.planning",
     "tunix_zoo.compilation_cache", "tunix_zoo.cache"),
    ("tunix_zoo.automodel", "tunix_zoo.demo", "tunix_zoo.cli", "tunix_zoo"),
]
# Families whose identity registry and naming read: importing them must not import jax.
JAX_FREE = ("tunix_zoo.naming", "tunix_zoo.registry", "tunix_zoo.config", "tunix_zoo.models")


def layer_of(module: str) -> int:
  for rank, patterns in enumerate(LAYERS):
    for pattern in patterns:
      if pattern.endswith(".*"):
        if module.startswith(pattern[:-1]) and module.count(".") == pattern.count("."):
          return rank
      elif "*" in pattern:
        head, tail = pattern.split("*")
        depth_matches = module.count(".") == pattern.count(".")
        if module.startswith(head) and module.endswith(tail) and depth_matches:
          return rank
      elif module == pattern:
        return rank
  raise AssertionError(f"{module} is in no layer of tests/test_imports.py; add it.")


def module_name(path: pathlib.Path) -> str:
  parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
  if parts[-1] == "__init__":
    parts.pop()
  return ".".join(parts)


def module_level_imports(path: pathlib.Path) -> list[str]:
  """The tunix_zoo modules ``path`` imports outside functions (and outside TYPE_CHECKING)."""
  return _imports(ast.parse(path.read_text()).body)


def all_imports(path: pathlib.Path) -> list[str]:
  """The tunix_zoo modules ``path`` imports anywhere, functions included (TYPE_CHECKING
  blocks aside: annotations may name any layer)."""
  tree = ast.parse(path.read_text())
  return _imports([node for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                   and not _under_type_checking(tree, node)])


def _under_type_checking(tree: ast.AST, target: ast.AST) -> bool:
  return any(target in ast.walk(node) for node in ast.walk(tree)
             if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test))


def _imports(nodes: list[ast.stmt]) -> list[str]:
  out = []
  for node in nodes:
    if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
      continue
    if isinstance(node, ast.Import):
      out += [a.name for a in node.names if a.name.startswith("tunix_zoo")]
    elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tunix_zoo"):
      for alias in node.names:
        # "from tunix_zoo import sharding" imports the module tunix_zoo.sharding.
        candidate = f"{node.module}.{alias.name}"
        is_module = (PACKAGE.parent / candidate.replace(".", "/")).with_suffix(".py").exists() or (
            PACKAGE.parent / candidate.replace(".", "/")).is_dir()
        out.append(candidate if is_module else node.module)
  return out


SOURCES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=[module_name(p) for p in SOURCES])
def test_module_imports_only_its_own_or_lower_layers(path: pathlib.Path):
  importer = module_name(path)
  upward = [
      imported for imported in module_level_imports(path)
      if not imported.startswith(importer + ".") and layer_of(imported) > layer_of(importer)
  ]
  assert not upward, f"{importer} (layer {layer_of(importer)}) imports higher layers: {upward}"


def test_the_layer_check_sees_an_upward_import(tmp_path: pathlib.Path):
  bad = tmp_path / "naming.py"
  bad.write_text("from tunix_zoo.build import abstract_model\nimport tunix_zoo.config\n")
  assert module_level_imports(bad) == ["tunix_zoo.build", "tunix_zoo.config"]
  assert layer_of("tunix_zoo.build") > layer_of("tunix_zoo.naming")
  lazy = tmp_path / "push.py"
  lazy.write_text("def f():\n  from tunix_zoo.sources.huggingface import validate_repo_id\n")
  assert module_level_imports(lazy) == []
  assert all_imports(lazy) == ["tunix_zoo.sources.huggingface"]


def test_naming_registry_and_family_tables_import_no_jax():
  code = (
      "import sys\n"
      f"for m in {JAX_FREE!r}: __import__(m)\n"
      "from tunix_zoo import ModelNaming, registry\n"
      "ModelNaming(model_id='Qwen/Qwen3-0.6B')\n"
      "registry.get_config('qwen3_30b_a3b')\n"
      "heavy = sorted(m for m in ('jax', 'flax', 'numpy', 'torch') if m in sys.modules)\n"
      "assert not heavy, heavy\n"
  )
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
  assert result.returncode == 0, result.stderr



def test_the_cli_reports_a_mistyped_model_id_without_importing_jax():
  """A typo should fail in well under a second: parsing the command line (whose defaults
  argparse converts too) and resolving the id must not import jax."""
  code = (
      "import sys\n"
      "from tunix_zoo import cli\n"
      "code = cli.main(['info', 'Qwen/Qwen4-8B', '--dtype', 'bfloat16'])\n"
      "assert code == 2, code\n"
      "heavy = sorted(m for m in ('jax', 'flax') if m in sys.modules)\n"
      "assert not heavy, heavy\n"
  )
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
  assert result.returncode == 0, result.stderr
  assert "Did you mean 'qwen3'" in result.stderr

def test_no_public_name_is_also_a_submodule():
  """``from tunix_zoo import generate`` must give the function even after some other code
  imported a submodule: importing ``tunix_zoo.<x>`` rebinds the package attribute ``x``
  to the module, so no lazily exported name may be a submodule's name."""
  import tunix_zoo

  shadowed = [name for name in tunix_zoo.__all__
              if (PACKAGE / f"{name}.py").exists() or (PACKAGE / name).is_dir()]
  assert not shadowed, f"public names that a submodule import would replace: {shadowed}"
  code = ("import tunix_zoo.generation, tunix_zoo.cli\n"
          "from tunix_zoo import generate\n"
          "assert callable(generate), generate\n")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
  assert result.returncode == 0, result.stderr


def test_no_test_module_imports_another():
  """Shared test code lives in helper modules (tests/reference.py, tests/moe_reference.py,
  conftest fixtures): a test module imported by another runs its collection twice and
  ties the two files' fixtures together."""
  tests_root = PACKAGE.parent / "tests"
  offenders = []
  for path in sorted(tests_root.rglob("*.py")):
    for node in ast.walk(ast.parse(path.read_text())):
      names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
               [f"{node.module}.{a.name}" for a in node.names]
               if isinstance(node, ast.ImportFrom) and node.module else [])
      offenders += [f"{path.relative_to(tests_root)}: {name}" for name in names
                    if name.startswith("tests.") and name.rsplit(".", 1)[-1].startswith("test_")
                    or ".test_" in name.removeprefix("tests")]
  assert not offenders, offenders
