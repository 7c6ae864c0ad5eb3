"""Scheduling: a topological order of distinct tasks that keeps the working set small.

Output tensors are taken in plan order (which is also their order in the output files); each
output's task graph is laid out depth-first just before it is needed, so an input is read
shortly before its first use and, with consumer counts, freed right after its last one.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from mksuite.common.graph.tasks import OutputTensor, Task


@dataclass(frozen=True)
class Schedule:
    order: tuple[Task, ...]  # every distinct task once, dependencies first
    loads: tuple[tuple[int, Task], ...]  # (position in order, task) for I/O tasks
    consumers: dict[Task, int]  # how many uses each task's value has (edges + output roots)
    outputs_at: dict[int, tuple[OutputTensor, ...]]  # outputs whose value is ready at a position
    outputs: tuple[OutputTensor, ...]
    output_bytes: int


def build_schedule(outputs: Sequence[OutputTensor]) -> Schedule:
    """Lay out the distinct tasks of ``outputs`` in execution order."""
    position: dict[Task, int] = {}
    order: list[Task] = []
    consumers: Counter[Task] = Counter()

    def visit(root: Task) -> None:
        # Iterative post-order: deep graphs (long chains of casts) must not hit the recursion limit.
        stack: list[tuple[Task, bool]] = [(root, False)]
        while stack:
            task, expanded = stack.pop()
            if task in position:
                continue
            if expanded:
                position[task] = len(order)
                order.append(task)
                for dep in task.dependencies():
                    consumers[dep] += 1
                continue
            stack.append((task, True))
            for dep in reversed(task.dependencies()):
                if dep not in position:
                    stack.append((dep, False))

    outputs_at: dict[int, list[OutputTensor]] = {}
    seen: set[tuple[str, tuple[int, int] | None]] = set()
    for output in outputs:
        if output.key in seen:
            raise ValueError(f"internal error: output tensor {output.name} planned twice")
        seen.add(output.key)
        visit(output.task)
        consumers[output.task] += 1
        outputs_at.setdefault(position[output.task], []).append(output)

    loads = tuple((i, task) for i, task in enumerate(order) if task.is_io)
    return Schedule(
        order=tuple(order),
        loads=loads,
        consumers=dict(consumers),
        outputs_at={k: tuple(v) for k, v in outputs_at.items()},
        outputs=tuple(outputs),
        output_bytes=sum(o.nbytes for o in outputs),
    )
