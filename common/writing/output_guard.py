"""Where an output may go: never onto, into or around an input, never over a foreign folder.

Replacing OUT deletes what was there, so two promises are checked before any tensor is read:

* OUT is not an input, does not contain one and does not lie inside one. "Input" is every
  path the run reads or depends on: model directories (by the path given and by their real
  location, so a symlinked model is caught either way; a Hub snapshot counts as its whole
  ``models--org--name`` cache folder, whose ``snapshots/`` point into ``blobs/``), the files
  a model directory links to elsewhere, LoRA adapters, recipe and config files, other stages'
  outputs. This holds with or without ``--overwrite``: writing inside a model pollutes it.
* ``--overwrite`` replaces only a directory that looks like a model output: nothing in it
  but files a model directory holds (weights, JSON, tokenizer and card files, custom code)
  and ``config.json`` among them. A home folder, a project checkout or a folder of models
  fails this and is refused: the user removes it, deliberately, with their own tools.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from mksuite.common.errors import OutputError

# What a model output directory may hold (ours, or one downloaded from the Hub).
MODEL_FILE_PATTERNS = (
    "*.safetensors",
    "*.bin",
    "*.pt",
    "*.pth",
    "*.json",
    "*.model",
    "*.tiktoken",
    "*.txt",
    "*.md",
    "*.yml",
    "*.yaml",
    "*.jinja",
    "*.py",
    "*.gguf",
    ".gitattributes",
    "LICENSE*",
    "NOTICE*",
    "USE_POLICY*",
)
# Per directory, a model never has more entries than this; a bigger one is something else.
_MAX_ENTRIES = 10_000


def real_path(path: Path | str) -> Path:
    """``path`` with every symlink resolved, for the part that exists (the rest appended)."""
    return Path(os.path.realpath(Path(path).expanduser().absolute()))


def _hub_repo_folder(path: Path) -> Path | None:
    """The ``models--org--name`` cache folder of a snapshot directory, or None."""
    if path.parent.name == "snapshots" and path.parent.parent.name.split("--")[0] in ("models", "datasets", "spaces"):
        return path.parent.parent
    return None


def input_roots(path: Path | str) -> set[Path]:
    """Every location whose removal would lose (part of) the input at ``path``."""
    given = Path(os.path.abspath(Path(path).expanduser()))
    real = real_path(given)
    roots = {given, real}
    for candidate in (given, real):
        repo = _hub_repo_folder(candidate)
        if repo is not None:
            roots.add(repo)
    if real.is_dir():
        try:
            with os.scandir(real) as entries:
                for count, entry in enumerate(entries):
                    if count >= _MAX_ENTRIES:
                        break
                    if entry.is_symlink():  # a file the model links to elsewhere (e.g. a Hub blob)
                        roots.add(real_path(entry.path))
        except OSError:
            pass  # unreadable: the loader reports it
    return roots


def _relation(out: Path, root: Path) -> str | None:
    if out == root:
        return "is"
    if root.is_relative_to(out):
        return "contains"
    if out.is_relative_to(root):
        return "lies inside"
    return None


def check_not_an_input(out: Path | str, inputs: Iterable[RunInput]) -> None:
    """Refuse (exit 8) when OUT is, contains or lies inside any input."""
    given = Path(os.path.abspath(Path(out).expanduser()))
    out_forms = {given, real_path(given)}
    for item in inputs:
        what, path = item.kind, item.path
        for root in input_roots(path):
            for form in out_forms:
                relation = _relation(form, root)
                if relation is None:
                    continue
                where = str(path) if root == Path(os.path.abspath(path)) else f"{path} (at {root})"
                raise OutputError(
                    f"the output directory {out} {relation} {what}: {where}; writing there could destroy an input",
                    hint="choose an output directory outside every input model, adapter, recipe and intermediate",
                )


def foreign_entries(directory: Path) -> list[str]:
    """Entries of ``directory`` a model output never holds (sorted; empty when it looks like one)."""
    foreign = []
    names = []
    with os.scandir(directory) as entries:
        for count, entry in enumerate(entries):
            if count >= _MAX_ENTRIES:
                foreign.append(f"(more than {_MAX_ENTRIES} entries)")
                break
            names.append(entry.name)
            if entry.is_dir(follow_symlinks=False):
                foreign.append(entry.name + "/")
            elif not entry.is_file(follow_symlinks=False) and not entry.is_symlink():
                foreign.append(entry.name)
            elif not any(fnmatch.fnmatchcase(entry.name, pattern) for pattern in MODEL_FILE_PATTERNS):
                foreign.append(entry.name)
    if names and "config.json" not in names and not foreign:
        foreign.append("(no config.json)")
    return sorted(foreign)


def check_replaceable(out: Path) -> None:
    """Refuse to replace a non-empty OUT that does not look like a model directory."""
    try:
        foreign = foreign_entries(out)
    except OSError as error:
        raise OutputError(f"cannot read {out} to check it can be replaced: {error.strerror or error}") from None
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise OutputError(
            f"--overwrite refuses to replace {out}: it does not look like a model directory (it holds {shown})",
            hint="--overwrite replaces only a model directory (weights, JSON, tokenizer and card files with "
            "config.json); remove that folder yourself or choose another output directory",
        )


@dataclass(frozen=True)
class RunInput:
    """One path a run reads: ``kind`` says what it is in messages; ``name`` is how the card names it."""

    kind: str
    path: Path
    name: str | None = None


def model_inputs(models: Iterable, *, cache_dir: str | None = None) -> list[RunInput]:
    """The paths of opened input models (``InputModel``s) and of their LoRA adapters."""
    from mksuite.common.loading import resolve_model_path

    found = []
    for model in models:
        found.append(RunInput(f"input model `{model.ref}`", Path(model.path), str(model.ref)))
        if model.ref.lora is not None:
            adapter = resolve_model_path(model.ref.lora, cache_dir=cache_dir)  # resolved once already
            found.append(RunInput(f"LoRA adapter `{model.ref.lora}`", Path(adapter)))
    return found


def file_input(kind: str, path: Path | str | None) -> list[RunInput]:
    """A recipe or config file as an input (nothing when there is no such file)."""
    if path is None or not Path(path).exists():
        return []
    return [RunInput(kind, Path(path))]
