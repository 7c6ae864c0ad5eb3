"""Reads straight to the compute device through pinned pieces (common/loading/device_reads.py).

On a GPU the pieces are pinned and copied on the reader's stream; everything else (piece
arithmetic, row ranges, truncation, which reads may go to the device, the executor's
plumbing) is the same code on the CPU and is tested here. tests/test_cuda.py runs it on CUDA.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch
from safetensors.torch import save_file

import mksuite.common.graph.tasks as tasks
import mksuite.common.loading.device_reads as device_reads
from mkmerge.methods import METHODS
from mkmerge.recipe import parse_recipe
from mkmerge.run import run_merge
from mksuite.common.build import BuildOptions
from mksuite.common.errors import TensorFileError
from mksuite.common.graph import CastTensor, LoadTensor, OutputTensor, Task, build_schedule
from mksuite.common.graph.executor import device_loads
from mksuite.common.loading import SafetensorsFile, byte_range

from tiny_models import read_tensors

CPU = torch.device("cpu")


@pytest.fixture
def stored(tmp_path):
    tensors = {
        "w": torch.randn(5, 13).to(torch.bfloat16),
        "v": torch.arange(11, dtype=torch.float32),
        "e": torch.zeros(0, 4, dtype=torch.float16),
        "s": torch.tensor(3.5, dtype=torch.float32),
        "i": torch.arange(-6, 6, dtype=torch.int64).reshape(3, 4),
    }
    save_file(tensors, str(tmp_path / "m.safetensors"))
    return tensors, tmp_path / "m.safetensors"


@pytest.mark.parametrize("piece", [1, 7, 26, 1 << 20])
def test_a_tensor_read_in_pieces_is_the_stored_tensor(stored, monkeypatch, piece):
    monkeypatch.setattr(device_reads, "PIECE_BYTES", piece)
    tensors, path = stored
    with SafetensorsFile(path) as source:
        for name, expected in tensors.items():
            got = device_reads.read_to_device(
                byte_range(source, name), expected.dtype, tuple(expected.shape), CPU, name=name
            )
            assert got.dtype == expected.dtype and got.shape == expected.shape, name
            assert torch.equal(got, expected), name


def test_a_row_range_read_in_pieces_is_those_rows(stored, monkeypatch):
    monkeypatch.setattr(device_reads, "PIECE_BYTES", 10)
    tensors, path = stored
    with SafetensorsFile(path) as source:
        for start, stop in [(0, 5), (1, 4), (2, 3), (3, 3)]:
            where = byte_range(source, "w", (start, stop))
            got = device_reads.read_to_device(where, torch.bfloat16, (stop - start, 13), CPU, name="w")
            assert torch.equal(got, tensors["w"][start:stop])


def test_a_file_cut_short_after_opening_is_reported_as_truncated(stored, monkeypatch):
    monkeypatch.setattr(device_reads, "PIECE_BYTES", 8)
    tensors, path = stored
    with SafetensorsFile(path) as source:
        where = byte_range(source, "w")
        os.truncate(path, where.offset + 30)
        with pytest.raises(TensorFileError, match=r"truncated: tensor `w`"):
            device_reads.read_to_device(where, torch.bfloat16, (5, 13), CPU, name="w")


def test_a_host_tensor_moved_to_the_same_device_is_itself():
    tensor = torch.arange(4)
    assert device_reads.to_device(tensor, CPU) is tensor
    assert device_reads.to_host(tensor, None).data_ptr() == tensor.data_ptr()


@dataclass(frozen=True)
class Use(Task):
    """A task using its inputs with a chosen ``device_inputs``."""

    kind: str
    parts: tuple[Task, ...]

    def dependencies(self):
        return self.parts

    @property
    def device_inputs(self):  # the class attribute, chosen per instance for the test
        return self.kind


def test_only_reads_whose_every_use_takes_device_tensors_go_to_the_device():
    load = {name: LoadTensor("m", name, 16) for name in "abcdefg"}
    outputs = [
        OutputTensor("moved", torch.float32, (4,), Use("move", (load["a"],))),
        # through a cast to a task that moves: may go
        OutputTensor("cast-moved", torch.float32, (4,), Use("move", (CastTensor(load["b"], torch.float32),))),
        # through a cast to a host-only task: stays
        OutputTensor("cast-host", torch.float32, (4,), Use("", (CastTensor(load["c"], torch.float16),))),
        # used by a moving task and by a host-only one: stays
        OutputTensor("mixed-1", torch.float32, (4,), Use("move", (load["d"],))),
        OutputTensor("mixed-2", torch.float32, (4,), Use("", (load["d"],))),
        # an output as it is read, and one through casts only: the writer copies it back
        OutputTensor("as-read", torch.float32, (4,), load["e"]),
        OutputTensor("cast-out", torch.float16, (4,), CastTensor(CastTensor(load["f"], torch.float16), torch.float32)),
        # a task that follows its input, used by a host-only task and a moving one: stays
        OutputTensor("follow-1", torch.float32, (4,), Use("move", (Use("follow", (load["g"],)),))),
        OutputTensor("follow-2", torch.float32, (4,), Use("", (Use("follow", (load["g"],)),))),
    ]
    staged = device_loads(build_schedule(outputs))
    assert {task.name for task in staged} == {"a", "b", "e", "f"}


def _recipe(method, base, a, b):
    spec = METHODS[method]
    lines = [f"merge_method: {method}", "dtype: bfloat16"]
    if method == "slerp":
        return (
            "\n".join(
                lines + [f"base_model: {base}", f"models: [{{model: {base}}}, {{model: {a}}}]", "parameters: {t: 0.3}"]
            )
            + "\n"
        )
    if spec.base_model != "none":
        lines.append(f"base_model: {base}")
    lines.append("models:")
    for model in (a, b):
        lines.append(f"  - {{model: {model}, parameters: {{weight: 0.6, density: 0.5}}}}")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("method", ["linear", "ties", "dare_ties", "slerp", "della"])
def test_merges_with_device_reads_write_the_same_bytes(method, chunked, tiny_family, tmp_path, monkeypatch):
    monkeypatch.setattr(device_reads, "PIECE_BYTES", 1000)
    base, (a, b) = tiny_family("llama", hidden=64, vocab=200)
    recipe = parse_recipe(_recipe(method, base, a, b), known_methods=METHODS.keys())
    calls = []
    read = device_reads.read_to_device

    def counted(*args, **kwargs):
        calls.append(args[0].nbytes)
        return read(*args, **kwargs)

    monkeypatch.setattr(tasks, "read_to_device", counted)
    chunk_bytes = 2048 if chunked else None
    run_merge(recipe, tmp_path / "plain", BuildOptions(chunk_bytes=chunk_bytes), write_card=False)
    assert calls == []  # not on the CPU unless asked for
    run_merge(recipe, tmp_path / "staged", BuildOptions(chunk_bytes=chunk_bytes, device_reads=True), write_card=False)
    assert len(calls) > 10 and max(calls) > 1000  # many reads, some in several pieces
    plain, staged = read_tensors(tmp_path / "plain"), read_tensors(tmp_path / "staged")
    assert plain.keys() == staged.keys()
    for name, expected in plain.items():
        assert torch.equal(staged[name], expected), name
