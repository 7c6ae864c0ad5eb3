"""Tensors merged in the most row blocks are computed first; the output bytes do not change."""

from __future__ import annotations

import torch

from mksuite.common.build import compute_order, front_loaded
from mksuite.common.graph import LoadTensor, OutputTensor


def outputs(parts: dict[str, int]) -> list[OutputTensor]:
    found = []
    for name, count in parts.items():
        for part in range(count):
            rows = (part, part + 1) if count > 1 else None
            task = LoadTensor("m", f"{name}.{part}", 8)
            found.append(OutputTensor(name, torch.float32, (count, 2), task, rows))
    return found


def test_the_tensors_with_the_most_row_blocks_go_first_and_the_rest_keep_plan_order():
    planned = outputs({"embed": 3, "layer.0.a": 1, "layer.0.b": 2, "layer.1.a": 1, "head": 3})
    ordered = compute_order(planned)
    assert [o.name for o in ordered] == ["embed"] * 3 + ["head"] * 3 + [
        "layer.0.a",
        "layer.0.b",
        "layer.0.b",
        "layer.1.a",
    ]
    assert sorted(map(id, ordered)) == sorted(map(id, planned))  # the same outputs, reordered


def test_nothing_moves_when_every_tensor_is_one_block():
    planned = outputs({"a": 1, "b": 1, "c": 1})
    assert compute_order(planned) == planned
    assert front_loaded({"a": 1, "b": 1}) == set()
