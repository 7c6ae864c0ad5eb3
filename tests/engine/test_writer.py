"""The sharded writer and the atomic output directory."""

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from mksuite.common.errors import OutputError
from mksuite.common.loading import TensorInfo
from mksuite.common.writing import INDEX_FILE, OutputDirectory, ShardedWriter, plan_shards


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(4, 8, generator=g).to(torch.bfloat16),
        "b.weight": torch.randn(16, generator=g),
        "c.bias": torch.randn(3, 5, generator=g).to(torch.float16),
        "d.ids": torch.arange(7, dtype=torch.int64),
        "e.scalar": torch.tensor(2.5),
        "f.empty": torch.zeros(0, 4),
    }


def _write(directory, tensors, shard_bytes, order=None):
    planned = [TensorInfo(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    plans = plan_shards(planned, shard_bytes)
    writer = ShardedWriter(directory, plans)
    writer.open()
    for name in order or reversed(list(tensors)):  # out of order on purpose
        writer.write(name, tensors[name])
    writer.finish()
    return plans


def test_single_shard_round_trips_bit_exact_when_written_out_of_order(tmp_path):
    tensors = _tensors()
    _write(tmp_path, tensors, 10**9)
    assert sorted(os.listdir(tmp_path)) == ["model.safetensors"]
    loaded = load_file(tmp_path / "model.safetensors")
    assert loaded.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype
        assert torch.equal(loaded[name], tensor)
    with safe_open(tmp_path / "model.safetensors", "pt") as handle:
        assert handle.metadata() == {"format": "pt"}


def test_shards_close_before_overflow_and_index_is_authoritative(tmp_path):
    tensors = _tensors()
    plans = _write(tmp_path, tensors, 64)
    assert len(plans) > 1
    for plan in plans:
        if len(plan.tensors) > 1:
            assert plan.data_bytes <= 64
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    for name, filename in index["weight_map"].items():
        assert torch.equal(load_file(tmp_path / filename)[name], tensors[name])
    assert plans[0].filename == f"model-00001-of-{len(plans):05d}.safetensors"


def test_tensor_larger_than_shard_limit_gets_a_shard_alone():
    planned = [
        TensorInfo("small", torch.float32, (2,)),
        TensorInfo("big", torch.float32, (100,)),
        TensorInfo("small2", torch.float32, (2,)),
    ]
    plans = plan_shards(planned, 50)
    assert [[t.name for t in p.tensors] for p in plans] == [["small"], ["big"], ["small2"]]


def test_writer_refuses_calls_out_of_order_and_off_plan(tmp_path):
    plans = plan_shards([TensorInfo("x", torch.float32, (2,))], 100)
    writer = ShardedWriter(tmp_path, plans)
    with pytest.raises(RuntimeError):
        writer.write("x", torch.zeros(2))
    writer.open()
    with pytest.raises(KeyError):
        writer.write("y", torch.zeros(2))
    with pytest.raises(ValueError):
        writer.write("x", torch.zeros(3))
    with pytest.raises(ValueError):
        writer.write("x", torch.zeros(2, dtype=torch.float16))
    with pytest.raises(RuntimeError, match="never written"):
        writer.finish()
    writer.write("x", torch.zeros(2))
    with pytest.raises(ValueError, match="twice"):
        writer.write("x", torch.zeros(2))
    writer.finish()
    with pytest.raises(RuntimeError):
        writer.finish()


def test_written_tensors_are_independent_copies_of_shared_memory(tmp_path):
    shared = torch.arange(6, dtype=torch.float32)
    tensors = {"one": shared, "two": shared}
    _write(tmp_path, tensors, 10**6)
    loaded = load_file(tmp_path / "model.safetensors")
    assert torch.equal(loaded["one"], shared) and torch.equal(loaded["two"], shared)


def test_output_directory_appears_only_on_commit(tmp_path):
    out = tmp_path / "out"
    with OutputDirectory(out) as staging:
        (staging.path / "config.json").write_text("{}")
        assert not out.exists()
        staging.commit()
    assert (out / "config.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_failed_run_leaves_nothing_behind(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ZeroDivisionError):
        with OutputDirectory(out) as staging:
            (staging.path / "model.safetensors").write_bytes(b"partial")
            raise ZeroDivisionError
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / "model.safetensors").write_text("x")
    with pytest.raises(OutputError, match="not empty") as caught:
        OutputDirectory(out).check()
    assert "--overwrite" in caught.value.render()
    with OutputDirectory(out, overwrite=True) as staging:
        (staging.path / "new").write_text("y")
        staging.commit()
    assert sorted(p.name for p in out.iterdir()) == ["new"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_an_output_directory_is_checked_once_and_a_directory_filled_since_is_refused_at_commit(tmp_path):
    out = tmp_path / "out"
    output = OutputDirectory(out).check()
    out.mkdir()
    (out / "old").write_text("x")
    with output as staging:  # no second check: the early one stands ...
        (staging.path / "new").write_text("y")
        with pytest.raises(OutputError, match="appeared while merging"):
            staging.commit()  # ... and commit refuses to replace what appeared since
    assert sorted(p.name for p in out.iterdir()) == ["old"]


def test_a_merge_checks_its_output_directory_once(tiny_family, tmp_path, monkeypatch):
    from mkmerge.methods import METHODS
    from mkmerge.recipe import parse_recipe
    from mkmerge.run import run_merge
    from mksuite.common.build import BuildOptions

    checks = []
    real = OutputDirectory.check

    def counted(self):
        checks.append(self.checked)
        return real(self)

    monkeypatch.setattr(OutputDirectory, "check", counted)
    _, (a, b) = tiny_family("llama")
    text = f"merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 1}}\n  - model: {b}\n    parameters: {{weight: 1}}\n"
    run_merge(parse_recipe(text, known_methods=METHODS.keys()), tmp_path / "out", BuildOptions(), write_card=False)
    assert checks.count(False) == 1 and (tmp_path / "out" / "config.json").exists()


# -- verbatim copies: bytes that already lie in an input file ----------------------------------------


def _stored(tmp_path, tensors):
    from safetensors.torch import save_file

    from mksuite.common.loading import SafetensorsFile

    save_file(tensors, str(tmp_path / "in.safetensors"))
    return SafetensorsFile(tmp_path / "in.safetensors")


def _copy_all(directory, source, tensors, blocks=None):
    """Plan ``tensors`` and copy each from ``source``; ``blocks`` splits named tensors into row blocks."""
    planned = [TensorInfo(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    writer = ShardedWriter(directory, plan_shards(planned, 10**9))
    writer.open()
    for name, tensor in tensors.items():
        for rows in (blocks or {}).get(name, [None]):
            shape = tuple(tensor.shape) if rows is None else (rows[1] - rows[0], *tensor.shape[1:])
            writer.copy(name, rows, shape, tensor.dtype, source.byte_range(name, rows))
    writer.finish()


def test_copied_tensors_and_row_blocks_are_the_stored_bytes(tmp_path):
    tensors = _tensors()
    source = _stored(tmp_path, tensors)
    out = tmp_path / "out"
    out.mkdir()
    _copy_all(out, source, tensors, blocks={"a.weight": [(3, 4), (0, 3)], "c.bias": [(0, 0), (0, 3)]})
    got = load_file(str(out / "model.safetensors"))
    for name, tensor in tensors.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name


def test_copies_go_through_a_buffer_where_the_kernel_cannot_copy(tmp_path, monkeypatch):
    import errno

    calls = []

    def cross_device(*args):
        calls.append(args)
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "copy_file_range", cross_device, raising=False)
    tensors = _tensors()
    out = tmp_path / "out"
    out.mkdir()
    _copy_all(out, _stored(tmp_path, tensors), tensors)
    got = load_file(str(out / "model.safetensors"))
    assert calls and all(torch.equal(got[n], t) for n, t in tensors.items())


def test_a_copy_from_a_file_truncated_after_it_was_opened_names_the_file(tmp_path):
    from mksuite.common.errors import TensorFileError

    tensors = {"big": torch.arange(4096, dtype=torch.float32)}
    source = _stored(tmp_path, tensors)
    where = source.byte_range("big")
    os.truncate(tmp_path / "in.safetensors", where.offset + 100)
    writer = ShardedWriter(tmp_path, plan_shards([TensorInfo("big", torch.float32, (4096,))], 10**9))
    writer.open()
    with pytest.raises(TensorFileError, match="truncated.*in.safetensors"):
        writer.copy("big", None, (4096,), torch.float32, where)
    writer.close()


def test_a_copy_is_checked_against_the_plan_like_a_write(tmp_path):
    tensors = {"a": torch.zeros(4, 2, dtype=torch.bfloat16)}
    source = _stored(tmp_path, tensors)
    writer = ShardedWriter(tmp_path, plan_shards([TensorInfo("a", torch.bfloat16, (4, 2))], 10**9))
    writer.open()
    with pytest.raises(ValueError, match="planned"):
        writer.copy("a", None, (4, 2), torch.float16, source.byte_range("a"))  # another dtype
    with pytest.raises(ValueError, match="source range"):
        writer.copy("a", (0, 2), (2, 2), torch.bfloat16, source.byte_range("a"))  # the whole tensor for 2 rows
    writer.copy("a", None, (4, 2), torch.bfloat16, source.byte_range("a"))
    with pytest.raises(ValueError, match="written twice"):
        writer.copy("a", (0, 1), (1, 2), torch.bfloat16, source.byte_range("a", (0, 1)))
    writer.close()
