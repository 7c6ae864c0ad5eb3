"""Slices -> the text of a mergekit ``passthrough`` recipe (what ``--print-recipe`` prints and what runs).

Written by hand rather than with ``yaml.dump`` so the layout is the one people write
(flow-style ``layer_range: [0, 16]``, one slice per block, a comment with the output
layers each slice becomes), and stays stable across PyYAML versions.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import yaml

from mkstack.modes import StackSlice


def recipe_text(
    slices: Sequence[StackSlice],
    *,
    dtype: str | None = None,
    out_dtype: str | None = None,
    comment: str | None = None,
) -> str:
    """A passthrough recipe stacking ``slices`` in order; ``comment`` becomes the header line(s)."""
    lines = [f"# {line}" if line else "#" for line in (comment or "").splitlines()]
    lines += ["merge_method: passthrough", "slices:"]
    first = 0
    for piece in slices:
        last = first + piece.length - 1
        where = f"output layer {first}" if first == last else f"output layers {first}-{last}"
        lines += [
            f"  # {where}",
            "  - sources:",
            f"      - model: {_scalar(piece.model)}",
            f"        layer_range: [{piece.start}, {piece.end}]",
        ]
        if piece.scale:
            lines += ["        parameters:", "          scale:"]
            for name, value in piece.scale:
                lines += [f"            - filter: {_scalar(name)}", f"              value: {_number(value)}"]
            lines.append("            - value: 1.0")
        first = last + 1
    if dtype:
        lines.append(f"dtype: {dtype}")
    if out_dtype:
        lines.append(f"out_dtype: {out_dtype}")
    return "\n".join(lines) + "\n"


def _scalar(text: str) -> str:
    """``text`` as a YAML scalar: plain when YAML reads it back unchanged, else double-quoted."""
    try:
        plain_ok = yaml.safe_load(f"key: {text}") == {"key": text} and "#" not in text
    except yaml.YAMLError:
        plain_ok = False
    return text if plain_ok else json.dumps(text)  # a JSON string is a valid YAML double-quoted scalar


def _number(value: float) -> str:
    return repr(float(value))
