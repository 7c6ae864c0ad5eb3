"""Reading a recipe file: bounded in size before a byte of it is parsed."""

from __future__ import annotations

from pathlib import Path

from mksuite.common.errors import RecipeError
from mksuite.common.recipe.yaml_lines import MAX_RECIPE_BYTES, check_recipe_size


def read_recipe_file(path: Path | str, *, what: str = "recipe") -> str:
    """The file's text; RecipeError when it is missing, unreadable, not UTF-8 or too large.

    ``what`` names the file in messages ("recipe", "config"). Reads at most one byte past
    the size bound, so a huge file or an endless device is refused without being read.
    """
    try:
        with open(path, "rb") as file:
            data = file.read(MAX_RECIPE_BYTES + 1)
    except FileNotFoundError:
        raise RecipeError(f"{what} file {path} does not exist") from None
    except (IsADirectoryError, PermissionError) as error:
        raise RecipeError(f"cannot read {what} {path}: {error}") from None
    except OSError as error:
        raise RecipeError(f"cannot read {what} {path}: {error.strerror or error}") from None
    if len(data) > MAX_RECIPE_BYTES:
        check_recipe_size("x" * (MAX_RECIPE_BYTES + 1), source_name=str(path))
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise RecipeError(f"cannot read {what} {path}: {error}") from None
