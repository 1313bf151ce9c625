"""checkpoint.reader and checkpoint.writer against the reference safetensors library and
transformers."""

import concurrent.futures
import gc
import json
import os
import struct
from unittest import mock

import hypothesis
import ml_dtypes
import numpy as np
import psutil
import pytest
import safetensors.numpy
import safetensors.torch
import torch
from hypothesis import strategies as st

from tunix_zoo.checkpoint import reader
from tunix_zoo.checkpoint.reader import SAFETENSORS_DTYPES, CheckpointFiles, SafetensorsFile
from tunix_zoo.checkpoint.writer import ShardedWriter, parse_size, write_safetensors
from tunix_zoo.errors import CheckpointError

# Dtypes the reference's numpy framework can hold; the others need torch or ml_dtypes.
NUMPY_FRAMEWORK_DTYPES = ("F64", "F32", "F16", "C64", "I64", "I32", "I16", "I8", "U64", "U32",
                          "U16", "U8", "BOOL")
TORCH_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "C64": torch.complex64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8,
    "BOOL": torch.bool,
}
SHAPES = ((7, 5, 3), (13,), (), (0, 4), (4, 0, 2), (33, 17))


def reference_parses(dtype_name: str) -> bool:
  """Whether the installed safetensors library parses a header naming this dtype (it
  refuses the whole file otherwise; releases differ in the float8 variants they know)."""
  itemsize = SAFETENSORS_DTYPES[dtype_name].itemsize
  header = json.dumps({"t": {"dtype": dtype_name, "shape": [1],
                             "data_offsets": [0, itemsize]}}).encode()
  header += b" " * (-len(header) % 8)
  try:
    safetensors.deserialize(struct.pack("<Q", len(header)) + header + bytes(itemsize))
  except safetensors.SafetensorError:
    return False
  return True


REFERENCE_DTYPES = tuple(name for name in SAFETENSORS_DTYPES if reference_parses(name))


def random_array(rng: np.random.Generator, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
  if dtype == np.bool_:
    return rng.random(shape) < 0.5
  if dtype.kind in "iu":
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, shape, dtype=dtype, endpoint=True)
  if dtype.kind == "c":
    return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(dtype)
  return (rng.standard_normal(shape) * 4).astype(dtype)


def assert_same(actual: np.ndarray, expected: np.ndarray) -> None:
  """Equal bit for bit, which also compares NaNs of float8 types."""
  assert actual.dtype == expected.dtype
  assert actual.shape == expected.shape
  assert actual.tobytes() == expected.tobytes()


def torch_to_numpy(tensor: torch.Tensor, dtype: np.dtype) -> np.ndarray:
  raw = tensor.contiguous().reshape(-1).view(torch.uint8).numpy()
  return raw.view(dtype).reshape(tuple(tensor.shape))


