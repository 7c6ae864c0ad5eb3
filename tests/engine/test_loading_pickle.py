"""PickleCheckpoint: torch.save zip checkpoints read lazily through a restricted unpickler."""

import builtins
import io
import pickle
import subprocess
import zipfile
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from mksuite.common.errors import TensorFileError, UnsafePickleError
from mksuite.common.loading import PickleCheckpoint, TensorInfo, pickle_source


def assert_bit_exact(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype
    assert actual.shape == expected.shape
    assert actual.is_contiguous()
    expected_bytes = expected.contiguous().reshape(-1).view(torch.uint8)
    assert torch.equal(actual.reshape(-1).view(torch.uint8), expected_bytes)


def state_dict_with_views() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 8, generator=g)
    return {
        "base": base,
        "transposed": base.t(),  # non-contiguous view of the same storage
        "rows": base[2:5],  # view with a storage offset
        "strided": base[:, ::3],  # non-contiguous slice
        "bf16": torch.randn(3, 5, generator=g).to(torch.bfloat16),
        "f16": torch.randn(4, generator=g).to(torch.float16),
        "i64": torch.arange(-3, 7),
        "scalar": torch.tensor(2.5),
        "empty": torch.empty(0, 4),
        "fp8": torch.randn(5, generator=g).to(torch.float8_e5m2),
        "param": torch.nn.Parameter(torch.ones(3)),
    }


@pytest.fixture
def checkpoint(tmp_path):
    tensors = state_dict_with_views()
    path = tmp_path / "pytorch_model.bin"
    torch.save(tensors, path)
    return path, {k: v.detach() for k, v in tensors.items()}


