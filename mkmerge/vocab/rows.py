"""Where each row of a model's rebuilt embedding comes from (docs/vocabulary.md), as pure data.

For one vocabulary-indexed tensor (``embed_tokens``, ``lm_head``) and one output vocabulary,
every participating model gets a :class:`RowSources`: for each output id, a row of its own
matrix, the token's *default embedding* (shared by all models), or the padding row. Nothing
here touches tensors; :mod:`mkmerge.vocab.align` applies the result.
"""

from __future__ import annotations

from array import array
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

# Markers in RowSources.own besides real row indices.
DEFAULT = -1  # the token's default embedding (RowSources.defaults)
PADDING = -2  # the mean of the model's other rebuilt rows (padding ids and ids no token holds)

# A default embedding: the mean of these (member, row) rows; () is a zero row.
DefaultRow = tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class Member:
    """One model's side of a vocabulary-indexed tensor.

    ``vocab`` holds only the tokens the model really has: ids below both its config
    ``vocab_size`` and its matrix's row count (a tokenizer entry past the matrix is missing,
    docs/vocabulary.md). ``real_rows`` is that same limit.
    """

    vocab: Mapping[str, int]
    real_rows: int


@dataclass(frozen=True)
class TokenRule:
    """A ``tokenizer.tokens`` entry resolved against this tensor's members.

    ``rows`` None means the automatic rule; otherwise the rows whose mean is the default.
    """

    rows: DefaultRow | None = None
    force: bool = False


@dataclass(frozen=True)
class RowSources:
    """How one model's matrix becomes ``size`` output rows.

    ``own`` packs one signed 64-bit entry per output row: a row of this model's matrix,
    :data:`DEFAULT` or :data:`PADDING`. It is bytes rather than a tuple so that tasks holding
    it stay small and hash fast (bytes cache their hash) for vocabularies of 150k tokens.
    ``defaults`` lists, for the rows marked DEFAULT, the member rows to average.
    """

    own: bytes
    defaults: tuple[tuple[int, DefaultRow], ...]
    real_rows: int
    size: int

    def own_rows(self) -> list[int]:
        return array("q", self.own).tolist()

    def is_identity(self, rows: int) -> bool:
        """True when the output is the input matrix unchanged (same rows, same order)."""
        return self.size == rows and not self.defaults and self.own == array("q", range(rows)).tobytes()


def automatic_default(
    token: str, members: Sequence[Member], participants: Sequence[int], base: int | None
) -> DefaultRow:
    """docs/vocabulary.md's automatic default embedding of ``token``.

    The only holder's row; zeros when no one has it; the base's row when the base has it;
    otherwise the mean of every holder's row.
    """
    holders = [m for m in participants if token in members[m].vocab]
    if len(holders) == 1:
        chosen = holders[0]
    elif base is not None and base in holders:
        chosen = base
    else:
        return tuple((m, members[m].vocab[token]) for m in holders)  # () when no one has it
    return ((chosen, members[chosen].vocab[token]),)


def row_sources(
    output_vocab: Mapping[str, int],
    size: int,
    members: Sequence[Member],
    participants: Sequence[int],
    base: int | None,
    rules: Mapping[str, TokenRule],
) -> tuple[list[RowSources], list[str]]:
    """Row sources for each participant (in ``participants`` order), and the tokens no one has.

    ``members`` may include models that only donate default rows (``tokens:`` sources);
    ``participants`` are the indices of the models being merged, ``base`` one of them or None.
    The second result lists output tokens that got a zero row because no participant holds
    them and no rule says otherwise (the caller warns).
    """
    defaults: dict[str, DefaultRow] = {}
    unheld: list[str] = []

    def default_of(token: str) -> DefaultRow:
        if token not in defaults:
            rule = rules.get(token)
            if rule is not None and rule.rows is not None:
                defaults[token] = rule.rows
            else:
                defaults[token] = automatic_default(token, members, participants, base)
                if not defaults[token]:
                    unheld.append(token)
        return defaults[token]

    forced = {token for token, rule in rules.items() if rule.force}
    result = []
    for m in participants:
        own = array("q", [PADDING]) * size
        needs_default: list[tuple[int, DefaultRow]] = []
        vocab = members[m].vocab
        for token, out_id in output_vocab.items():
            row = vocab.get(token)
            if row is not None and token not in forced:
                own[out_id] = row
            else:
                own[out_id] = DEFAULT
                needs_default.append((out_id, default_of(token)))
        result.append(RowSources(own.tobytes(), tuple(sorted(needs_default)), members[m].real_rows, size))
    return result, unheld
