"""Typed recipe values every tool reads: model references and dtype names.

Each is an ``Annotated`` type whose validator raises :class:`FieldProblem`, so a schema of any
tool can use it as a field type and get errors anchored at the field's path and line.
"""

from __future__ import annotations

from typing import Annotated, Any

import torch
from pydantic import PlainValidator

from mksuite.common.errors import RecipeError
from mksuite.common.loading import ModelReference
from mksuite.common.recipe.fields import FieldProblem
from mksuite.common.recipe.suggest import suggestion

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
}
"""Dtype names a recipe may write (optionally prefixed ``torch.``)."""


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
        if name in DTYPES:
            return DTYPES[name]
    raise FieldProblem(
        f"unknown dtype {value!r}; accepted: {', '.join(DTYPES)} (optionally prefixed `torch.`)",
        hint=suggestion(str(value).removeprefix("torch."), DTYPES),
    )


ModelRef = Annotated[ModelReference, PlainValidator(model_reference)]
DType = Annotated[torch.dtype, PlainValidator(dtype_from_name)]