def test_torch_save_checkpoint_loads_bit_exact_including_views(checkpoint, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("torch.load must not be used")

    monkeypatch.setattr(torch, "load", forbidden)
    path, tensors = checkpoint
    with PickleCheckpoint(path) as source:
        assert source.names() == list(tensors)
        for name, expected in tensors.items():
            assert source.info(name) == TensorInfo(name, expected.dtype, tuple(expected.shape))
            assert_bit_exact(source.load(name), expected)


def test_views_are_copied_out_and_own_only_their_elements(checkpoint):
    path, tensors = checkpoint
    source = PickleCheckpoint(path)
    rows = source.load("rows")
    transposed = source.load("transposed")
    assert rows.untyped_storage().nbytes() == rows.nbytes
    assert transposed.untyped_storage().nbytes() == transposed.nbytes
    transposed.zero_()
    assert_bit_exact(source.load("base"), tensors["base"])


def test_loading_a_slice_reads_only_the_bytes_it_spans(checkpoint, monkeypatch):
    path, _ = checkpoint
    reads = []
    real = pickle_source.read_bytes

    def recording(fd, nbytes, offset, **kwargs):
        reads.append(nbytes)
        return real(fd, nbytes, offset, **kwargs)

    monkeypatch.setattr(pickle_source, "read_bytes", recording)
    PickleCheckpoint(path).load("rows")
    assert reads == [3 * 8 * 4]


def test_opening_and_info_read_no_storage_bytes(checkpoint, monkeypatch):
    path, tensors = checkpoint

    def refuse(*args, **kwargs):
        raise AssertionError("storage bytes were read")

    monkeypatch.setattr(pickle_source, "read_bytes", refuse)
    source = PickleCheckpoint(path)
    assert [source.info(n).shape for n in tensors] == [tuple(t.shape) for t in tensors.values()]


def test_module_state_dict_with_metadata_loads(tmp_path):
    module = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    torch.save(module.state_dict(), tmp_path / "m.bin")
    source = PickleCheckpoint(tmp_path / "m.bin")
    for name, expected in module.state_dict().items():
        assert_bit_exact(source.load(name), expected)


def test_single_nested_state_dict_is_unwrapped(tmp_path):
    tensors = {"a": torch.arange(4.0), "b": torch.ones(2, 2)}
    torch.save({"state_dict": tensors, "epoch": 3, "note": "x"}, tmp_path / "ckpt.bin")
    source = PickleCheckpoint(tmp_path / "ckpt.bin")
    assert source.names() == ["a", "b"]
    assert_bit_exact(source.load("b"), tensors["b"])


@pytest.mark.parametrize(
    "payload, fragment",
    [
        ({"model": {"a": torch.ones(1)}, "ema": {"a": torch.zeros(1)}}, "not a state dict"),
        ([torch.ones(1)], "holds a list"),
        ({"a": torch.ones(1), "step": 4}, "not a state dict"),
    ],
)
def test_checkpoints_without_one_clear_state_dict_are_refused(tmp_path, payload, fragment):
    torch.save(payload, tmp_path / "x.bin")
    with pytest.raises(TensorFileError, match=fragment):
        PickleCheckpoint(tmp_path / "x.bin")


def test_legacy_non_zip_format_is_refused_with_a_resave_hint(tmp_path):
    torch.save({"a": torch.ones(2)}, tmp_path / "old.bin", _use_new_zipfile_serialization=False)
    with pytest.raises(TensorFileError) as caught:
        PickleCheckpoint(tmp_path / "old.bin")
    assert "legacy" in caught.value.message
    assert "re-save" in caught.value.hint


def test_truncated_zip_is_reported_as_damaged(checkpoint):
    path, _ = checkpoint
    path.write_bytes(path.read_bytes()[:-200])
    with pytest.raises(TensorFileError, match="truncated or damaged"):
        PickleCheckpoint(path)


def test_storage_member_shorter_than_its_tensors_is_rejected_at_open(tmp_path, checkpoint):
    path, _ = checkpoint
    damaged = tmp_path / "damaged.bin"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(damaged, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            dst.writestr(info, data[:8] if info.filename.endswith("data/0") else data)
    with pytest.raises(TensorFileError, match="truncated: tensor `base` needs bytes up to 192"):
        PickleCheckpoint(damaged)


def test_compressed_members_are_read_through_zipfile(tmp_path, checkpoint):
    path, tensors = checkpoint
    deflated = tmp_path / "deflated.bin"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(deflated, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))
    source = PickleCheckpoint(deflated)
    for name in ("rows", "strided", "scalar", "empty"):
        assert_bit_exact(source.load(name), tensors[name])


def write_archive(path, data_pkl: bytes) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", data_pkl)
        archive.writestr("archive/byteorder", "little")
        archive.writestr("archive/version", "3\n")


class _Reduce:
    """Pickles as a call of `func(*args)` (the classic code-execution gadget)."""

    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def malicious_payloads(marker):
    command = f"touch {marker}"
    # GLOBAL 'os system' spelled out: pickling os.system itself would record `posix.system`.
    os_system = b"(S'w'\ncos\nsystem\n(S'" + command.encode() + b"'\ntRd."  # protocol 0, by hand
    evaluate = _Reduce(builtins.eval, (f"open({str(marker)!r}, 'w').write('pwned')",))
    spawn = _Reduce(subprocess.call, (["touch", str(marker)],))
    return {
        "os.system": os_system,
        "builtins.eval": pickle.dumps({"w": evaluate}, protocol=2),
        "subprocess.call": pickle.dumps({"w": spawn}, protocol=4),
    }


@pytest.mark.parametrize("global_name", ["os.system", "builtins.eval", "subprocess.call"])
def test_payload_really_runs_code_under_plain_pickle(tmp_path, global_name):
    """Control: proves the payloads below are live, so their refusal means something."""
    marker = tmp_path / "marker"
    pickle.loads(malicious_payloads(marker)[global_name])
    assert marker.exists()


@pytest.mark.parametrize("global_name", ["os.system", "builtins.eval", "subprocess.call"])
def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path, global_name):
    marker = tmp_path / "marker"
    path = tmp_path / "pytorch_model.bin"
    write_archive(path, malicious_payloads(marker)[global_name])
    with pytest.raises(UnsafePickleError) as caught:
        PickleCheckpoint(path)
    assert f"`{global_name}`" in caught.value.message
    assert str(path) in caught.value.message
    assert not marker.exists()


def test_malicious_global_after_real_tensors_is_still_refused(tmp_path):
    marker = tmp_path / "marker"
    buffer = io.BytesIO()
    torch.save({"a": torch.ones(2), "w": _Reduce(builtins.exec, (f"open({str(marker)!r}, 'w')",))}, buffer)
    path = tmp_path / "mixed.bin"
    path.write_bytes(buffer.getvalue())
    with pytest.raises(UnsafePickleError, match="builtins.exec"):
        PickleCheckpoint(path)
    assert not marker.exists()


def test_garbage_data_pkl_is_a_tensor_file_error(tmp_path):
    write_archive(tmp_path / "junk.bin", b"\x80\x02not a pickle at all")
    with pytest.raises(TensorFileError, match="data.pkl cannot be read"):
        PickleCheckpoint(tmp_path / "junk.bin")


def test_concurrent_loads_from_many_threads_return_correct_tensors(tmp_path):
    g = torch.Generator().manual_seed(2)
    base = torch.randn(48, 40, generator=g)
    tensors = {f"t{i}": torch.randn(32, 17 + i, generator=g) for i in range(16)}
    tensors.update({f"view{i}": base[i : i + 8, i::2] for i in range(8)})
    torch.save(tensors, tmp_path / "threads.bin")
    source = PickleCheckpoint(tmp_path / "threads.bin")
    jobs = [n for _ in range(6) for n in tensors]
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(source.load, jobs))
    for name, tensor in zip(jobs, results):
        assert_bit_exact(tensor, tensors[name])
