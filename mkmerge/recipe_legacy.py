"""Recipe forms older mergekit versions accepted, rewritten to the modern form with a warning."""

from __future__ import annotations

from typing import Any

from mksuite.common.recipe import LineTable, RecipeWarning


def modernize(data: dict, lines: LineTable) -> tuple[dict, list[RecipeWarning]]:
    """``data`` with every legacy form rewritten, and one warning per rewrite."""
    return data, []


__all__ = ["modernize", "Any"]