def numpy_to_torch(array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
  if array.size == 0:  # torch cannot reinterpret an empty byte tensor.
    return torch.empty(array.shape, dtype=dtype)
  raw = torch.from_numpy(array.reshape(-1).view(np.uint8).copy())
  return raw.view(dtype).reshape(array.shape)


@pytest.fixture(scope="module")
def every_dtype() -> dict[str, np.ndarray]:
  """One tensor per safetensors dtype and shape."""
  rng = np.random.default_rng(0)
  return {f"{name}/{i}": random_array(rng, dtype, shape)
          for name, dtype in SAFETENSORS_DTYPES.items()
          for i, shape in enumerate(SHAPES)}


@pytest.fixture(scope="module")
def every_dtype_file(tmp_path_factory, every_dtype) -> str:
  path = str(tmp_path_factory.mktemp("every_dtype") / "model.safetensors")
  write_safetensors(path, every_dtype)
  return path


@pytest.fixture(scope="module")
def reference_dtypes(every_dtype) -> dict[str, np.ndarray]:
  """The tensors of the dtypes the installed safetensors library knows."""
  return {k: v for k, v in every_dtype.items() if k.split("/")[0] in REFERENCE_DTYPES}


@pytest.fixture(scope="module")
def reference_dtype_file(tmp_path_factory, reference_dtypes) -> str:
  path = str(tmp_path_factory.mktemp("reference_dtypes") / "model.safetensors")
  write_safetensors(path, reference_dtypes)
  return path


# Interoperability with the reference library and transformers.


def test_written_file_loads_in_safetensors_numpy(tmp_path, every_dtype):
  subset = {k: v for k, v in every_dtype.items() if k.split("/")[0] in NUMPY_FRAMEWORK_DTYPES}
  path = str(tmp_path / "model.safetensors")
  write_safetensors(path, subset)
  loaded = safetensors.numpy.load_file(path)
  assert loaded.keys() == subset.keys()
  for key, expected in subset.items():
    assert_same(loaded[key], expected)


def test_reference_parses_the_common_dtypes():
  assert {"F32", "F16", "BF16", "F8_E4M3", "F8_E5M2", "I64", "BOOL"} <= set(REFERENCE_DTYPES)


def test_written_file_loads_in_safetensors_torch_with_metadata(reference_dtype_file,
                                                               reference_dtypes):
  with safetensors.safe_open(reference_dtype_file, framework="pt") as f:
    assert f.metadata() == {"format": "pt"}
    for key, expected in reference_dtypes.items():
      dtype_name = key.split("/")[0]
      if dtype_name in TORCH_DTYPES:
        tensor = f.get_tensor(key)
        assert tensor.dtype == TORCH_DTYPES[dtype_name]
        assert_same(torch_to_numpy(tensor, expected.dtype), expected)


def test_streamed_pairs_write_the_same_tensors_as_a_dict(tmp_path, every_dtype,
                                                         every_dtype_file, reference_dtypes):
  path = tmp_path / "streamed.safetensors"
  write_safetensors(path, ((key, value) for key, value in every_dtype.items()))
  assert path.read_bytes() == open(every_dtype_file, "rb").read()
  with SafetensorsFile(path) as f:
    assert f.keys() == sorted(every_dtype)
    for key, expected in every_dtype.items():
      assert_same(f.read(key), expected)
  reference_path = tmp_path / "reference.safetensors"
  write_safetensors(reference_path, iter(reference_dtypes.items()), metadata={"source": "test"})
  with safetensors.safe_open(str(reference_path), framework="pt") as f:
    assert f.metadata() == {"format": "pt", "source": "test"}
    assert_same(torch_to_numpy(f.get_tensor("BF16/0"), ml_dtypes.bfloat16), every_dtype["BF16/0"])
  assert sorted(os.listdir(tmp_path)) == ["reference.safetensors", "streamed.safetensors"]


def test_header_is_padded_so_data_is_8_byte_aligned(tmp_path):
  path = tmp_path / "w.safetensors"
  write_safetensors(path, {"odd_name_length": np.zeros(3, np.int8)})
  raw = path.read_bytes()
  (header_length,) = struct.unpack("<Q", raw[:8])
  assert header_length % 8 == 0
  assert raw[8:8 + header_length].rstrip(b" ").endswith(b"}")


def test_reads_files_written_by_safetensors_torch(tmp_path, every_dtype):
  tensors = {key: numpy_to_torch(value, TORCH_DTYPES[key.split("/")[0]])
             for key, value in every_dtype.items() if key.split("/")[0] in TORCH_DTYPES}
  path = tmp_path / "reference.safetensors"
  safetensors.torch.save_file(tensors, str(path), metadata={"format": "pt"})
  with SafetensorsFile(path) as f:
    assert f.keys() == sorted(tensors)
    assert f.metadata == {"format": "pt"}
    for key in tensors:
      assert_same(f.read(key), every_dtype[key])
      assert f.shape(key) == every_dtype[key].shape
      assert f.dtype(key) == every_dtype[key].dtype


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
  """A random bf16 LlamaForCausalLM saved by transformers in ~100KB shards."""
  from transformers import LlamaConfig, LlamaForCausalLM  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
  model = LlamaForCausalLM(config).to(torch.bfloat16)
  with torch.no_grad():
    for name, param in model.named_parameters():
      if name.endswith("norm.weight"):
        param.add_(torch.randn_like(param))
  folder = tmp_path_factory.mktemp("tiny_llama")
  model.save_pretrained(folder, max_shard_size="100KB")
  return model, str(folder)


def test_reads_sharded_transformers_checkpoint(tiny_llama):
  model, folder = tiny_llama
  assert os.path.isfile(os.path.join(folder, "model.safetensors.index.json"))
  state = model.state_dict()
  with CheckpointFiles(folder) as files:
    assert files.keys() == sorted(state)
    assert len({files.file_of(key) for key in files.keys()}) > 1
    for key, tensor in state.items():
      assert_same(files.read(key), torch_to_numpy(tensor, ml_dtypes.bfloat16))
      assert files.dtype(key) == np.dtype(ml_dtypes.bfloat16)
    assert files.total_bytes == sum(t.numel() * 2 for t in state.values())
    assert files.bytes_read == files.total_bytes


def test_transformers_loads_sharded_writer_output(tiny_llama, tmp_path):
  from transformers import LlamaForCausalLM  # pylint: disable=g-import-not-at-top
  model, _ = tiny_llama
  model.config.save_pretrained(tmp_path)
  state = model.state_dict()
  with ShardedWriter(tmp_path, max_shard_size="100KB") as writer:
    for key, tensor in state.items():
      writer.add(key, torch_to_numpy(tensor, ml_dtypes.bfloat16))
  index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
  assert index["metadata"]["total_size"] == sum(t.numel() * 2 for t in state.values())
  assert len(set(index["weight_map"].values())) > 1

  loaded = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
  loaded_state = loaded.state_dict()
  assert loaded_state.keys() == state.keys()
  for key, tensor in state.items():
    assert torch.equal(loaded_state[key], tensor), key


# Slices.


def owns_its_memory(array: np.ndarray) -> bool:
  """True when ``array`` is (a view of) a numpy allocation, not of the file's mmap."""
  while isinstance(array.base, np.ndarray):
    array = array.base
  return array.flags.owndata


@hypothesis.settings(max_examples=300, deadline=None)
@hypothesis.given(data=st.data())
def test_random_slices_equal_numpy_slicing(every_dtype_file, every_dtype, data):
  key = data.draw(st.sampled_from(sorted(every_dtype)))
  full = every_dtype[key]
  slices = tuple(data.draw(st.slices(size)) for size in full.shape)
  slices = slices[:data.draw(st.integers(0, len(slices)))]
  block_bytes = data.draw(st.sampled_from([1, 8, 100, reader._BLOCK_BYTES]))
  with mock.patch.object(reader, "_BLOCK_BYTES", block_bytes):
    with SafetensorsFile(every_dtype_file) as f:
      got = f.read(key, slices)
      assert f.bytes_read == got.nbytes
  assert_same(got, np.ascontiguousarray(full[slices]) if full.ndim else full)
  assert got.flags.c_contiguous and got.flags.writeable and owns_its_memory(got)


def test_read_index_must_be_slices(every_dtype_file):
  with SafetensorsFile(every_dtype_file) as f:
    with pytest.raises(ValueError, match="slices"):
      f.read("F32/0", (0, slice(None)))
    with pytest.raises(ValueError, match="slices"):
      f.read("F32/1", (slice(None), slice(None)))


def test_bytes_read_counts_each_slice_over_files(tiny_llama):
  _, folder = tiny_llama
  with CheckpointFiles(folder) as files:
    assert files.bytes_read == 0
    embed = files.read("model.embed_tokens.weight", (slice(0, 10), slice(0, 8)))
    head = files.read("lm_head.weight", (slice(5, 7),))
    assert files.file_of("model.embed_tokens.weight") != files.file_of("lm_head.weight")
    assert files.bytes_read == embed.nbytes + head.nbytes == (10 * 8 + 2 * 64) * 2


def test_concurrent_reads_are_correct_and_counted(every_dtype_file, every_dtype):
  key = "F32/5"
  full = every_dtype[key]
  requests = [(slice(i, i + 3), slice(j, None, 2)) for i in range(30) for j in range(5)]
  with SafetensorsFile(every_dtype_file) as f:
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
      results = list(pool.map(lambda index: f.read(key, index), requests * 4))
    assert f.bytes_read == sum(r.nbytes for r in results)
  for index, result in zip(requests * 4, results):
    assert_same(result, full[index])


def test_read_after_close_raises_and_arrays_survive(every_dtype_file, every_dtype):
  f = SafetensorsFile(every_dtype_file)
  rows = f.read("BF16/5", (slice(2, 4),))
  f.close()
  assert_same(rows, every_dtype["BF16/5"][2:4])
  with pytest.raises(ValueError, match="closed"):
    f.read("BF16/5")


@pytest.mark.parametrize("index", [(slice(1000, 1128),), (slice(None), slice(0, 800))],
                         ids=["rows", "columns"])
def test_reading_a_slice_of_a_large_tensor_keeps_rss_bounded(tmp_path, index):
  rows, columns = 8192, 6400  # 210 MB of int32; value = row * columns + column.
  path = tmp_path / "large.safetensors"
  write_safetensors(path, {"big": np.arange(rows * columns, dtype=np.int32).reshape(rows, -1)})
  gc.collect()
  process = psutil.Process()
  with SafetensorsFile(path) as f:
    before = process.memory_info().rss
    got = f.read("big", index)
    growth = process.memory_info().rss - before
  expected = np.arange(rows * columns, dtype=np.int32).reshape(rows, columns)[index]
  assert_same(got, expected)
  tensor_bytes = rows * columns * 4
  assert growth < got.nbytes + tensor_bytes // 4, (growth, got.nbytes)


# The sharded writer.


def test_sharded_writer_splits_at_the_limit(tmp_path):
  sizes = {"a": 400, "b": 400, "c": 300, "d": 2500, "e": 100, "f": 0}  # float32 counts
  rng = np.random.default_rng(1)
  tensors = {key: rng.standard_normal(n).astype(np.float32) for key, n in sizes.items()}
  with ShardedWriter(tmp_path, max_shard_size=3200) as writer:  # a + b exactly fill one.
    for key, array in tensors.items():
      writer.add(key, array)
  names = [f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)]
  assert sorted(os.listdir(tmp_path)) == names + ["model.safetensors.index.json"]
  index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
  assert index == {
      "metadata": {"total_parameters": sum(sizes.values()),
                   "total_size": 4 * sum(sizes.values())},
      "weight_map": {"a": names[0], "b": names[0], "c": names[1], "d": names[2],
                     "e": names[3], "f": names[3]},
  }
  with CheckpointFiles(tmp_path) as files:
    for key, array in tensors.items():
      assert_same(files.read(key), array)


