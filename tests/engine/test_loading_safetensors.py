"""SafetensorsFile and ShardedSource: bit-exact reads, validation at open, lazy shards, threads."""

import json
import struct
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from safetensors.torch import save_file

from mksuite.common.errors import MissingTensorError, TensorFileError
from mksuite.common.loading import SafetensorsFile, ShardedSource, TensorInfo, TensorSource, safetensors_source


def assert_bit_exact(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype
    assert actual.shape == expected.shape
    assert actual.is_contiguous()
    expected_bytes = expected.contiguous().reshape(-1).view(torch.uint8)
    assert torch.equal(actual.reshape(-1).view(torch.uint8), expected_bytes)


def sample_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "w.bf16": torch.randn(5, 7, generator=g).to(torch.bfloat16),
        "w.f32": torch.randn(3, 4, 2, generator=g),
        "w.f16": torch.randn(6, generator=g).to(torch.float16),
        "w.i64": torch.randint(-(2**62), 2**62, (4,), generator=g),
        "w.nan": torch.tensor([float("nan"), -0.0, float("inf")]),
        "scalar": torch.tensor(1.25),
        "empty": torch.empty(0, 3),
        "mask": torch.tensor([True, False, True]),
        "fp8": torch.randn(4, generator=g).to(torch.float8_e4m3fn),
    }


@pytest.fixture
def single_file(tmp_path):
    tensors = sample_tensors()
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt", "note": "x"})
    return path, tensors


def test_single_file_round_trips_every_dtype_bit_exact(single_file):
    path, tensors = single_file
    with SafetensorsFile(path) as source:
        assert sorted(source.names()) == sorted(tensors)
        for name, expected in tensors.items():
            assert_bit_exact(source.load(name), expected)


def test_info_reports_dtype_shape_and_bytes_from_the_header(single_file):
    path, tensors = single_file
    source = SafetensorsFile(path)
    assert source.info("w.bf16") == TensorInfo("w.bf16", torch.bfloat16, (5, 7))
    assert source.info("w.bf16").nbytes == 70
    assert source.info("scalar") == TensorInfo("scalar", torch.float32, ())
    assert source.info("scalar").nbytes == 4
    assert source.info("empty").nbytes == 0
    assert source.metadata == {"format": "pt", "note": "x"}
    assert "w.f32" in source and "nope" not in source
    assert isinstance(source, TensorSource)


def test_info_reads_no_tensor_data(single_file, monkeypatch):
    path, tensors = single_file

    def refuse(*args, **kwargs):
        raise AssertionError("tensor data was read")

    monkeypatch.setattr(safetensors_source, "read_bytes", refuse)
    source = SafetensorsFile(path)
    assert [source.info(n).shape for n in tensors] == [tuple(t.shape) for t in tensors.values()]
    with pytest.raises(AssertionError):
        source.load("w.f32")


def test_loaded_tensors_own_their_memory_and_are_independent(single_file):
    path, tensors = single_file
    source = SafetensorsFile(path)
    first = source.load("w.f32")
    first.zero_()
    assert_bit_exact(source.load("w.f32"), tensors["w.f32"])
    assert first.untyped_storage().nbytes() == first.nbytes


def test_unknown_tensor_name_raises_missing_tensor_with_suggestion(single_file):
    source = SafetensorsFile(path=single_file[0])
    with pytest.raises(MissingTensorError) as caught:
        source.info("w.f23")
    assert caught.value.hint == "did you mean `w.f32`?"


def test_truncated_file_is_rejected_at_open_naming_tensor_and_sizes(single_file):
    path, _ = single_file
    data = path.read_bytes()
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + header_len])
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    path.write_bytes(data[:-3])
    with pytest.raises(TensorFileError) as caught:
        SafetensorsFile(path)
    needed = 8 + header_len + header[last]["data_offsets"][1]
    assert f"truncated: tensor `{last}` needs bytes up to {needed}" in caught.value.message
    assert f"has {len(data) - 3}" in caught.value.message
    assert caught.value.path == str(path)


