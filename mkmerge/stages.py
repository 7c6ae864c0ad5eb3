"""Multi-stage recipes: several YAML documents in one file, each a recipe.

A document's ``name`` makes it a stage whose output other documents can use as a model: every
model reference whose path equals a stage name is rewritten to ``<intermediate dir>/<name>``
(revision, LoRA and architecture override kept), which also makes it a dependency. Stages are
ordered so each runs after the stages it uses (document order otherwise); a cycle is an error
naming its stages. At most one document may be unnamed: the final merge, written to OUT.

Where the outputs go:

* with an unnamed stage, named stages are written to ``<intermediate dir>/<name>``, the
  intermediate directory being ``--intermediate-dir``, by default OUT's sibling ``OUT.stages``;
* when every stage is named, there is no final model and each stage goes to ``OUT/<name>``.

Each stage's recipe is re-serialised after the rewrite (only the keys written in the file,
numeric lists in flow style); that text is what its model card and recipe copy hold. Errors
name the document and stage, and lines are lines of the whole file.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mkmerge.methods import METHODS
from mkmerge.recipe import MergeRecipe, recipe_from_document
from mkmerge.recipe_schema import TOKENIZER_SOURCE_KEYWORDS
from mksuite.common.errors import MkError, RecipeError
from mksuite.common.loading import ModelReference
from mksuite.common.recipe import YamlDocument, load_documents, read_recipe_file

STAGES_SUFFIX = ".stages"


@dataclass(frozen=True)
class Stage:
    """One document of a recipe file, ready to run: its (rewritten) recipe and where it goes."""

    document: int  # 1-based position in the file
    name: str | None
    recipe: MergeRecipe
    depends_on: tuple[str, ...]
    out: Path

    @property
    def label(self) -> str:
        return stage_label(self.document, self.name)


def stage_label(document: int, name: str | None) -> str:
    """How errors and progress name a stage: "stage `a` (document 1)"."""
    return f"{f'stage `{name}`' if name is not None else 'final stage'} (document {document})"


def load_stages(path: Path, *, out: Path, intermediate_dir: Path | None = None) -> list[Stage]:
    """Read a recipe file (one document or several) into stages; see :func:`parse_stages`."""
    return parse_stages(
        read_recipe_file(path),
        out=out,
        known_methods=METHODS.keys(),
        source_name=str(path),
        intermediate_dir=intermediate_dir,
    )


def parse_stages(
    text: str,
    *,
    out: Path,
    known_methods: Collection[str],
    source_name: str | None = None,
    intermediate_dir: Path | None = None,
) -> list[Stage]:
    """Parse every document of a recipe file into stages in the order they must run.

    Empty documents (a stray `---`) are skipped; documents keep their position in the file as
    their number. A file holding one recipe is one stage written to ``out`` whose recipe text
    is the file verbatim (a `name` is then ignored, as by mergekit-yaml).
    """
    loaded = load_documents(text, source_name=source_name)
    documents = {n: d for n, d in enumerate(loaded, start=1) if d.data is not None}
    if not documents:
        raise RecipeError(
            "the recipe is empty", file=source_name, hint="a recipe needs at least `merge_method` and `models`"
        )
    if len(documents) == 1:
        ((number, document),) = documents.items()
        recipe = recipe_from_document(document, text=text, known_methods=known_methods, source_name=source_name)
        return [Stage(number, None, recipe, (), Path(out))]
    names = _stage_names(documents, source_name)
    stage_dir = _intermediate_dir(list(names.values()), Path(out), intermediate_dir)
    paths = {name: str(stage_dir / name) for name in names.values() if name is not None}
    stages = []
    for number, document in documents.items():
        name = names[number]
        data, used = rewrite_references(document.data, paths)
        rewritten = YamlDocument(data, document.lines, document.duplicates, document.start_line)
        try:
            recipe = recipe_from_document(
                rewritten, text=dump_recipe(data), known_methods=known_methods, source_name=source_name
            )
        except MkError as error:
            raise error.within(stage_label(number, name)) from None
        stage_out = stage_dir / name if name is not None else Path(out)
        stages.append(Stage(number, name, recipe, tuple(used), stage_out))
    return dependency_order(stages, source_name)


# --- names and output locations -----------------------------------------------------------------


def _stage_names(documents: Mapping[int, YamlDocument], source_name: str | None) -> dict[int, str | None]:
    """Each document's `name` (None when unnamed): unique, at most one missing, usable as a directory."""
    names: dict[int, str | None] = {}
    seen: dict[str, int] = {}
    unnamed: list[int] = []
    for number, document in documents.items():
        data = document.data if isinstance(document.data, dict) else {}
        name = data.get("name")
        line = document.lines.exact(("name",)) or document.start_line
        if name is None:
            unnamed.append(number)
            if len(unnamed) > 1:
                first = documents[unnamed[0]].start_line
                raise RecipeError(
                    f"documents {unnamed[0]} (line {first}) and {number} (line {document.start_line}) both have "
                    "no `name`; only one document, the final merge, may be unnamed",
                    line=document.start_line,
                    file=source_name,
                    hint="give every intermediate stage a `name:` that later documents use as a model",
                )
        elif not isinstance(name, str) or not _usable_name(name):
            raise RecipeError(
                f"stage name {name!r} cannot name a directory",
                field="name",
                line=line,
                file=source_name,
                hint="use a plain name such as `stage1` (no `/`, not empty, not `.` or `..`)",
            )
        elif name in seen:
            raise RecipeError(
                f"stage name `{name}` is used by documents {seen[name]} and {number}; names must be unique",
                field="name",
                line=line,
                file=source_name,
            )
        else:
            seen[name] = number
        names[number] = name
    return names