def test_planned_writer_writes_the_same_files_in_any_order(tmp_path):
  sizes = {"a": 400, "b": 400, "c": 300, "d": 2500, "e": 100, "f": 0}
  rng = np.random.default_rng(2)
  tensors = {key: rng.standard_normal(n).astype(np.float32) for key, n in sizes.items()}
  tensors["g"] = np.ones((3, 5), ml_dtypes.bfloat16)
  with ShardedWriter(tmp_path / "held", max_shard_size=3200) as writer:
    for key, array in tensors.items():
      writer.add(key, array)
  plan = [(key, array.shape, array.dtype) for key, array in tensors.items()]
  with ShardedWriter(tmp_path / "planned", max_shard_size=3200, plan=plan) as writer:
    for key, array in reversed(tensors.items()):
      writer.add(key, array)
  names = sorted(os.listdir(tmp_path / "held"))
  assert len(names) == 5 and sorted(os.listdir(tmp_path / "planned")) == names
  for name in names:
    assert (tmp_path / "planned" / name).read_bytes() == (tmp_path / "held" / name).read_bytes()


def test_planned_writer_rejects_tensors_unlike_the_plan_and_cleans_up(tmp_path):
  plan = [("a", (2, 3), np.float32), ("b", (4,), ml_dtypes.bfloat16)]
  with pytest.raises(CheckpointError, match="'a' is planned twice"):
    ShardedWriter(tmp_path / "twice", plan=plan + plan[:1])
  with pytest.raises(CheckpointError, match="no dtype for object"):
    ShardedWriter(tmp_path / "object", plan=[("o", (1,), object)])
  writer = ShardedWriter(tmp_path / "out", plan=plan)
  with pytest.raises(CheckpointError, match="'c' is not in the plan"):
    writer.add("c", np.zeros(1))
  with pytest.raises(CheckpointError, match=r"planned float32|planned F32 of shape \(2, 3\)"):
    writer.add("a", np.zeros((3, 2), np.float32))
  with pytest.raises(CheckpointError, match="planned BF16"):
    writer.add("b", np.zeros(4, np.float32))
  writer.add("a", np.zeros((2, 3), np.float32))
  with pytest.raises(CheckpointError, match="1 planned tensor.*never given.*: b"):
    writer.finish()
  writer.abort()
  assert os.listdir(tmp_path / "out") == []