def entry(dtype, shape, offsets) -> bytes:
    return json.dumps({"a": {"dtype": dtype, "shape": shape, "data_offsets": offsets}}).encode()


def write_raw(path, header: bytes, body: bytes = b"", length: int | None = None):
    path.write_bytes(struct.pack("<Q", len(header) if length is None else length) + header + body)
    return path


@pytest.mark.parametrize(
    "header, body, length, fragment",
    [
        (b"{not json", b"", None, "corrupt header"),
        (b"[1, 2]", b"", None, "expected an object"),
        (b"{}", b"", 10**12, "header length field says"),
        (entry("F32", [2], [0, 4]), b"\0" * 8, None, "span 4"),
        (entry("Q7", [1], [0, 4]), b"\0" * 4, None, "unsupported dtype"),
        (entry("F32", [-1], [0, 4]), b"\0" * 4, None, "invalid shape"),
        (entry("F32", [1], [4, 0]), b"\0" * 4, None, "invalid data_offsets"),
        (entry("F32", [1], [0]), b"\0" * 4, None, "invalid data_offsets"),
        (b'{"__metadata__": [1]}', b"", None, "__metadata__"),
    ],
)
def test_corrupt_headers_are_rejected_at_open(tmp_path, header, body, length, fragment):
    path = write_raw(tmp_path / "bad.safetensors", header, body, length)
    with pytest.raises(TensorFileError) as caught:
        SafetensorsFile(path)
    assert fragment in caught.value.message
    assert str(path) in caught.value.message


def test_file_shorter_than_the_length_field_is_truncated(tmp_path):
    (tmp_path / "tiny.safetensors").write_bytes(b"\x01\x02")
    with pytest.raises(TensorFileError, match="truncated"):
        SafetensorsFile(tmp_path / "tiny.safetensors")
    write_raw(tmp_path / "short.safetensors", b'{"a": 1}', length=500)
    with pytest.raises(TensorFileError, match="header needs bytes up to 508"):
        SafetensorsFile(tmp_path / "short.safetensors")


def test_missing_file_raises_tensor_file_error(tmp_path):
    with pytest.raises(TensorFileError, match="cannot open"):
        SafetensorsFile(tmp_path / "absent.safetensors")


def test_load_after_close_is_a_clear_error(single_file):
    source = SafetensorsFile(single_file[0])
    source.close()
    source.close()  # idempotent
    with pytest.raises(TensorFileError, match="closed"):
        source.load("w.f32")


def write_shards(directory, tensors, layout: dict[str, list[str]]):
    weight_map = {}
    for file, names in layout.items():
        save_file({n: tensors[n] for n in names}, str(directory / file))
        weight_map.update({n: file for n in names})
    index = directory / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return index


@pytest.fixture
def sharded(tmp_path):
    tensors = sample_tensors()
    names = sorted(tensors)
    index = write_shards(
        tmp_path,
        tensors,
        {"model-00001-of-00002.safetensors": names[:4], "model-00002-of-00002.safetensors": names[4:]},
    )
    return index, tensors


def test_sharded_source_round_trips_across_shards_bit_exact(sharded):
    index, tensors = sharded
    with ShardedSource.from_index(index) as source:
        assert sorted(source.names()) == sorted(tensors)
        for name, expected in tensors.items():
            assert source.info(name) == TensorInfo(name, expected.dtype, tuple(expected.shape))
            assert_bit_exact(source.load(name), expected)


def test_shards_are_opened_only_when_one_of_their_tensors_is_used(sharded):
    index, tensors = sharded
    second = index.parent / "model-00002-of-00002.safetensors"
    second.write_bytes(b"\xff" * 16)  # damaged, but nothing from it is asked for yet
    source = ShardedSource.from_index(index)
    first_name = sorted(tensors)[0]
    assert_bit_exact(source.load(first_name), tensors[first_name])
    with pytest.raises(TensorFileError, match=str(second)):
        source.info(sorted(tensors)[-1])


