"""Malformed safetensors files and index files: each is a CheckpointError naming the
file, never another exception; hypothesis mutates real headers and index files."""

from __future__ import annotations

import json
import pathlib
import struct

import hypothesis
import numpy as np
import pytest
import safetensors
import safetensors.numpy
from hypothesis import strategies as st

from tunix_zoo.checkpoint.reader import CheckpointFiles, SafetensorsFile
from tunix_zoo.errors import CheckpointError


def _file(path: pathlib.Path, header: dict, data: bytes) -> pathlib.Path:
  raw = json.dumps(header).encode()
  path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
  return path


def _f32(shape, begin):
  end = begin + 4 * int(np.prod(shape))
  return {"dtype": "F32", "shape": list(shape), "data_offsets": [begin, end]}


@pytest.mark.parametrize("header, data, message", [
    ({"a": _f32([2], 0), "b": _f32([2], 4)}, bytes(12), r"'b' at data_offsets \[4, 12\] overlaps 'a'"),
    ({"a": _f32([2], 0), "b": _f32([2], 12)}, bytes(20), r"leaves bytes 8-12 .* no tensor covers"),
    ({"a": _f32([2], 0)}, bytes(16), r"tensors end at byte 8 .* holds 16 bytes"),
    ({"a": {"dtype": "F32", "shape": [0, 2**40, 2**40], "data_offsets": [0, 0]}}, b"",
     r"too large for any array"),
])
def test_offsets_must_tile_the_data_region(tmp_path, header, data, message):
  path = _file(tmp_path / "model.safetensors", header, data)
  with pytest.raises(CheckpointError, match=message):
    SafetensorsFile(path)
  with pytest.raises((safetensors.SafetensorError, ValueError)):  # the reference refuses it
    safetensors.numpy.load_file(str(path))


def test_tensors_listed_out_of_order_still_tile(tmp_path):
  path = _file(tmp_path / "model.safetensors", {"a": _f32([2], 8), "b": _f32([2], 0)},
               np.arange(4, dtype=np.float32).tobytes())
  with SafetensorsFile(path) as f:
    assert f.read("a").tolist() == [2.0, 3.0]
  assert safetensors.numpy.load_file(str(path))["a"].tolist() == [2.0, 3.0]


def test_deeply_nested_header_is_a_checkpoint_error(tmp_path):
  raw = b"[" * 100_000 + b"]" * 100_000
  path = tmp_path / "model.safetensors"
  path.write_bytes(struct.pack("<Q", len(raw)) + raw)
  with pytest.raises(CheckpointError, match="nests JSON too deeply"):
    SafetensorsFile(path)


def test_deeply_nested_index_is_a_checkpoint_error(tmp_path):
  (tmp_path / "model.safetensors.index.json").write_text("{\"a\":" * 100_000 + "1" + "}" * 100_000)
  with pytest.raises(CheckpointError, match="nests JSON too deeply"):
    CheckpointFiles(tmp_path)


@pytest.mark.parametrize("shard", ["", "a\x00b", "/etc/passwd", "../x.safetensors"])
def test_index_naming_impossible_shards(tmp_path, shard):
  (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": shard}}))
  with pytest.raises(CheckpointError, match="not a file name in the checkpoint folder"):
    CheckpointFiles(tmp_path)


_REAL = {"embed": np.arange(6, dtype=np.float32).reshape(2, 3),
         "norm": np.ones(3, np.float16), "empty": np.zeros((0, 4), np.float32)}


def _real_header(tmp_path_factory) -> tuple[dict, bytes]:
  path = tmp_path_factory.mktemp("real") / "model.safetensors"
  safetensors.numpy.save_file(_REAL, str(path))
  blob = path.read_bytes()
  (length,) = struct.unpack("<Q", blob[:8])
  return json.loads(blob[8:8 + length]), blob[8 + length:]


_JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats()
                     | st.text(max_size=8), lambda inner: st.lists(inner, max_size=3)
                     | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=8)


@st.composite
def _mutated_header(draw, header: dict) -> dict:
  header = json.loads(json.dumps(header))
  for _ in range(draw(st.integers(0, 3))):
    key = draw(st.sampled_from(sorted(header)))
    entry = header[key]
    if isinstance(entry, dict) and entry and draw(st.booleans()):
      field = draw(st.sampled_from(sorted(entry) + ["extra"]))
      entry[field] = draw(_JSON | st.lists(st.integers(-1, 2**64), max_size=4))
    else:
      header[key] = draw(_JSON)
  return header


@hypothesis.settings(max_examples=150, deadline=None, database=None,
                     suppress_health_check=[hypothesis.HealthCheck.function_scoped_fixture])
@hypothesis.given(data=st.data())
def test_fuzzed_headers_give_a_checkpoint_error_or_a_readable_file(tmp_path_factory, data):
  header, body = _real_header(tmp_path_factory)
  mutated = data.draw(_mutated_header(header))
  cut = data.draw(st.sampled_from(["keep", "truncate", "extend"]))
  if cut == "truncate":
    body = body[:data.draw(st.integers(0, len(body)))]
  elif cut == "extend":
    body += data.draw(st.binary(min_size=1, max_size=16))
  path = _file(tmp_path_factory.mktemp("fuzz") / "model.safetensors", mutated, body)
  try:
    with SafetensorsFile(path) as f:
      for key in f.keys():
        f.read(key)
  except CheckpointError:
    return
  safetensors.numpy.load_file(str(path))  # what we accept, the reference accepts


@hypothesis.settings(max_examples=100, deadline=None, database=None,
                     suppress_health_check=[hypothesis.HealthCheck.function_scoped_fixture])
@hypothesis.given(index=_JSON | st.fixed_dictionaries({"weight_map": st.dictionaries(
    st.text(max_size=6), _JSON | st.text(max_size=12), max_size=3)}))
def test_fuzzed_index_files_give_a_checkpoint_error(tmp_path_factory, index):
  folder = tmp_path_factory.mktemp("index")
  safetensors.numpy.save_file(_REAL, str(folder / "model-1.safetensors"))
  (folder / "model.safetensors.index.json").write_text(json.dumps(index))
  try:
    with CheckpointFiles(folder) as files:
      for key in files.keys():
        files.read(key)
  except CheckpointError:
    pass