def test_sharded_writer_writes_one_model_safetensors_when_it_fits(tmp_path):
  with ShardedWriter(tmp_path, max_shard_size=10**6, metadata={"exported_by": "test"}) as w:
    w.add("x", np.ones((4, 4), ml_dtypes.bfloat16))
    w.add("y", np.arange(3))
  assert os.listdir(tmp_path) == ["model.safetensors"]
  with safetensors.safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
    assert f.metadata() == {"format": "pt", "exported_by": "test"}
    assert f.get_tensor("y").tolist() == [0, 1, 2]


def test_sharded_writer_returns_paths_and_rejects_misuse(tmp_path):
  writer = ShardedWriter(tmp_path / "out", max_shard_size="1KB")
  writer.add("x", np.zeros(300, np.float32))
  writer.add("y", np.zeros(300, np.float32))
  with pytest.raises(CheckpointError, match="'x' was given twice"):
    writer.add("x", np.zeros(1))
  with pytest.raises(CheckpointError, match="no dtype for object"):
    writer.add("z", np.array([object()]))
  written = writer.finish()
  assert [os.path.basename(p) for p in written] == [
      "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
      "model.safetensors.index.json"]
  with pytest.raises(ValueError, match="finished"):
    writer.add("w", np.zeros(1))
  with pytest.raises(CheckpointError, match="already holds checkpoint files"):
    ShardedWriter(tmp_path / "out")


