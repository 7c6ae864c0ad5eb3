"""docs/vocabulary.md row rules on hand-made vocabularies, and the task that applies them, on small tensors."""

from __future__ import annotations

import torch

from mkmerge.vocab.align import align_rows
from mkmerge.vocab.rows import DEFAULT, PADDING, Member, TokenRule, row_sources

# Output vocabulary a, b, c, d, e at ids 0..4; base (0) has a, b, c; m1 has a, c, d; m2 has a, b, d.
OUT = {"a": 0, "b": 1, "c": 2, "d": 3, "e": 4}
MEMBERS = [
    Member({"a": 0, "b": 1, "c": 2}, real_rows=3),
    Member({"c": 0, "a": 1, "d": 2}, real_rows=3),
    Member({"d": 0, "b": 1, "a": 2}, real_rows=4),
]


def sources(rules=None, base=0, size=5, members=MEMBERS, participants=(0, 1, 2)):
    return row_sources(OUT, size, members, list(participants), base, rules or {})


def test_own_rows_are_kept_and_missing_tokens_take_the_automatic_default():
    (base, m1, m2), unheld = sources()
    assert base.own_rows() == [0, 1, 2, DEFAULT, DEFAULT]
    assert m1.own_rows() == [1, DEFAULT, 0, 2, DEFAULT]
    assert m2.own_rows() == [2, 1, DEFAULT, 0, DEFAULT]
    # d: held by m1 and m2, not the base -> their mean; e: held by no one -> zeros (reported).
    assert dict(base.defaults) == {3: ((1, 2), (2, 0)), 4: ()}
    # b: base and m2 hold it -> the base's row; c: base and m1 -> the base's row.
    assert dict(m1.defaults) == {1: ((0, 1),), 4: ()}
    assert dict(m2.defaults) == {2: ((0, 2),), 4: ()}
    assert unheld == ["e"]


def test_without_a_base_a_token_held_by_several_takes_their_mean():
    (m1,), _ = sources(base=None, participants=(1,))
    assert dict(m1.defaults)[1] == ()  # b: m1 is the only participant and lacks it
    (_, m1, _), _ = sources(base=None)
    assert dict(m1.defaults)[1] == ((0, 1), (2, 1))


def test_a_token_only_one_model_holds_takes_that_row_even_with_a_base():
    members = [Member({"a": 0}, 1), Member({"a": 0, "b": 1}, 2)]
    (base, _), _ = row_sources({"a": 0, "b": 1}, 2, members, [0, 1], 0, {})
    assert dict(base.defaults) == {1: ((1, 1),)}


def test_forced_tokens_use_the_default_even_where_the_model_has_the_token():
    rules = {"a": TokenRule(rows=((2, 2),), force=True), "b": TokenRule(force=True)}
    (base, m1, m2), _ = sources(rules)
    for rows in (base, m1, m2):
        assert rows.own_rows()[0] == DEFAULT and dict(rows.defaults)[0] == ((2, 2),)
    # b forced without a source: the automatic rule, which picks the base's row.
    assert dict(m2.defaults)[1] == ((0, 1),)
    assert base.own_rows()[1] == DEFAULT


def test_configured_zero_rows_are_not_reported_as_unheld():
    (_, _, _), unheld = sources({"e": TokenRule(rows=())})
    assert unheld == []


def test_padding_and_unused_ids_are_marked_padding():
    (base, _, _), _ = sources(size=8)
    assert base.own_rows()[5:] == [PADDING] * 3
    assert base.size == 8 and base.real_rows == 3


def test_identity_is_detected_only_for_the_unchanged_matrix():
    members = [Member({"a": 0, "b": 1}, 2)]
    (same,), _ = row_sources({"a": 0, "b": 1}, 2, members, [0], None, {})
    (padded,), _ = row_sources({"a": 0, "b": 1}, 4, members, [0], None, {})
    (swapped,), _ = row_sources({"b": 0, "a": 1}, 2, members, [0], None, {})
    assert same.is_identity(2)
    assert not same.is_identity(3)  # the model has a third row the output drops
    assert not padded.is_identity(2) and not swapped.is_identity(2)


def test_align_rows_builds_the_matrix_the_sources_describe():
    gen = torch.Generator().manual_seed(0)
    tensors = [torch.randn(rows, 4, generator=gen) for rows in (3, 3, 5)]
    (base, m1, m2), _ = sources(size=7)
    out = align_rows(tensors, 1, m1)
    b_, c_, m2_ = tensors
    expected = torch.stack(
        [
            c_[1],  # a: own row 1
            b_[1],  # b: missing -> base's row
            c_[0],  # c: own row 0
            c_[2],  # d: own row 2
            torch.zeros(4),  # e: no one has it
        ]
    )
    # padding: the mean of m1's rebuilt rows a..e (defaults included), as mergekit fills it
    expected = torch.cat([expected, expected.mean(0).expand(2, -1)])
    assert torch.equal(out[:5], expected[:5])
    torch.testing.assert_close(out[5:], expected[5:], rtol=0, atol=1e-7)
    # d for the base: mean of m1's row 2 and m2's row 0; m2's padding uses its 4 real rows only.
    torch.testing.assert_close(align_rows(tensors, 0, base)[3], (c_[2] + m2_[0]) / 2, rtol=0, atol=1e-7)
    m2_rows = align_rows(tensors, 2, m2)
    torch.testing.assert_close(m2_rows[6], m2_rows[:5].mean(0), rtol=0, atol=1e-7)


def test_align_rows_keeps_the_dtype_and_averages_in_float32():
    rows = [torch.tensor([[1.0, 2.0], [3.0, 5.0]], dtype=torch.bfloat16)]
    (only,), _ = row_sources({"b": 0, "a": 1}, 3, [Member({"a": 0, "b": 1}, 2)], [0], None, {})
    out = align_rows(rows, 0, only)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out[:2], rows[0][[1, 0]])
    assert torch.equal(out[2], torch.tensor([2.0, 3.5], dtype=torch.bfloat16))  # padding: the rows' mean
