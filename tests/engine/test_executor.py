"""Scheduler and executor: dedup, eviction, bounded prefetch, thread-count independence."""

import threading
from dataclasses import dataclass

import pytest
import torch

from mksuite.common.graph import (
    CastTensor,
    ExecutionContext,
    Executor,
    LoadTensor,
    OutputTensor,
    ScaleTensor,
    Task,
    build_schedule,
    tensor_seed,
)


class FakeSource:
    """A tensor source that counts reads and tracks how many loaded tensors are alive."""

    def __init__(self, tensors):
        self.tensors = tensors
        self.reads = []
        self.lock = threading.Lock()

    def load(self, name):
        with self.lock:
            self.reads.append(name)
        return self.tensors[name].clone()


@dataclass(frozen=True)
class Add(Task):
    a: Task
    b: Task

    def dependencies(self):
        return (self.a, self.b)

    def execute(self, inputs, ctx):
        return inputs[0] + inputs[1]


@dataclass(frozen=True)
class Boom(Task):
    input: Task

    def dependencies(self):
        return (self.input,)

    def execute(self, inputs, ctx):
        raise ValueError("boom")


def _load(name, n=4):
    return LoadTensor("m", name, n * 4)


def test_identical_tasks_run_once_and_shared_inputs_are_read_once():
    source = FakeSource({"x": torch.ones(4), "y": torch.full((4,), 2.0)})
    shared = Add(_load("x"), _load("y"))
    outputs = [
        OutputTensor("o1", torch.float32, (4,), shared),
        OutputTensor("o2", torch.float32, (4,), Add(_load("x"), _load("y"))),  # equal, not identical
        OutputTensor("o3", torch.float32, (4,), ScaleTensor(_load("x"), 3.0)),
    ]
    written = {}
    Executor(ExecutionContext(sources={"m": source})).run(outputs, lambda o, t: written.__setitem__(o.name, t))
    assert sorted(source.reads) == ["x", "y"]
    assert torch.equal(written["o1"], torch.full((4,), 3.0))
    assert torch.equal(written["o2"], torch.full((4,), 3.0))
    assert torch.equal(written["o3"], torch.full((4,), 3.0))


def test_schedule_frees_inputs_after_last_use():
    outputs = [OutputTensor(f"o{i}", torch.float32, (4,), CastTensor(_load(f"t{i}"), torch.float16)) for i in range(3)]
    schedule = build_schedule(outputs)
    assert [type(t).__name__ for t in schedule.order] == ["LoadTensor", "CastTensor"] * 3
    assert all(count == 1 for count in schedule.consumers.values())


def test_prefetch_budget_bounds_tensors_alive_at_once():
    n = 20
    tensors = {f"t{i}": torch.full((256,), float(i)) for i in range(n)}
    alive = []
    peak = [0]

    class Tracking(FakeSource):
        def load(self, name):
            tensor = super().load(name)
            alive.append(name)
            peak[0] = max(peak[0], len(alive))
            return tensor

    source = Tracking(tensors)

    def sink(output, tensor):
        alive.remove(output.name.replace("o", "t"))

    outputs = [OutputTensor(f"o{i}", torch.float32, (256,), LoadTensor("m", f"t{i}", 1024)) for i in range(n)]
    Executor(ExecutionContext(sources={"m": source}), prefetch_bytes=3 * 1024, write_queue_bytes=1024, readers=4).run(
        outputs, sink
    )
    assert peak[0] <= 4  # three prefetched, plus the one being written


def test_a_long_lived_input_larger_than_the_budget_does_not_deadlock():
    source = FakeSource({"big": torch.ones(1000), **{f"t{i}": torch.ones(10) for i in range(5)}})
    big = LoadTensor("m", "big", 4000)
    outputs = [OutputTensor("first", torch.float32, (1000,), ScaleTensor(big, 2.0))]
    outputs += [OutputTensor(f"o{i}", torch.float32, (10,), LoadTensor("m", f"t{i}", 40)) for i in range(5)]
    outputs += [OutputTensor("last", torch.float32, (1000,), ScaleTensor(big, 3.0))]
    written = {}
    Executor(ExecutionContext(sources={"m": source}), prefetch_bytes=100).run(
        outputs, lambda o, t: written.__setitem__(o.name, t)
    )
    assert torch.equal(written["last"], torch.full((1000,), 3.0))
    assert source.reads.count("big") == 1


def test_errors_in_tasks_propagate_and_stop_the_run():
    source = FakeSource({"x": torch.ones(4)})
    outputs = [OutputTensor("o", torch.float32, (4,), Boom(_load("x")))]
    with pytest.raises(ValueError, match="boom"):
        Executor(ExecutionContext(sources={"m": source})).run(outputs, lambda o, t: None)


