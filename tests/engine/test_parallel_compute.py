"""Several outputs computed at once: the same bytes for any thread count, memory bounded in bytes."""

import threading
from dataclasses import dataclass

import pytest
import torch

import mkmerge.methods.reductions as reductions
from mkmerge.methods import METHODS
from mkmerge.recipe import parse_recipe
from mkmerge.run import run_merge
from mksuite.common.build import BuildOptions
from mksuite.common.graph import ExecutionContext, Executor, LoadTensor, OutputTensor, Task

RECIPES = {
    "linear": "merge_method: linear\nmodels:\n{models3}",
    "ties": "merge_method: ties\nbase_model: {base}\nmodels:\n{models2}",
    "dare_ties": "merge_method: dare_ties\nbase_model: {base}\nmodels:\n{models2}",
    "della": "merge_method: della\nbase_model: {base}\nmodels:\n{models2}parameters: {{epsilon: 0.1, lambda: 0.9}}\n",
    "slerp": "merge_method: slerp\nbase_model: {base}\nmodels:\n  - model: {base}\n  - model: {a}\n"
    "parameters: {{t: 0.4}}\n",
}


def _recipe(method, base, a, b) -> str:
    entry = "  - model: {}\n    parameters: {{weight: 0.6, density: 0.5}}\n"
    text = RECIPES[method].format(
        base=base,
        a=a,
        models2=entry.format(a) + entry.format(b),
        models3=entry.format(base) + entry.format(a) + entry.format(b),
    )
    return text + "dtype: bfloat16\n"


def _weight_bytes(path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(path.glob("*.safetensors*"))}


@pytest.mark.parametrize("chunked", [False, True], ids=["whole", "chunked"])
@pytest.mark.parametrize("method", sorted(RECIPES))
def test_output_bytes_do_not_depend_on_the_thread_count(method, chunked, tiny_family, tmp_path, monkeypatch):
    if chunked:  # row blocks, and whole-tensor statistics gathered over them
        monkeypatch.setattr(reductions, "CHUNK", 64)
    base, (a, b) = tiny_family("llama", hidden=64, vocab=200)
    text = _recipe(method, base, a, b)
    outputs = {}
    for threads in (1, 2, 3):
        recipe = parse_recipe(text, known_methods=METHODS.keys())
        options = BuildOptions(threads=threads, seed=5, chunk_bytes=2048 if chunked else None)
        run_merge(recipe, tmp_path / str(threads), options, write_card=False)
        outputs[threads] = _weight_bytes(tmp_path / str(threads))
    assert outputs[1]
    assert outputs[2] == outputs[1]
    assert outputs[3] == outputs[1]


class CountingSource:
    def __init__(self, tensors):
        self.tensors = tensors

    def load(self, name):
        return self.tensors[name].clone()


@dataclass(frozen=True)
class Tracked(Task):
    """Doubles its input, counting the bytes of the outputs computing at the same time."""

    input: Task
    gauge: object

    def dependencies(self):
        return (self.input,)

    def execute(self, inputs, ctx):
        nbytes = inputs[0].numel() * inputs[0].element_size()
        self.gauge.enter(nbytes)
        try:
            return inputs[0] * 2
        finally:
            self.gauge.leave(nbytes)


class Gauge:
    def __init__(self):
        self.lock = threading.Lock()
        self.now = self.peak = self.calls = 0
        self.overlapped = False
        self.barrier = threading.Event()

    def enter(self, nbytes):
        with self.lock:
            self.now += nbytes
            self.calls += 1
            self.peak = max(self.peak, self.now)
            self.overlapped |= self.now > nbytes
        threading.Event().wait(0.002)  # long enough for the other workers to start theirs

    def leave(self, nbytes):
        with self.lock:
            self.now -= nbytes

    def __hash__(self):
        return id(self)

    def __eq__(self, other):
        return self is other


@pytest.mark.parametrize("count", [8, 64])
def test_outputs_in_flight_are_bounded_in_bytes_not_in_count(count):
    gauge = Gauge()
    tensors = {f"t{i}": torch.full((256,), float(i)) for i in range(count)}
    outputs = [
        OutputTensor(f"o{i}", torch.float32, (256,), Tracked(LoadTensor("m", f"t{i}", 1024), gauge))
        for i in range(count)
    ]
    written = []
    executor = Executor(
        ExecutionContext(sources={"m": CountingSource(tensors)}), threads=8, compute_window_bytes=6 * 1024
    )
    executor.run(outputs, lambda o, t: written.append((o.name, t.clone())))
    assert [name for name, _ in written] == [f"o{i}" for i in range(count)]  # in plan order
    assert all(torch.equal(t, torch.full((256,), 2.0 * i)) for i, (_, t) in enumerate(written))
    assert gauge.calls == count
    assert gauge.overlapped  # several outputs did compute at once ...
    assert gauge.peak <= 3 * 1024  # ... but never more than the window's worth (2 KiB a segment)


def test_one_worker_per_thread_on_the_cpu_and_one_on_a_gpu():
    ctx = ExecutionContext(sources={})
    assert Executor(ctx, threads=3).compute_workers() == 3
    assert Executor(ctx, threads=1).compute_workers() == 1
    assert Executor(ExecutionContext(sources={}, device=torch.device("meta")), threads=3).compute_workers() == 1