def _usable_name(name: str) -> bool:
    return bool(name.strip()) and name not in (".", "..") and "/" not in name and "\\" not in name


def _intermediate_dir(names: list[str | None], out: Path, requested: Path | None) -> Path:
    if None in names:
        chosen = requested if requested is not None else out.with_name(out.name + STAGES_SUFFIX)
        return chosen.expanduser().absolute()
    if requested is not None and requested.expanduser().absolute() != out.expanduser().absolute():
        raise RecipeError(
            "every stage is named, so there is no final model: the stages are written to OUT/<name> "
            "and --intermediate-dir has nothing to do",
            field="--intermediate-dir",
            hint="drop --intermediate-dir, or leave the final document without a `name`",
        )
    return out.expanduser().absolute()


# --- reference rewriting -----------------------------------------------------------------------


def rewrite_references(data: Any, paths: Mapping[str, str]) -> tuple[Any, list[str]]:
    """A copy of raw recipe ``data`` with references to stages pointed at their outputs.

    Returns the copy and the stage names used, in order of first use. Values that do not
    parse as references are left as they are (validation reports them at their line).
    """
    data = _deep_copy(data)
    used: list[str] = []
    for container, key in _reference_slots(data):
        value, name = _rewritten(container[key], paths)
        if name is not None:
            container[key] = value
            used += [name] if name not in used else []
    return data, used


def _deep_copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deep_copy(v) for v in value]
    return value


def _reference_slots(data: Any) -> Iterator[tuple[dict, str]]:
    """(mapping, key) of every place a recipe holds a model reference."""
    if not isinstance(data, dict):
        return
    yield from _slots_of_merge(data)
    modules = data.get("modules")
    for module in _dicts(list(modules.values()) if isinstance(modules, dict) else []):
        yield from _slots_of_merge(module)
    for owner in (data, data.get("tokenizer")):
        key = "tokenizer_source" if owner is data else "source"
        if isinstance(owner, dict) and key in owner and owner[key] not in TOKENIZER_SOURCE_KEYWORDS:
            yield owner, key
    tokens = data["tokenizer"].get("tokens") if isinstance(data.get("tokenizer"), dict) else None
    for token in _dicts(list(tokens.values()) if isinstance(tokens, dict) else []):
        source = token.get("source")
        if isinstance(source, dict) and "kind" in source:
            if source.get("kind") == "model_token" and "model" in source:
                yield source, "model"
        elif source is not None:
            yield token, "source"


