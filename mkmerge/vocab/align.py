"""The task that rebuilds one model's embedding or LM head for the output vocabulary."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mkmerge.vocab.rows import PADDING, DefaultRow, RowSources
from mksuite.common.graph import Task


def mean_row(tensors: Sequence[torch.Tensor], sources: DefaultRow, like: torch.Tensor) -> torch.Tensor:
    """The mean of the given (tensor, row) rows, averaged in float32; zeros when there are none."""
    if not sources:
        return torch.zeros(like.shape[1:], dtype=like.dtype, device=like.device)
    if len(sources) == 1:
        member, row = sources[0]
        return tensors[member][row].to(like.device)
    stacked = torch.stack([tensors[member][row].to(like.device, torch.float32) for member, row in sources])
    return stacked.mean(dim=0).to(like.dtype)


def align_rows(tensors: Sequence[torch.Tensor], own: int, rows: RowSources) -> torch.Tensor:
    """``tensors[own]`` rebuilt to ``rows.size`` rows as ``rows`` says (docs/vocabulary.md).

    The other tensors are only read for default embeddings. Padding rows are the float32
    mean of the rebuilt rows of the output's tokens (default rows included), cast back to
    the model's dtype: mergekit's rule.
    """
    matrix = tensors[own]
    index = torch.tensor(rows.own_rows(), dtype=torch.long, device=matrix.device)
    out = matrix.new_empty((rows.size, *matrix.shape[1:]))
    kept = index >= 0
    out[kept] = matrix.index_select(0, index[kept])
    for out_id, sources in rows.defaults:
        out[out_id] = mean_row(tensors, sources, matrix)
    padding = index == PADDING
    if bool(padding.any()):
        out[padding] = out[~padding].to(torch.float32).mean(dim=0).to(matrix.dtype)
    return out


@dataclass(frozen=True)
class AlignVocabulary(Task):
    """Rebuild ``inputs[own]`` (a vocabulary-indexed matrix) for the output vocabulary.

    ``inputs`` are the same tensor of every model that may donate a default row, in one fixed
    order, so the task of each merged model differs only in ``own`` and ``rows``.
    """

    inputs: tuple[Task, ...]
    own: int
    rows: RowSources

    def dependencies(self) -> tuple[Task, ...]:
        return self.inputs

    def execute(self, inputs: list[torch.Tensor], ctx) -> torch.Tensor:
        return align_rows(inputs, self.own, self.rows)

    def describe(self) -> str:
        return f"align vocabulary ({self.rows.size} rows)"
