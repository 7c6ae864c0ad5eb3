""" "Did you mean …?" for any misspelled name (recipe keys, methods, tensors, options), ranked by
edit distance then by the caller's order. Imports nothing beyond the standard library, so error
paths of the command line stay free of torch.

``difflib`` alone ranks `modles` closer to `modules` than to `models` (it does not count a
swapped pair as one slip). Typing slips are single edits, swaps included, so candidates are
ranked by optimal-string-alignment distance first; ties go to the candidate listed first, and
callers list the keys valid where the typo sits, most common first.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

SUGGEST_CUTOFF = 0.6
"""difflib ratio below which a candidate is not offered at all."""


def edit_distance(a: str, b: str) -> int:
    """Optimal string alignment distance: insertions, deletions, substitutions and adjacent swaps."""
    previous2: list[int] = []
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, start=1):
        current = [i] + [0] * len(b)
        for j, char_b in enumerate(b, start=1):
            cost = 0 if char_a == char_b else 1
            current[j] = min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + cost)
            if i > 1 and j > 1 and char_a == b[j - 2] and a[i - 2] == char_b:
                current[j] = min(current[j], previous2[j - 2] + 1)
        previous2, previous = previous, current
    return previous[len(b)]


def closest(name: str, candidates: Iterable[str], *, cutoff: float = SUGGEST_CUTOFF) -> str | None:
    """The candidate ``name`` most likely misspells, or None when none is close."""
    lowered = name.lower()
    ranked = []
    matcher = difflib.SequenceMatcher(None, lowered)
    for order, candidate in enumerate(dict.fromkeys(candidates)):
        matcher.set_seq2(candidate.lower())
        # The cheap upper bounds first, as difflib.get_close_matches: a model's tensor names
        # run to tens of thousands.
        if matcher.real_quick_ratio() < cutoff or matcher.quick_ratio() < cutoff:
            continue
        ratio = matcher.ratio()
        if ratio >= cutoff:
            ranked.append((edit_distance(lowered, candidate.lower()), order, -ratio, candidate))
    return min(ranked)[-1] if ranked else None


def suggestion(name: str, candidates: Iterable[str]) -> str | None:
    """``"did you mean `models`?"`` or None."""
    match = closest(name, candidates)
    return f"did you mean `{match}`?" if match is not None else None


def is_slip_of(name: str, candidate: str) -> bool:
    """True when ``name`` is a plausible typing slip of ``candidate`` (strict: one or two edits).

    Used to stop a run rather than warn, so it must not fire on merely similar words.
    """
    if name == candidate:
        return False
    distance = edit_distance(name.lower(), candidate.lower())
    allowed = 1 if len(candidate) <= 4 else 2
    if len(candidate) < 3 or distance > allowed:
        return False
    return difflib.SequenceMatcher(None, name.lower(), candidate.lower()).ratio() >= 0.75
