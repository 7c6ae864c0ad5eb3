"""Name templates: `${layer_index}`-style placeholders, their substitution and reverse matching.

Only the braced form is a placeholder (docs/architectures.md); a bare `$layer_index` is literal text.
`${expert_index}` is our extension for per-expert tensors of MoE checkpoints, whose count
comes from the model's config rather than from the layer count.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

PLACEHOLDER = re.compile(r"\$\{([^}]*)\}")

LAYER = "layer_index"
COUNT = "num_layers"
EXPERT = "expert_index"

# placeholder text -> (variable, offset added to the variable's value)
KNOWN_PLACEHOLDERS: dict[str, tuple[str, int]] = {
    "layer_index": (LAYER, 0),
    "layer_index+1": (LAYER, 1),
    "layer_index-1": (LAYER, -1),
    "num_layers": (COUNT, 0),
    "num_layers+1": (COUNT, 1),
    "num_layers-1": (COUNT, -1),
    "expert_index": (EXPERT, 0),
}


def placeholders_in(text: str) -> list[str]:
    """The inner texts of every `${...}` in `text`, known or not, in order."""
    return PLACEHOLDER.findall(text)


def variables_in(text: str) -> set[str]:
    """Which variables (layer_index, num_layers, expert_index) `text` refers to."""
    return {KNOWN_PLACEHOLDERS[p][0] for p in placeholders_in(text) if p in KNOWN_PLACEHOLDERS}


def substitute(text: str, values: dict[str, int]) -> str:
    """Replace every known placeholder with its variable's value plus offset.

    Callers pass values for every variable the (already validated) template uses; a
    missing one is a programming error and raises KeyError.
    """

    def replace(match: re.Match[str]) -> str:
        variable, offset = KNOWN_PLACEHOLDERS[match.group(1)]
        return str(values[variable] + offset)

    return PLACEHOLDER.sub(replace, text)


@dataclass(frozen=True)
class TemplatePattern:
    """A layer template compiled for the reverse question: which layer is this name?"""

    regex: re.Pattern[str]
    groups: tuple[tuple[str, int], ...]  # (variable, offset) per capture group, in order

    @classmethod
    def compile(cls, template: str) -> TemplatePattern:
        parts: list[str] = []
        groups: list[tuple[str, int]] = []
        position = 0
        for match in PLACEHOLDER.finditer(template):
            parts.append(re.escape(template[position : match.start()]))
            parts.append(r"(\d+)")
            groups.append(KNOWN_PLACEHOLDERS[match.group(1)])
            position = match.end()
        parts.append(re.escape(template[position:]))
        return cls(re.compile("".join(parts)), tuple(groups))

    def layer_index(self, name: str) -> int | None:
        """The layer index `name` instantiates this template at, or None if it does not."""
        match = self.regex.fullmatch(name)
        if match is None:
            return None
        solved: dict[str, int] = {}
        for text, (variable, offset) in zip(match.groups(), self.groups):
            value = int(text) - offset
            # The same variable written twice (e.g. ${layer_index} and ${layer_index+1})
            # must agree, or the name only looks like the template.
            if value < 0 or solved.setdefault(variable, value) != value:
                return None
        layer = solved.get(LAYER)
        count = solved.get(COUNT)
        if layer is None or (count is not None and layer >= count):
            return None
        return layer