def _slots_of_merge(block: dict) -> Iterator[tuple[dict, str]]:
    if "base_model" in block:
        yield block, "base_model"
    for entry in _dicts(block.get("models")):
        if "model" in entry:
            yield entry, "model"
    for output_slice in _dicts(block.get("slices")):
        if "base_model" in output_slice:
            yield output_slice, "base_model"
        for source in _dicts(output_slice.get("sources")):
            if "model" in source:
                yield source, "model"


def _dicts(value: Any) -> list[dict]:
    return [item for item in value if isinstance(item, dict)] if isinstance(value, list) else []


def _rewritten(value: Any, paths: Mapping[str, str]) -> tuple[Any, str | None]:
    """(new value, stage name) when ``value`` references a stage, else (value, None)."""
    if value is None:
        return value, None
    try:
        ref = ModelReference.parse(value)
    except RecipeError:
        return value, None
    if ref.path not in paths:
        return value, None
    path = paths[ref.path]
    if isinstance(value, str) and not any(c in path for c in "@+"):
        return str(ModelReference(path, ref.revision, ref.lora)), ref.path
    mapping: dict[str, Any] = {"model": _path_mapping(ModelReference(path, ref.revision))}
    if ref.lora is not None:
        mapping["lora"] = _path_mapping(ref.lora)
    if ref.override_architecture is not None:
        mapping["override_architecture"] = ref.override_architecture
    return mapping, ref.path


def _path_mapping(ref: ModelReference) -> dict[str, str]:
    return {"path": ref.path} | ({"revision": ref.revision} if ref.revision is not None else {})


# --- re-serialising ------------------------------------------------------------------------------


class _RecipeDumper(yaml.SafeDumper):
    """Block style, except lists of numbers (layer ranges, gradients), which read best inline."""


def _represent_list(dumper: yaml.SafeDumper, value: list) -> yaml.Node:
    numeric = bool(value) and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", value, flow_style=numeric)


_RecipeDumper.add_representer(list, _represent_list)


def dump_recipe(data: Any) -> str:
    """YAML text of raw recipe data, keys in their original order."""
    return yaml.dump(data, Dumper=_RecipeDumper, sort_keys=False, default_flow_style=False, allow_unicode=True)


# --- ordering ----------------------------------------------------------------------------------


def dependency_order(stages: list[Stage], source_name: str | None = None) -> list[Stage]:
    """Stages ordered so each follows those it uses; document order breaks ties."""
    by_name = {stage.name: stage for stage in stages if stage.name is not None}
    done: set[str] = set()
    ordered: list[Stage] = []
    remaining = list(stages)
    while remaining:
        ready = next((s for s in remaining if all(d in done for d in s.depends_on)), None)
        if ready is None:
            cycle = _find_cycle(remaining, by_name)
            first = by_name[cycle[0]]
            raise RecipeError(
                "stages use each other in a cycle: " + " -> ".join(f"`{n}`" for n in cycle + [cycle[0]]),
                field="name",
                line=first.recipe.line_of(("name",)),
                file=source_name,
                hint="a stage can only use stages that do not (directly or indirectly) use it",
            )
        ordered.append(ready)
        remaining.remove(ready)
        if ready.name is not None:
            done.add(ready.name)
    return ordered


def _find_cycle(remaining: list[Stage], by_name: Mapping[str, Stage]) -> list[str]:
    """Names along one cycle among stages that can never become ready."""
    blocked = {s.name for s in remaining if s.name is not None}
    start = next(s for s in remaining if s.name is not None and any(d in blocked for d in s.depends_on))
    path: list[str] = [start.name]
    while True:
        following = next(d for d in by_name[path[-1]].depends_on if d in blocked)
        if following in path:
            return path[path.index(following) :]
        path.append(following)