def test_sharded_writer_removes_partial_shards_on_error(tmp_path):
  with pytest.raises(RuntimeError):
    with ShardedWriter(tmp_path, max_shard_size="1KB") as writer:
      for i in range(5):
        writer.add(f"t{i}", np.zeros(200, np.float32))
      raise RuntimeError("gather failed")
  assert os.listdir(tmp_path) == []


def test_write_safetensors_rejects_duplicate_streamed_keys_and_cleans_up(tmp_path):
  pairs = [("a", np.zeros(2)), ("a", np.ones(2))]
  with pytest.raises(CheckpointError, match="'a' was given twice"):
    write_safetensors(tmp_path / "w.safetensors", iter(pairs))
  assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("text, expected", [
    ("5GB", 5 * 10**9), ("100KB", 100_000), ("100kb", 100_000), ("2GiB", 2 * 2**30),
    ("1.5 MB", 1_500_000), ("512MiB", 512 * 2**20), ("123", 123), (4096, 4096), ("7B", 7)])
def test_parse_size(text, expected):
  assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GB", "5 GBs", "-1KB", "0", 0, "five", None, True])
def test_parse_size_rejects(text):
  with pytest.raises(CheckpointError):
    parse_size(text)


# Every way a file or folder can be wrong.


def write_raw(path, header, data: bytes) -> str:
  raw = header if isinstance(header, bytes) else json.dumps(header).encode()
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(raw)) + raw + data)
  return str(path)


