"""Big tensors merged in row blocks give exactly the bits of the whole-tensor merge."""

from __future__ import annotations

import math

import pytest
import torch

import mkmerge.methods.reductions as reductions
from mkmerge.methods import METHODS
from mkmerge.methods.chunked import row_chunks
from mkmerge.plan import plan_merge
from mkmerge.recipe import parse_recipe as _parse
from mkmerge.run import run_merge
from mksuite.common.build import BuildOptions
from mksuite.common.graph import LoadTensor, OutputTensor

from tiny_models import read_tensors


def parse_recipe(text):
    return _parse(text, known_methods=METHODS.keys())


# Small enough that every matrix of the tiny models is cut into several chunks.
CHUNK_BYTES = 2048

RECIPES = {
    "linear": """
merge_method: linear
models:
  - {{model: {base}, parameters: {{weight: 0.5}}}}
  - {{model: {a}, parameters: {{weight: 0.3}}}}
  - {{model: {b}, parameters: {{weight: 0.2}}}}
dtype: {dtype}
""",
    "slerp": """
merge_method: slerp
base_model: {base}
models: [{{model: {base}}}, {{model: {a}}}]
parameters: {{t: [0.2, 0.7]}}
dtype: {dtype}
""",
    "task_arithmetic": """
merge_method: task_arithmetic
base_model: {base}
models:
  - {{model: {a}, parameters: {{weight: 0.7}}}}
  - {{model: {b}, parameters: {{weight: 0.4}}}}
dtype: {dtype}
""",
    "ties": """
merge_method: ties
base_model: {base}
models:
  - {{model: {a}, parameters: {{weight: 0.6, density: 0.3}}}}
  - {{model: {b}, parameters: {{weight: 0.5, density: 0.7}}}}
dtype: {dtype}
""",
    "ties_rescale": """
merge_method: ties
base_model: {base}
models:
  - {{model: {a}, parameters: {{weight: 0.6, density: 0.3}}}}
  - {{model: {b}, parameters: {{weight: 0.5}}}}
parameters: {{rescale: true, lambda: 0.9}}
dtype: {dtype}
""",
    "dare_linear": """
merge_method: dare_linear
base_model: {base}
models:
  - {{model: {a}, parameters: {{weight: 0.6, density: 0.4}}}}
  - {{model: {b}, parameters: {{weight: 0.5, density: 0.6}}}}
dtype: {dtype}
""",
    "dare_ties": """
merge_method: dare_ties
base_model: {base}
models:
  - {{model: {a}, parameters: {{weight: 0.6, density: 0.4}}}}
  - {{model: {b}, parameters: {{weight: 0.5, density: 0.6}}}}
parameters: {{normalize: true}}
dtype: {dtype}
""",
    "dare_ties_no_rescale": """
merge_method: dare_ties
base_model: {base}
models:
  - {{model: {a}, parameters: {{weight: 0.6, density: 0.4}}}}
  - {{model: {b}, parameters: {{weight: 0.5, density: 0.6}}}}
parameters: {{rescale: false}}
dtype: {dtype}
""",
    "passthrough": """
merge_method: passthrough
models:
  - model: {a}
    parameters:
      scale: [{{filter: down_proj, value: 0.5}}, {{value: 1.0}}]
dtype: {dtype}
""",
}


@pytest.fixture
def small_reduction_chunks(monkeypatch):
    """Fixed-chunk sums over 64 elements, so chunk boundaries fall inside the tiny tensors."""
    monkeypatch.setattr(reductions, "CHUNK", 64)


def _merge(text, out, chunk_bytes):
    recipe = parse_recipe(text)
    plan, _ = run_merge(recipe, out, BuildOptions(chunk_bytes=chunk_bytes), write_card=False)
    return plan, read_tensors(out)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("method", sorted(RECIPES))
def test_chunked_merge_is_bit_identical(method, dtype, tiny_family, tmp_path, small_reduction_chunks):
    base, (a, b) = tiny_family("llama", hidden=64, vocab=200)
    text = RECIPES[method].format(base=base, a=a, b=b, dtype=dtype)
    plan, chunked = _merge(text, tmp_path / "chunked", CHUNK_BYTES)
    _, whole = _merge(text, tmp_path / "whole", None)

    parts = [o for o in plan.outputs if o.rows is not None]
    assert len({o.name for o in parts}) >= 10, "the tiny model's matrices should have been chunked"
    assert set(chunked) == set(whole)
    for name in whole:
        assert torch.equal(chunked[name], whole[name]), name


def test_statistics_passes_read_each_chunk_again(tiny_family, small_reduction_chunks):
    base, (a, b) = tiny_family("llama", hidden=64, vocab=200)
    plan = plan_merge(
        parse_recipe(RECIPES["ties_rescale"].format(base=base, a=a, b=b, dtype="bfloat16")), chunk_bytes=CHUNK_BYTES
    )
    embed = [o for o in plan.outputs if o.name == "model.embed_tokens.weight"]
    assert len(embed) > 1
    loads, seen = set(), set()

    def walk(task):
        if id(task) in seen:  # each pass's chunks share the state before them: visit it once
            return
        seen.add(id(task))
        if isinstance(task, LoadTensor):
            loads.add(task)
        for dep in task.dependencies():
            walk(dep)

    for output in embed:
        walk(output.task)
    # selection pass, spill pass (the ties at the threshold), rescale pass, merge pass: four
    # reads of each chunk of each of 3 models
    assert {task.pass_index for task in loads} == {0, 1, 2, 3}
    assert len(loads) == 4 * 3 * len(embed)
    assert all(task.rows is not None for task in loads)