def test_errors_in_the_sink_propagate():
    source = FakeSource({f"t{i}": torch.ones(4) for i in range(10)})
    outputs = [OutputTensor(f"o{i}", torch.float32, (4,), _load(f"t{i}")) for i in range(10)]

    def sink(output, tensor):
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        Executor(ExecutionContext(sources={"m": source})).run(outputs, sink)


def test_outputs_are_cast_to_their_planned_dtype():
    source = FakeSource({"x": torch.ones(4)})
    outputs = [OutputTensor("o", torch.bfloat16, (4,), _load("x"))]
    got = {}
    Executor(ExecutionContext(sources={"m": source})).run(outputs, lambda o, t: got.__setitem__(o.name, t))
    assert got["o"].dtype == torch.bfloat16


def test_tensor_seed_depends_on_seed_name_and_index_only():
    assert tensor_seed(1, "a", 0) == tensor_seed(1, "a", 0)
    assert len({tensor_seed(1, "a", 0), tensor_seed(2, "a", 0), tensor_seed(1, "b", 0), tensor_seed(1, "a", 1)}) == 4
    assert 0 <= tensor_seed(123, "x", 5) < 2**63


def test_outputs_that_are_stored_bytes_are_copied_and_the_rest_computed(tmp_path):
    from safetensors.torch import save_file

    from mksuite.common.graph import ProgressEvent
    from mksuite.common.loading import SafetensorsFile

    stored = {"x": torch.arange(6, dtype=torch.bfloat16).reshape(3, 2), "y": torch.ones(4)}
    save_file(stored, str(tmp_path / "m.safetensors"))
    source = SafetensorsFile(tmp_path / "m.safetensors")
    outputs = [
        OutputTensor("x", torch.bfloat16, (3, 2), LoadTensor("m", "x")),  # verbatim
        OutputTensor(
            "x.rows", torch.bfloat16, (3, 2), CastTensor(LoadTensor("m", "x", rows=(1, 3)), torch.bfloat16), rows=(1, 3)
        ),  # a no-op cast: verbatim
        OutputTensor("x.half", torch.float16, (3, 2), LoadTensor("m", "x")),  # another dtype: computed
        OutputTensor("y.double", torch.float32, (4,), ScaleTensor(LoadTensor("m", "y"), 2.0)),  # math: computed
    ]
    sunk, copied, events = {}, {}, []
    stats = Executor(ExecutionContext(sources={"m": source}), listener=events.append).run(
        outputs,
        lambda output, tensor: sunk.__setitem__(output.name, tensor),
        lambda output, where: copied.__setitem__(output.name, where),
    )
    assert sorted(sunk) == ["x.half", "y.double"] and sorted(copied) == ["x", "x.rows"]
    assert torch.equal(sunk["x.half"], stored["x"].half()) and torch.equal(sunk["y.double"], 2 * stored["y"])
    assert copied["x"] == source.byte_range("x") and copied["x.rows"] == source.byte_range("x", (1, 3))
    assert copied["x.rows"].nbytes == 2 * 2 * 2
    assert stats.tensors == 4 and stats.bytes_written == sum(o.nbytes for o in outputs)
    last = [e for e in events if e.kind == "tensor_written"][-1]
    assert (last.tensors_done, last.tensors_total, last.bytes_done, last.bytes_total) == (
        4,
        4,
        stats.bytes_written,
        stats.bytes_written,
    )
    assert isinstance(last, ProgressEvent)


def test_without_a_copier_every_output_is_computed(tmp_path):
    from safetensors.torch import save_file

    from mksuite.common.loading import SafetensorsFile

    save_file({"x": torch.ones(2)}, str(tmp_path / "m.safetensors"))
    sunk = {}
    Executor(ExecutionContext(sources={"m": SafetensorsFile(tmp_path / "m.safetensors")})).run(
        [OutputTensor("x", torch.float32, (2,), LoadTensor("m", "x"))],
        lambda output, tensor: sunk.__setitem__(output.name, tensor),
    )
    assert torch.equal(sunk["x"], torch.ones(2))


def test_a_failing_copy_stops_the_run_with_its_error(tmp_path):
    from safetensors.torch import save_file

    from mksuite.common.loading import SafetensorsFile

    save_file({"x": torch.ones(2)}, str(tmp_path / "m.safetensors"))

    def broken(output, where):
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        Executor(ExecutionContext(sources={"m": SafetensorsFile(tmp_path / "m.safetensors")})).run(
            [OutputTensor("x", torch.float32, (2,), LoadTensor("m", "x"))], lambda o, t: None, broken
        )