def good_entry(**overrides):
  return {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16], **overrides}


@pytest.mark.parametrize("header, data, message", [
    ({"w": good_entry()}, b"\0" * 15, "tensor 'w' ends at byte"),
    ({"w": good_entry(dtype="F4")}, b"\0" * 16, "tensor 'w' has dtype 'F4'"),
    ({"w": good_entry(dtype=["F32"])}, b"\0" * 16, "tensor 'w' has dtype \\['F32'\\]"),
    ({"w": good_entry(data_offsets=[0, 12])}, b"\0" * 16, "needs 16"),
    ({"w": good_entry(data_offsets=[16, 32])}, b"\0" * 16, "ends at byte"),
    ({"w": good_entry(data_offsets=[8, 4])}, b"\0" * 16, "data_offsets"),
    ({"w": good_entry(shape=[2, -2])}, b"\0" * 16, "shape"),
    ({"w": good_entry(shape="2x2")}, b"\0" * 16, "shape"),
    ({"w": [1, 2]}, b"", "not an object"),
    ([1, 2], b"", "JSON list"),
    ({"__metadata__": {"n": 1}}, b"", "__metadata__"),
    (b'{"w": {"dtype": "F32"', b"", "not valid JSON"),
    (b"\xff\xfe{}", b"", "not valid JSON"),
    (b'{"w": {}, "w": {}}', b"", "'w' appears twice"),
], ids=["truncated", "unknown_dtype", "dtype_not_string", "offsets_vs_shape",
        "offsets_out_of_range", "offsets_reversed", "negative_dim", "shape_not_list",
        "entry_not_object", "header_not_object", "metadata_not_strings", "json_cut", "not_utf8",
        "duplicate_key"])
def test_corrupt_file_raises_naming_the_file(tmp_path, header, data, message):
  path = write_raw(tmp_path / "bad.safetensors", header, data)
  with pytest.raises(CheckpointError, match=message) as error:
    SafetensorsFile(path)
  assert path in str(error.value)


def test_truncated_real_file_names_the_tensor(tmp_path):
  path = tmp_path / "model.safetensors"
  write_safetensors(path, {"first": np.zeros(64, np.float32), "last": np.ones(64, np.float32)})
  path.write_bytes(path.read_bytes()[:-10])
  with pytest.raises(CheckpointError, match=r"model.safetensors: tensor 'last' ends at byte"):
    CheckpointFiles(tmp_path)


@pytest.mark.parametrize("content, message", [
    (b"\1\2\3", "fewer than the 8-byte length"),
    (struct.pack("<Q", 1000) + b"{}", "header length of 1000"),
    (struct.pack("<Q", 2**63) + b"{}" + b" " * 100, "header length of"),
], ids=["shorter_than_length", "length_past_end", "length_huge"])
def test_bad_header_length(tmp_path, content, message):
  path = tmp_path / "bad.safetensors"
  path.write_bytes(content)
  with pytest.raises(CheckpointError, match=message):
    SafetensorsFile(path)


def test_unknown_key_suggests_close_names(every_dtype_file):
  with SafetensorsFile(every_dtype_file) as f:
    with pytest.raises(CheckpointError, match="Did you mean 'BF16/1'"):
      f.shape("BF16/1x")


