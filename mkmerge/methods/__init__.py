"""Merge methods: declared by their parameters, registered by name.

Each method module ends with its declarations (``MERGE_METHODS``, :class:`MergeMethod`
values): its parameters (global or per-model, with defaults; built-in ones are listed in
:mod:`~mkmerge.methods.catalogue`), how it treats the base model and embeddings of different
sizes, how many inputs it takes, whether it draws random numbers, its working set, its card
text, and ``merge``, an adapter from a :class:`MethodCall` (everything the engine resolved
for one output tensor) to a pure math function beside it. The engine reads these
declarations and never compares method names.

Importing this package imports no torch: :data:`METHODS` imports a method's module the first
time the method is looked up, and recipe validation asks only :func:`method_parameters` and
:func:`parameter_names`, which the catalogue answers without the math.

Adding a method: a module with its math and ``MERGE_METHODS``, its name and parameters in
:data:`~mkmerge.methods.catalogue.BUILTIN`, a test and an example recipe.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, MutableMapping
from typing import TYPE_CHECKING

from mkmerge.methods import catalogue
from mkmerge.methods.catalogue import REQUIRED, ParameterSpec
from mksuite.common.errors import RecipeError, did_you_mean

if TYPE_CHECKING:
    from mkmerge.methods.declaration import MergeMethod

__all__ = [
    "METHODS",
    "REQUIRED",
    "MergeMethod",
    "MethodCall",
    "ParameterSpec",
    "PlannedInputs",
    "get_method",
    "method_parameters",
    "parameter_names",
    "register",
]

# The torch-dependent declaration types, imported when first asked for (PEP 562).
_DECLARATION_TYPES = ("MergeMethod", "MethodCall", "PlannedInputs")


def __getattr__(name: str):
    if name in _DECLARATION_TYPES:
        return getattr(importlib.import_module("mkmerge.methods.declaration"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class MethodRegistry(MutableMapping):
    """Method name -> :class:`MergeMethod`: the built-ins (imported on first lookup) and registered ones.

    Iterating yields the names without importing anything; looking a built-in up imports the
    module that declares it (and so torch).
    """

    def __init__(self) -> None:
        self._loaded: dict[str, MergeMethod] = {}
        self._removed: set[str] = set()

    def _names(self) -> list[str]:
        builtin = [name for name in catalogue.BUILTIN if name not in self._removed]
        return builtin + [name for name in self._loaded if name not in catalogue.BUILTIN]

    def __getitem__(self, name: str) -> MergeMethod:
        if name in self._loaded:
            return self._loaded[name]
        if name not in catalogue.BUILTIN or name in self._removed:
            raise KeyError(name)
        for method in importlib.import_module(catalogue.declaring_module(name)).MERGE_METHODS:
            if method.name not in self._removed:
                self._loaded.setdefault(method.name, method)
        return self._loaded[name]

    def __setitem__(self, name: str, method: MergeMethod) -> None:
        self._loaded[name] = method
        self._removed.discard(name)

    def __delitem__(self, name: str) -> None:
        if name not in self:
            raise KeyError(name)
        self._loaded.pop(name, None)
        if name in catalogue.BUILTIN:
            self._removed.add(name)

    def __contains__(self, name: object) -> bool:
        return name in self._loaded or (name in catalogue.BUILTIN and name not in self._removed)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __len__(self) -> int:
        return len(self._names())

    def parameters(self, name: str) -> tuple[ParameterSpec, ...] | None:
        """``name``'s parameters, without importing a built-in's math; None for an unknown name."""
        if name in self._loaded:
            return self._loaded[name].parameters
        if name in self:
            return catalogue.parameters(name)
        return None


METHODS = MethodRegistry()


def register(method: MergeMethod) -> MergeMethod:
    """Make ``method`` known by its name to recipes, the planner and the tasks."""
    if method.name in METHODS and METHODS[method.name] is not method:
        raise ValueError(f"a merge method named `{method.name}` is already registered")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> MergeMethod:
    """The registered method called ``name``; a recipe error naming the field otherwise."""
    try:
        return METHODS[name]
    except KeyError:
        raise RecipeError(
            f"unknown merge method `{name}`; known methods: {', '.join(sorted(METHODS))}",
            field="merge_method",
            hint=did_you_mean(name, METHODS),
        ) from None


def method_parameters(name: str) -> tuple[ParameterSpec, ...] | None:
    """The parameters method ``name`` reads (no torch for a built-in); None for an unknown name."""
    return METHODS.parameters(name)


def parameter_names() -> frozenset[str]:
    """Every parameter name some registered method reads (recipes are warned about others)."""
    return frozenset(spec.name for name in METHODS for spec in METHODS.parameters(name))