def test_index_naming_a_missing_shard_names_index_and_shard(sharded):
    index, _ = sharded
    (index.parent / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(TensorFileError) as caught:
        ShardedSource.from_index(index)
    assert str(index) in caught.value.message
    assert "model-00002-of-00002.safetensors" in caught.value.message


def test_index_pointing_at_the_wrong_shard_is_reported_on_use(sharded):
    index, tensors = sharded
    content = json.loads(index.read_text())
    moved = sorted(tensors)[0]
    content["weight_map"][moved] = "model-00002-of-00002.safetensors"
    index.write_text(json.dumps(content))
    with pytest.raises(TensorFileError, match="does not contain it"):
        ShardedSource.from_index(index).info(moved)


@pytest.mark.parametrize("text", ["{", '{"weight_map": [1]}', '{"weight_map": {"a": 3}}'])
def test_malformed_index_is_a_tensor_file_error(tmp_path, text):
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(text)
    with pytest.raises(TensorFileError):
        ShardedSource.from_index(index)


def test_concurrent_loads_from_many_threads_return_correct_tensors(sharded):
    index, _ = sharded
    g = torch.Generator().manual_seed(1)
    big = {f"t{i}": torch.randn(64, 33 + i, generator=g) for i in range(24)}
    names = sorted(big)
    write_shards(index.parent, big, {"a.safetensors": names[:12], "b.safetensors": names[12:]})
    source = ShardedSource.from_index(index)
    jobs = [n for _ in range(8) for n in names]
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(source.load, jobs))
    for name, tensor in zip(jobs, results):
        assert_bit_exact(tensor, big[name])


# -- big tensors are mapped, not read ------------------------------------------------------------


def test_mapped_tensors_and_row_blocks_equal_read_ones_and_writes_never_reach_the_file(tmp_path, monkeypatch):
    import mksuite.common.loading.safetensors_source as module
    from mksuite.common.loading.buffers import READ_BUFFERS

    tensors = {
        "odd": torch.arange(7, dtype=torch.int8),
        "m": torch.randn(33, 17),
        "h": torch.randn(5, 3).to(torch.bfloat16),
    }
    path = tmp_path / "t.safetensors"
    save_file(tensors, str(path))
    before = path.read_bytes()
    monkeypatch.setattr(module, "MAP_MIN_BYTES", 1)  # map everything, at unaligned offsets
    source = SafetensorsFile(path)
    for name, expected in tensors.items():
        mapped = source.load(name)
        assert mapped.dtype == expected.dtype and torch.equal(mapped, expected)
        assert torch.equal(source.load_rows(name, 2, 5), expected[2:5])
        mapped.zero_()  # copy-on-write: the process's page, not the file's
        assert not READ_BUFFERS.give(mapped)  # a mapping is never kept as a read buffer
    assert path.read_bytes() == before
    assert torch.equal(source.load("m"), tensors["m"])


def test_a_merge_with_every_input_mapped_gives_the_same_bits(tiny_family, tmp_path, monkeypatch):
    import mksuite.common.loading.safetensors_source as module
    from mkmerge.methods import METHODS
    from mkmerge.recipe import parse_recipe
    from mkmerge.run import run_merge
    from mksuite.common.build import BuildOptions

    from tiny_models import read_tensors

    base, (a, b) = tiny_family("llama", hidden=64, vocab=200)
    text = f"merge_method: ties\nbase_model: {base}\nmodels:\n  - {{model: {a}, parameters: {{weight: 0.5, density: 0.4}}}}\n  - {{model: {b}, parameters: {{weight: 0.7, density: 0.6}}}}\ndtype: bfloat16\n"
    run_merge(
        parse_recipe(text, known_methods=METHODS.keys()),
        tmp_path / "read",
        BuildOptions(chunk_bytes=4096),
        write_card=False,
    )
    monkeypatch.setattr(module, "MAP_MIN_BYTES", 1)
    run_merge(
        parse_recipe(text, known_methods=METHODS.keys()),
        tmp_path / "mapped",
        BuildOptions(chunk_bytes=4096),
        write_card=False,
    )
    read, mapped = read_tensors(tmp_path / "read"), read_tensors(tmp_path / "mapped")
    assert read.keys() == mapped.keys() and all(torch.equal(read[k], mapped[k]) for k in read)