def write_index(folder, weight_map) -> None:
  with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f)


def test_missing_shard(tmp_path):
  write_safetensors(tmp_path / "model-00001-of-00002.safetensors", {"a": np.zeros(1)})
  write_index(tmp_path, {"a": "model-00001-of-00002.safetensors",
                         "b": "model-00002-of-00002.safetensors"})
  with pytest.raises(CheckpointError, match="missing from .*model-00002-of-00002.safetensors"):
    CheckpointFiles(tmp_path)


def test_index_naming_a_key_its_shard_lacks(tmp_path):
  write_safetensors(tmp_path / "shard.safetensors", {"a": np.zeros(1)})
  write_index(tmp_path, {"a": "shard.safetensors", "b": "shard.safetensors"})
  with CheckpointFiles(tmp_path) as files:
    assert files.read("a").tolist() == [0.0]
    with pytest.raises(CheckpointError, match="says shard.safetensors holds tensor 'b'"):
      files.shape("b")


@pytest.mark.parametrize("index_text, message", [
    ("{not json", "not valid JSON"),
    ('{"metadata": {}}', "no 'weight_map'"),
    ('{"weight_map": {"a": "../elsewhere.safetensors"}}', "outside the checkpoint folder"),
])
def test_bad_index(tmp_path, index_text, message):
  (tmp_path / "model.safetensors.index.json").write_text(index_text)
  with pytest.raises(CheckpointError, match=message):
    CheckpointFiles(tmp_path)


def test_folder_of_unindexed_files_maps_every_key(tmp_path):
  write_safetensors(tmp_path / "part-a.safetensors", {"a": np.zeros(2), "b": np.ones(3)})
  write_safetensors(tmp_path / "part-b.safetensors", {"c": np.arange(4)})
  with CheckpointFiles(tmp_path) as files:
    assert files.keys() == ["a", "b", "c"]
    assert files.file_of("c") == str(tmp_path / "part-b.safetensors")
    assert files.read("c", (slice(1, 3),)).tolist() == [1, 2]
    assert files.total_bytes == 9 * 8


def test_model_safetensors_wins_over_stray_files(tmp_path):
  write_safetensors(tmp_path / "model.safetensors", {"a": np.zeros(2)})
  write_safetensors(tmp_path / "adapter_model.safetensors", {"a": np.ones(2)})
  with CheckpointFiles(tmp_path) as files:
    assert files.read("a").tolist() == [0.0, 0.0]


def test_duplicate_key_across_files(tmp_path):
  write_safetensors(tmp_path / "one.safetensors", {"a": np.zeros(2), "shared": np.zeros(1)})
  write_safetensors(tmp_path / "two.safetensors", {"shared": np.zeros(1)})
  with pytest.raises(CheckpointError, match="'shared' is in both one.safetensors and two"):
    CheckpointFiles(tmp_path)


def test_pickle_only_folder_says_how_to_convert(tmp_path):
  (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
  (tmp_path / "config.json").write_text("{}")
  with pytest.raises(CheckpointError, match="pytorch_model.bin.*never reads pickle.*"
                     "safe_serialization=True"):
    CheckpointFiles(tmp_path)


def test_empty_and_missing_folders(tmp_path):
  (tmp_path / "config.json").write_text("{}")
  with pytest.raises(CheckpointError, match="no \\*.safetensors files.*config.json"):
    CheckpointFiles(tmp_path)
  with pytest.raises(CheckpointError, match="does not exist"):
    CheckpointFiles(tmp_path / "nope")
  with pytest.raises(CheckpointError, match="is not a folder"):
    CheckpointFiles(tmp_path / "config.json")
  with pytest.raises(CheckpointError, match="Cannot read safetensors file"):
    SafetensorsFile(tmp_path / "nope.safetensors")
