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
"""

from __future__ import annotations

import re
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

import yaml

from mksuite.common.errors import RecipeError

Path = tuple[Hashable, ...]

# YAML 1.2 float syntax, so that `1e-5`, `1E+3` and `-2e4` are numbers. Resolvers are
# consulted per first character, hence the explicit list.
_FLOAT_WITH_EXPONENT = re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")


class _LineLoader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 exponent floats; line tracking happens in :func:`_build`."""


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
    loader = _LineLoader(text)
    try:
        documents = []
        while loader.check_node():
            node = loader.get_node()
            documents.append(_document_from_node(loader, node, source_name))
        return documents
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


def _document_from_node(loader: _LineLoader, node: yaml.Node, source_name: str | None) -> YamlDocument:
    builder = _Builder(loader, source_name)
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

    def __init__(self, loader: _LineLoader, source_name: str | None):
        self.loader = loader
        self.source_name = source_name
        self.lines: dict[Path, int] = {}
        self.duplicates: list[DuplicateKey] = []

    def build(self, node: yaml.Node, path: Path, active: frozenset[int]) -> Any:
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
