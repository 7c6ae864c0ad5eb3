"""YAML loading that remembers where every key and list item sits in the file.

Recipes are plain YAML, but validation errors must point at a line. We compose PyYAML's node
graph (which carries marks) and build ordinary dicts/lists ourselves, recording for every
mapping key and sequence item the 1-based line it starts on, under a path tuple such as
``("slices", 0, "sources", 1, "layer_range")``.

Two deliberate departures from ``yaml.safe_load``:

* ``1e-5`` (an exponent without a dot) loads as a float. YAML 1.1, which PyYAML follows,
  reads it as a string, and parameter values that are strings are rejected; recipes write
  ``epsilon: 1e-5`` often enough that this must simply work. Quoted ``"1e-5"`` stays a string.
* Duplicate keys in one mapping are reported (the later value still wins, as with safe_load).

Recipes are untrusted text, so loading is bounded: the text's size (:data:`MAX_RECIPE_BYTES`),
the number of values after aliases and ``<<:`` merge keys are expanded (:data:`MAX_NODES`, which
stops "billion laughs" alias bombs after a few milliseconds and a few MB) and the nesting depth
(:data:`MAX_DEPTH`). Real recipes stay orders of magnitude below each bound.
"""

from __future__ import annotations

import re
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

import yaml

from mksuite.common.errors import RecipeError

Path = tuple[Hashable, ...]

MAX_RECIPE_BYTES = 2 * 1024 * 1024
MAX_NODES = 100_000
MAX_DEPTH = 64
_LIMIT_HINT = "recipes are small, hand-written files; check that this is the file you meant"

# YAML 1.2 float syntax, so that `1e-5`, `1E+3` and `-2e4` are numbers. Resolvers are
# consulted per first character, hence the explicit list.
_FLOAT_WITH_EXPONENT = re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")


class _LineLoader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 exponent floats and a nesting bound; lines are recorded in :class:`_Builder`."""

    source_name: str | None = None
    _depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        # The composer recurses per nesting level: bound it before Python's stack gives out.
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise RecipeError(
                    f"the recipe nests lists or mappings more than {MAX_DEPTH} levels deep",
                    line=self.peek_event().start_mark.line + 1,
                    file=self.source_name,
                    hint=_LIMIT_HINT,
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


_LineLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_WITH_EXPONENT, list("-+0123456789"))


@dataclass(frozen=True)
class DuplicateKey:
    """A key given twice in one mapping: the later value wins."""

    path: Path
    first_line: int
    second_line: int


@dataclass(frozen=True)
class LineTable:
    """Maps path tuples to the 1-based line where that key or list item starts.

    The empty path maps to the document's first line.
    """

    lines: dict[Path, int] = field(default_factory=dict)

    def exact(self, path: Path) -> int | None:
        """The recorded line for exactly this path, or None."""
        return self.lines.get(tuple(path))

    def nearest(self, path: Path) -> int | None:
        """The line of ``path``, else of its nearest recorded ancestor (for fields that are missing)."""
        path = tuple(path)
        while True:
            line = self.lines.get(path)
            if line is not None or not path:
                return line
            path = path[:-1]


@dataclass(frozen=True)
class YamlDocument:
    """One YAML document as plain Python data plus where each part of it came from."""

    data: Any
    lines: LineTable
    duplicates: tuple[DuplicateKey, ...]
    start_line: int


def format_path(path: Path) -> str:
    """Render a path tuple in recipe notation: ``slices[0].sources[1].layer_range``."""
    text = ""
    for part in path:
        if isinstance(part, int) and not isinstance(part, bool):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text


def load_documents(text: str, *, source_name: str | None = None) -> list[YamlDocument]:
    """Parse every document in ``text``; malformed YAML raises RecipeError with its line."""
    check_recipe_size(text, source_name=source_name)
    loader = _LineLoader(text)
    loader.source_name = source_name
    budget = _NodeBudget(source_name)
    try:
        documents = []
        while loader.check_node():
            node = loader.get_node()
            documents.append(_document_from_node(loader, node, source_name, budget))
        return documents
    except RecursionError:
        raise RecipeError(
            "the recipe nests lists or mappings too deeply to be read", file=source_name, hint=_LIMIT_HINT
        ) from None
    except yaml.MarkedYAMLError as exc:
        raise _syntax_error(exc, source_name) from None
    except yaml.YAMLError as exc:  # unmarked errors (rare: e.g. bad encoding)
        raise RecipeError(f"the recipe is not valid YAML: {exc}", file=source_name) from None
    finally:
        loader.dispose()


def load_document(text: str, *, source_name: str | None = None) -> YamlDocument:
    """Parse text holding exactly one YAML document (an empty text gives ``data=None``)."""
    documents = load_documents(text, source_name=source_name)
    if len(documents) > 1:
        raise RecipeError(
            f"the file holds {len(documents)} YAML documents separated by `---`, but a single recipe was expected",
            line=documents[1].start_line,
            file=source_name,
            hint="`mkmerge` runs multi-stage recipes (several documents); this tool takes one recipe",
        )
    if not documents:
        return YamlDocument(data=None, lines=LineTable(), duplicates=(), start_line=1)
    return documents[0]


def check_recipe_size(text: str, *, source_name: str | None = None) -> None:
    """Refuse recipe text over :data:`MAX_RECIPE_BYTES` before any of it is parsed."""
    if len(text) > MAX_RECIPE_BYTES or len(text.encode("utf-8", "surrogatepass")) > MAX_RECIPE_BYTES:
        raise RecipeError(
            f"the recipe is larger than {MAX_RECIPE_BYTES // (1024 * 1024)} MiB, the most a recipe may be",
            file=source_name,
            hint=_LIMIT_HINT,
        )


class _NodeBudget:
    """Counts values built across a file's documents, so expanded aliases cannot grow without bound."""

    def __init__(self, source_name: str | None):
        self.source_name = source_name
        self.used = 0

    def spend(self, count: int, node: yaml.Node) -> None:
        self.used += count
        if self.used > MAX_NODES:
            raise RecipeError(
                f"the recipe expands to more than {MAX_NODES:,} values (YAML aliases `*name` and merge keys "
                "`<<:` repeat what they point at); refusing to expand it further",
                line=node.start_mark.line + 1,
                file=self.source_name,
                hint='an alias that nests other aliases grows exponentially (a "billion laughs" file); '
                "write the values out or use fewer nested aliases",
            )


