"""Bad arguments at the API edge: each gets a ZooError subclass before any work, and
leaves the checkpoint folder as it was."""

from __future__ import annotations

import hashlib
import json
import pathlib
import re
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.sources import servers
from tunix_zoo import AutoModel, sharding
from tunix_zoo.errors import (ArgumentError, CheckpointError, ConfigError, ShardingError,
                              SourceError, ZooError)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> pathlib.Path:
  return servers.make_checkpoint(tmp_path_factory.mktemp("tiny"))


def _state(folder: pathlib.Path) -> dict[str, str]:
  return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}


@pytest.mark.parametrize("param_dtype", [jnp.int8, "int32", np.uint8, bool, "bool"])
def test_integer_or_bool_param_dtype_is_refused(folder, param_dtype):
  before = _state(folder)
  with pytest.raises(ArgumentError, match=r"param_dtype=\w+ is not a floating dtype"):
    AutoModel.from_pretrained(str(folder), param_dtype=param_dtype)
  with pytest.raises(ArgumentError, match="not a floating dtype"):
    AutoModel.from_config("qwen3_0p6b", param_dtype=param_dtype)
  assert _state(folder) == before


@pytest.mark.parametrize("name", ["dtype", "param_dtype"])
def test_unknown_dtype_string_is_refused(folder, name):
  with pytest.raises(ArgumentError, match=rf"{name}='nonsense' is not a dtype.*bfloat16"):
    AutoModel.from_pretrained(str(folder), **{name: "nonsense"})


def test_float_dtypes_still_load(folder):
  model, _ = AutoModel.from_pretrained(str(folder), param_dtype="bfloat16", dtype=jnp.float32)
  assert {leaf.dtype for leaf in jax.tree.leaves(nnx.state(model, nnx.Param))} == {
      jnp.dtype(jnp.bfloat16)}


def test_mesh_as_a_string_is_a_sharding_error(folder):
  with pytest.raises(ShardingError, match=r"mesh must be a jax.sharding.Mesh.*str '1x8'.*"
                     r"jax.make_mesh\(\(1, 8\)"):
    AutoModel.from_pretrained(str(folder), mesh="1x8")


def test_unknown_model_source_is_a_source_error(folder):
  with pytest.raises(SourceError, match=r"model_source='ftp' is not a source.*'huggingface'"):
    AutoModel.from_pretrained("acme/tiny", model_source="ftp")


def test_mesh_with_foreign_axis_names_is_refused_with_the_fix():
  mesh = jax.make_mesh((2, 4), ("data", "model"))
  with pytest.raises(ShardingError, match=r"\('data', 'model'\).*replicated on all 8 devices"
                     r".*rules_for_axes\(fsdp='data', tp='model'\)"):
    AutoModel.from_config("qwen3_0p6b", mesh)


def test_rules_for_foreign_axes_shard_the_parameters():
  mesh = jax.make_mesh((2, 4), ("data", "model"))
  rules = sharding.rules_for_axes(fsdp="data", tp="model")
  spec = sharding.partition_spec(("embed", "mlp"), (64, 128), mesh, rules)
  assert tuple(spec) == ("data", "model")
  sharding.check_mesh_axes(mesh, rules)  # no error


def test_every_argument_error_is_a_zoo_error():
  assert issubclass(ArgumentError, ZooError) and issubclass(ArgumentError, ValueError)


def test_config_claiming_more_layers_than_the_weights_fails_before_building(folder, tmp_path):
  bad = tmp_path / "bad"
  shutil.copytree(folder, bad)
  config = json.loads((bad / "config.json").read_text())
  # Within the range config.json validation accepts (1..10000), so only the comparison with
  # the weights' tensor names can catch it.
  config["num_hidden_layers"] = 9000
  (bad / "config.json").write_text(json.dumps(config))
  start = time.monotonic()
  with pytest.raises(CheckpointError, match=r"says the model has 9000 layers, but the weights "
                     r"hold 1 \(numbered 0\.\.0\)"):
    AutoModel.from_pretrained(str(bad))
  assert time.monotonic() - start < 5  # building 9000 layers takes about a minute
  config["num_hidden_layers"] = 50000
  (bad / "config.json").write_text(json.dumps(config))
  with pytest.raises(ConfigError, match="num_hidden_layers' is 50000"):
    AutoModel.from_pretrained(str(bad))


@pytest.mark.parametrize("argv, message", [
    (["info", "qwen3_0p6b", "--dtype", "nonsense"], "'nonsense' is not a dtype"),
    (["info", "qwen3_0p6b", "--dtype", "int8"], "int8 is not a floating dtype"),
    (["info", "qwen3_0p6b", "--batch-size", "-1"], "-1 is not a positive integer"),
    (["info", "qwen3_0p6b", "--seq-len", "0"], "0 is not a positive integer"),
    (["test", "qwen3_0p6b", "--steps", "0"], "0 is not a positive integer"),
    (["test", "qwen3_0p6b", "--seq-len", "0"], "0 is not a positive integer"),
    (["run", "tiny-demo", "--top-p", "1.5"], r"1.5 is not in \(0, 1\]"),
    (["run", "tiny-demo", "--max-new-tokens", "0"], "0 is not a positive integer"),
    (["export", "qwen3_0p6b", "/nonexistent/out", "--out-dtype", "int4"],
     "int4 is not a floating dtype"),
    (["info", "qwen3_0p6b", "--mesh", "1x"], "Mesh '1x' is not FSDPxTP"),
])
def test_cli_bad_arguments_print_an_error_and_exit_2(argv, message, capsys):
  from tunix_zoo import cli  # pylint: disable=import-outside-toplevel
  try:
    code = cli.main(argv)
  except SystemExit as e:  # argparse's own errors
    code = e.code
  err = capsys.readouterr().err
  assert code == 2
  assert re.search(r"error: .*" + message, err), err
  assert "Traceback" not in err


@pytest.mark.parametrize("kwargs, message", [
    ({"max_new_tokens": "3"}, "max_new_tokens must be an integer, got str '3'"),
    ({"max_new_tokens": 2, "seed": "x"}, "seed must be an integer"),
    ({"max_new_tokens": 2, "pad_id": -5}, "pad_id must be a token id >= 0"),
    ({"max_new_tokens": 2, "eos_ids": "a"}, "eos_ids must be a token id or a list"),
])
def test_generate_argument_types(folder, kwargs, message):
  from tunix_zoo.errors import GenerationError  # pylint: disable=import-outside-toplevel
  from tunix_zoo.generation import generate  # pylint: disable=import-outside-toplevel
  model, _ = AutoModel.from_pretrained(str(folder))
  with pytest.raises(GenerationError, match=message):
    generate(model, [[1, 2, 3]], **kwargs)


@pytest.mark.parametrize("kwargs, error, message", [
    ({"param_dtype": jnp.int8}, ArgumentError, "param_dtype=int8 is not a floating dtype"),
    ({"module_path": 123}, ZooError, "module_path must be a regex string, got int 123"),
])
def test_apply_lora_argument_types(folder, kwargs, error, message):
  from tunix_zoo.lora import apply_lora, lora_layers  # pylint: disable=import-outside-toplevel
  model, _ = AutoModel.from_pretrained(str(folder))
  with pytest.raises(error, match=message):
    apply_lora(model, rank=2, alpha=2.0, **kwargs)
  assert not lora_layers(model)  # the model is left as it was
