"""Output tensors that are input bytes verbatim, copied file to file instead of computed.

A passthrough layer, a stacked model's repeated block, an MoE expert taken whole from a dense
model: the output is a stored tensor (or a row block of one) in the same dtype. Such outputs
skip the task graph: the writer copies their bytes straight from the input file
(``copy_file_range``), so they never occupy process memory and cost no Python per byte.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from mksuite.common.graph.tasks import CastTensor, LoadTensor, OutputTensor
from mksuite.common.loading.source import ByteRange, byte_range


def split_direct_copies(
    outputs: Sequence[OutputTensor], sources: Mapping[str, object]
) -> tuple[list[tuple[OutputTensor, ByteRange]], list[OutputTensor]]:
    """(outputs copied verbatim with where their bytes lie, outputs that must be computed)."""
    copies: list[tuple[OutputTensor, ByteRange]] = []
    computed: list[OutputTensor] = []
    for output in outputs:
        where = _verbatim_bytes(output, sources)
        if where is None:
            computed.append(output)
        else:
            copies.append((output, where))
    return copies, computed


def _verbatim_bytes(output: OutputTensor, sources: Mapping[str, object]) -> ByteRange | None:
    task = output.task
    while isinstance(task, CastTensor) and task.dtype == output.dtype:
        task = task.input  # a cast to the dtype the bytes already have is no cast at all
    if not isinstance(task, LoadTensor):
        return None
    source = sources.get(task.model)
    if source is None:
        return None
    info = source.info(task.name)
    if info.dtype != output.dtype:
        return None
    if task.rows is None:
        shape = info.shape
    else:
        shape = (task.rows[1] - task.rows[0], *info.shape[1:])
    if tuple(shape) != tuple(output.part_shape):
        return None
    return byte_range(source, task.name, task.rows)
