"""Running the tools from tests: a recipe text through the engine, or a CLI app in-process."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from typer.testing import CliRunner


def merge_recipe(text: str, out: Path, *, quiet_warnings: bool = False, **options) -> Path:
    """Parse ``text`` as a recipe and run it into ``out`` with ``BuildOptions(**options)``."""
    from mkmerge.methods import METHODS
    from mkmerge.recipe import parse_recipe
    from mkmerge.run import run_merge
    from mksuite.common.build import BuildOptions

    with warnings.catch_warnings():
        if quiet_warnings:
            warnings.simplefilter("ignore")
        run_merge(parse_recipe(text, known_methods=METHODS.keys()), out, BuildOptions(**options))
    return out


def merged_tensors(text: str, out: Path, *, quiet_warnings: bool = False, **options) -> dict[str, torch.Tensor]:
    """:func:`merge_recipe`, then every tensor of the output."""
    from tiny_models import read_tensors

    return read_tensors(merge_recipe(text, out, quiet_warnings=quiet_warnings, **options))


def invoke(app, *args, quiet: bool = True):
    """Run a Typer app in-process with ``args`` (and ``--quiet``); the CliRunner result."""
    return CliRunner().invoke(app, [*map(str, args), *(["--quiet"] if quiet else [])])