@pytest.mark.parametrize("method, factor", [("ties", 4), ("slerp", 2), ("linear", 1)])
def test_fused_methods_with_statistics_passes_take_bigger_blocks(method, factor, tiny_family, small_reduction_chunks):
    from mkmerge.methods import fused

    if not fused.available():
        pytest.skip("numba is not installed")
    base, (a, b) = tiny_family("llama", hidden=64, vocab=200)
    text = RECIPES[method].format(base=base, a=a, b=b, dtype="bfloat16")
    plan = plan_merge(parse_recipe(text), chunk_bytes=CHUNK_BYTES)
    embed = [o for o in plan.outputs if o.name == "model.embed_tokens.weight"]
    # float32 inputs: 4 bytes an element; linear has no statistics pass, so no bigger blocks
    expected = row_chunks((200, 64), 4, CHUNK_BYTES * factor)
    assert [o.rows for o in embed] == expected


def test_chunk_sizes_follow_the_budget_and_alignment(monkeypatch):
    monkeypatch.setattr(reductions, "CHUNK", 16384)
    chunks = row_chunks((32000, 2048), 2, 32 * 1024**2)
    assert chunks[0] == (0, 8192) and chunks[-1][1] == 32000
    assert all((start * 2048) % 16384 == 0 for start, _ in chunks)
    assert all((stop - start) * 2048 * 2 <= 32 * 1024**2 for start, stop in chunks)
    assert row_chunks((5632, 2048), 2, 32 * 1024**2) is None  # fits: merged whole
    assert row_chunks((4096,), 2, 16) is None  # 1-D tensors are never cut
    # odd row widths still land on CHUNK boundaries
    odd = row_chunks((100000, 3200), 2, 8 * 1024**2)
    assert all((start * 3200) % 16384 == 0 for start, _ in odd)


def test_writer_places_parts_at_their_offsets(tmp_path):
    from mksuite.common.build import BuildOptions, build_model
    from mksuite.common.graph.tasks import Task

    class Const(Task):
        def __init__(self, value):
            self.value = value

        def execute(self, inputs, ctx):
            return self.value

    full = torch.arange(40, dtype=torch.float32).reshape(10, 4)
    outputs = [
        OutputTensor("w", torch.float32, (10, 4), Const(full[a:b].clone()), rows=(a, b))
        for a, b in [(6, 10), (0, 3), (3, 6)]
    ]
    build_model(outputs, {}, tmp_path / "out", BuildOptions(), finalize=lambda d: None)
    assert torch.equal(read_tensors(tmp_path / "out")["w"], full)
    assert math.prod(full.shape) == 40


def test_chunked_ties_replay_their_sort_on_disk_in_the_outputs_partial_directory(
    tiny_family, tmp_path, small_reduction_chunks, monkeypatch
):
    """A chunked tensor's ties at the top-k cut are replayed from a scratch file (spill): it
    lives in the output's partial directory, is unnamed, and the result is the whole merge's."""
    import tempfile
    import types

    from mkmerge.methods import sort_order

    base, (a, b) = tiny_family("llama", hidden=64, vocab=200)
    text = RECIPES["ties"].format(base=base, a=a, b=b, dtype="bfloat16")
    _, whole = _merge(text, tmp_path / "whole", None)
    monkeypatch.setattr(sort_order, "RESIDENT_WORDS", 300)  # partition on disk down to 300 words
    monkeypatch.setattr(sort_order, "WINDOW_WORDS", 1)
    opened = []

    def recording(*args, **kwargs):
        opened.append(kwargs.get("dir"))
        return tempfile.TemporaryFile(*args, **kwargs)

    # only the spill's scratch files (numba's cache, say, makes its own temporary files)
    monkeypatch.setattr(sort_order, "tempfile", types.SimpleNamespace(TemporaryFile=recording))
    partitions = []
    partition = sort_order._partition_spilled
    monkeypatch.setattr(
        sort_order, "_partition_spilled", lambda *args: partitions.append(args[1:3]) or partition(*args)
    )
    out = tmp_path / "out" / "chunked"
    _, chunked = _merge(text, out, CHUNK_BYTES)
    assert opened, "no tensor was spilled"
    assert any(last - first > 2 * 256 for first, last in partitions)  # two windows, not one
    assert all(d is not None and d.parent == out.parent and d.name.startswith(".chunked.partial-") for d in opened)
    assert sorted(p.name for p in out.parent.iterdir()) == ["chunked"]  # no partial directory left
    assert set(chunked) == set(whole)
    for name in whole:
        assert torch.equal(chunked[name], whole[name]), name