def _syntax_error(exc: yaml.MarkedYAMLError, source_name: str | None) -> RecipeError:
    mark = exc.problem_mark or exc.context_mark
    line = mark.line + 1 if mark is not None else None
    reason = exc.problem or "malformed YAML"
    if exc.context:
        reason = f"{reason} ({exc.context})"
    return RecipeError(
        f"the recipe is not valid YAML: {reason}",
        line=line,
        file=source_name,
        hint="check indentation and that lists use `- ` and mappings `key: value`",
    )


def _document_from_node(
    loader: _LineLoader, node: yaml.Node, source_name: str | None, budget: _NodeBudget
) -> YamlDocument:
    builder = _Builder(loader, source_name, budget)
    builder.lines[()] = node.start_mark.line + 1  # problems with the whole document point here
    data = builder.build(node, (), frozenset())
    return YamlDocument(
        data=data,
        lines=LineTable(builder.lines),
        duplicates=tuple(builder.duplicates),
        start_line=node.start_mark.line + 1,
    )


class _Builder:
    """Turns a composed node graph into dicts/lists, recording lines as it goes."""

    def __init__(self, loader: _LineLoader, source_name: str | None, budget: _NodeBudget):
        self.loader = loader
        self.source_name = source_name
        self.budget = budget
        self.lines: dict[Path, int] = {}
        self.duplicates: list[DuplicateKey] = []

    def build(self, node: yaml.Node, path: Path, active: frozenset[int]) -> Any:
        self.budget.spend(1, node)
        if len(path) > MAX_DEPTH:
            raise self._error(f"the recipe nests lists or mappings more than {MAX_DEPTH} levels deep", node)
        if isinstance(node, yaml.ScalarNode):
            return self.loader.construct_object(node, deep=True)
        if id(node) in active:
            # An alias pointing at one of its own ancestors: nothing a recipe could mean.
            raise self._error("the recipe contains a recursive YAML alias", node)
        active = active | {id(node)}
        if isinstance(node, yaml.SequenceNode):
            items = []
            for index, child in enumerate(node.value):
                self.lines[path + (index,)] = child.start_mark.line + 1
                items.append(self.build(child, path + (index,), active))
            return items
        if isinstance(node, yaml.MappingNode):
            return self._build_mapping(node, path, active)
        raise self._error(f"unsupported YAML node {node.tag}", node)

    def _build_mapping(self, node: yaml.MappingNode, path: Path, active: frozenset[int]) -> dict:
        # PyYAML's flattening copies merged pairs eagerly, so a merge-key bomb must be sized first.
        self.budget.spend(_merged_size(node, {}, self.budget, frozenset()), node)
        self.loader.flatten_mapping(node)  # resolves `<<:` merge keys in place, like safe_load
        mapping: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = self.loader.construct_object(key_node, deep=True)
            if not isinstance(key, Hashable):
                raise self._error("a mapping key must be a plain value, not a list or mapping", key_node)
            child_path = path + (key,)
            line = key_node.start_mark.line + 1
            if key in mapping:
                self.duplicates.append(DuplicateKey(child_path, self.lines[child_path], line))
            self.lines[child_path] = line
            mapping[key] = self.build(value_node, child_path, active)
        return mapping

    def _error(self, message: str, node: yaml.Node) -> RecipeError:
        return RecipeError(message, line=node.start_mark.line + 1, file=self.source_name)


def _merged_size(node: yaml.MappingNode, sizes: dict[int, int], budget: _NodeBudget, active: frozenset[int]) -> int:
    """How many key/value pairs ``<<:`` merge keys bring into ``node`` once flattened."""
    if id(node) in sizes:
        return sizes[id(node)]
    if id(node) in active:
        raise RecipeError(
            "the recipe contains a recursive YAML merge key", line=node.start_mark.line + 1, file=budget.source_name
        )
    total = 0
    for key_node, value_node in node.value:
        if key_node.tag != "tag:yaml.org,2002:merge":
            continue
        merged = value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
        for item in merged:
            if isinstance(item, yaml.MappingNode):
                total += len(item.value) + _merged_size(item, sizes, budget, active | {id(node)})
        if total > MAX_NODES:
            budget.spend(total, node)  # raises with the standard message
    sizes[id(node)] = total
    return total
