"""Merge methods: declared by their parameters, registered by name.

Each method module ends with its declarations (``MERGE_METHODS``, :class:`MergeMethod`
values): its parameters (global or per-model, with defaults), how it treats the base model
and embeddings of different sizes, how many inputs it takes, whether it draws random
numbers, its working set, its card text, and ``merge``, an adapter from a
:class:`MethodCall` (everything the engine resolved for one output tensor) to a pure math
function beside it. The engine reads these declarations and never compares method names.

Adding a method: a module with its math and ``MERGE_METHODS``, its name in
:data:`_DECLARING_MODULES`, a test and an example recipe.
"""

from __future__ import annotations

import importlib

from mkmerge.methods.declaration import (
    REQUIRED,
    MergeMethod,
    MethodCall,
    ParameterSpec,
    PlannedInputs,
)
from mksuite.common.errors import RecipeError, did_you_mean

__all__ = [
    "METHODS",
    "REQUIRED",
    "MergeMethod",
    "MethodCall",
    "ParameterSpec",
    "PlannedInputs",
    "get_method",
    "parameter_names",
    "register",
]

# In the order `mkmerge methods` lists them.
_DECLARING_MODULES = (
    "linear",
    "slerp",
    "nuslerp",
    "multislerp",
    "karcher",
    "model_stock",
    "nearswap",
    "arcee_fusion",
    "task_vector_methods",
    "sce",
    "ram",
    "passthrough",
)

METHODS: dict[str, MergeMethod] = {}


def register(method: MergeMethod) -> MergeMethod:
    """Make ``method`` known by its name to recipes, the planner and the tasks."""
    if method.name in METHODS and METHODS[method.name] is not method:
        raise ValueError(f"a merge method named `{method.name}` is already registered")
    METHODS[method.name] = method
    return method


for _module in _DECLARING_MODULES:
    for _method in importlib.import_module(f"mkmerge.methods.{_module}").MERGE_METHODS:
        register(_method)


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


def parameter_names() -> frozenset[str]:
    """Every parameter name some registered method reads (recipes are warned about others)."""
    return frozenset(spec.name for method in METHODS.values() for spec in method.parameters)
