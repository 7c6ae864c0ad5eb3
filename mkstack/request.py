"""The torch-free half of mkstack: recipes and mode flags, checked before the engine loads.

A recipe error or a bad combination of mode flags is reported without importing torch;
mkstack/stack.py (planning and running) re-exports these names.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from mkmerge.methods import METHODS
from mkmerge.recipe import MergeRecipe, parse_recipe
from mksuite.common.errors import RecipeError
from mksuite.common.recipe import read_recipe_file

GENERATED_RECIPE = "mkstack (generated recipe)"


class StackWarning(UserWarning):
    """A per-layer config setting that the stack cannot carry over faithfully."""


# --- recipes ------------------------------------------------------------------------------


def require_passthrough(recipe: MergeRecipe) -> MergeRecipe:
    """``recipe`` itself; RecipeError for any other merge method (those belong to mkmerge)."""
    if recipe.merge_method != "passthrough":
        raise RecipeError(
            f"mkstack runs `passthrough` recipes only, and this one uses `{recipe.merge_method}`",
            field="merge_method",
            line=recipe.line_of(("merge_method",)),
            file=recipe.source_name,
            hint=f"run it with mkmerge: `mkmerge {recipe.source_name or 'RECIPE'} OUT`",
        )
    return recipe


def load_stack_recipe(path: Path) -> MergeRecipe:
    """Read and validate a recipe file for mkstack."""
    text = read_recipe_file(path)
    return require_passthrough(parse_recipe(text, known_methods=METHODS.keys(), source_name=str(path)))


def parse_stack_recipe(text: str) -> MergeRecipe:
    """Parse a recipe mkstack generated (the same parser mkmerge uses)."""
    return require_passthrough(parse_recipe(text, known_methods=METHODS.keys(), source_name=GENERATED_RECIPE))


# --- command-line modes -------------------------------------------------------------------


@dataclass(frozen=True)
class ModeRequest:
    """The command-line mode flags, before any model is opened.

    Model names may be ``--model NAME=REF`` aliases; :meth:`ref` resolves them.
    """

    slices: tuple[str, ...] = ()
    interleave: tuple[str, str] | None = None
    upscale: str | None = None
    expand: str | None = None
    window: int | None = None
    overlap: int | None = None
    every: int | None = None
    aliases: Mapping[str, str] = field(default_factory=dict)

    @property
    def mode(self) -> str | None:
        """Which mode is asked for (None: none); RecipeError if several are."""
        given = [
            name
            for name, value in (
                ("--slice", self.slices),
                ("--interleave", self.interleave),
                ("--upscale", self.upscale),
                ("--expand", self.expand),
            )  # fmt: skip
            if value
        ]
        if len(given) > 1:
            raise RecipeError(
                f"{' and '.join(given)} cannot be combined; give one mode per run",
                hint="for anything more elaborate, print a recipe with --print-recipe and edit it",
            )
        mode = given[0] if given else None
        self._check_numbers(mode)
        return mode

    def ref(self, token: str) -> str:
        return self.aliases.get(token, token)

    def model_refs(self) -> list[str]:
        """Every model the request names, resolved, in order of first mention."""
        from mkstack.modes import parse_slice_arg

        tokens = [parse_slice_arg(text, self.aliases).model for text in self.slices]
        tokens += [self.ref(t) for t in (*(self.interleave or ()), self.upscale, self.expand) if t]
        return list(dict.fromkeys(tokens))

    def _check_numbers(self, mode: str | None) -> None:
        needs = {"--interleave": ("--window", "--overlap"), "--upscale": ("--overlap",), "--expand": ("--every",)}
        values = {"--window": self.window, "--overlap": self.overlap, "--every": self.every}
        wanted = needs.get(mode or "", ())
        for option, value in values.items():
            if value is not None and option not in wanted:
                used_by = [m for m, options in needs.items() if option in options]
                raise RecipeError(
                    f"{option} applies to {' and '.join(used_by)}, not to {mode or 'recipe mode'}",
                    field=option,
                )
        for option, value in values.items():
            if value is None and option in wanted:
                raise RecipeError(f"{mode} needs {option}", field=option, hint=_EXAMPLES[mode])


_EXAMPLES = {
    "--interleave": "e.g. --interleave A B --window 16 --overlap 8 (Goliath-120B)",
    "--upscale": "e.g. --upscale A --overlap 8 (SOLAR-10.7B: 32 layers -> 48)",
    "--expand": "e.g. --expand A --every 4 (LLaMA Pro: 32 layers -> 40)",
}
