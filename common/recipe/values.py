"""Typed recipe values every tool reads: model references and dtype names.

Each is an ``Annotated`` type whose validator raises :class:`FieldProblem`, so a schema of any
tool can use it as a field type and get errors anchored at the field's path and line.

torch is imported only when a dtype name is resolved, so reading a recipe (and reporting its
errors) does not pay torch's start-up cost through this module.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

from pydantic import PlainValidator

from mksuite.common.errors import RecipeError
from mksuite.common.loading.reference import ModelReference
from mksuite.common.recipe.fields import FieldProblem
from mksuite.common.recipe.suggest import suggestion

if TYPE_CHECKING:
    import torch

DTYPE_NAMES = ("float32", "float16", "bfloat16", "int64")
"""Dtype names a recipe may write (optionally prefixed ``torch.``)."""


def dtypes() -> dict[str, torch.dtype]:
    """:data:`DTYPE_NAMES` -> torch dtypes: the shared table (imports torch)."""
    from mksuite.common.dtypes import RECIPE_DTYPES

    return RECIPE_DTYPES


def __getattr__(name: str) -> Any:
    if name == "DTYPES":  # the table, built on first use so that importing this module needs no torch
        return dtypes()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def model_reference(value: Any) -> ModelReference:
    """Parse a recipe's model reference, re-raising its problems as a :class:`FieldProblem`."""
    marker = "@ref"
    try:
        return ModelReference.parse(value, field=marker)
    except RecipeError as error:
        # Re-anchor the reference's own sub-field (e.g. `.lora.path`) under the recipe path.
        sub = (error.field or marker).removeprefix(marker).lstrip(".")
        reason = error.message.removeprefix(f"field `{error.field}`: ")
        subpath = tuple(sub.split(".")) if sub else ()
        raise FieldProblem(reason, subpath=subpath, hint=error.hint) from None


def dtype_from_name(value: Any) -> torch.dtype:
    """``"bfloat16"`` or ``"torch.bfloat16"`` -> ``torch.bfloat16``; FieldProblem otherwise."""
    if isinstance(value, str):
        name = value.removeprefix("torch.")
        if name in DTYPE_NAMES:
            return dtypes()[name]
    raise FieldProblem(
        f"unknown dtype {value!r}; accepted: {', '.join(DTYPE_NAMES)} (optionally prefixed `torch.`)",
        hint=suggestion(str(value).removeprefix("torch."), DTYPE_NAMES),
    )


ModelReferenceField = Annotated[ModelReference, PlainValidator(model_reference)]
"""A pydantic field holding a :class:`ModelReference`, parsed from the recipe's string."""
DType = Annotated[Any, PlainValidator(dtype_from_name)]
"""A ``torch.dtype`` field, given by name in the recipe."""
