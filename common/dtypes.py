"""The dtype tables every tool shares: names users may give, and safetensors' dtype codes."""

from __future__ import annotations

import torch

from mksuite.common.dtype_names import FLOAT_DTYPE_NAMES

FLOAT_DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in FLOAT_DTYPE_NAMES}
"""The floating dtypes a model is computed and stored in (``--dtype``, ``torch_dtype``)."""

RECIPE_DTYPES: dict[str, torch.dtype] = {**FLOAT_DTYPES, "int64": torch.int64}
"""What a recipe's ``dtype`` and ``out_dtype`` accept (mergekit's list; its names, without torch,
are ``mksuite.common.recipe.values.DTYPE_NAMES``)."""

_SAFETENSORS_NAMES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
    "U16": "uint16",
    "U32": "uint32",
    "U64": "uint64",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "F8_E8M0": "float8_e8m0fnu",
}
# Only the dtypes this torch build has; the rest are reported as unsupported where they occur.
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    code: getattr(torch, name)
    for code, name in _SAFETENSORS_NAMES.items()
    if isinstance(getattr(torch, name, None), torch.dtype)
}
"""A safetensors header's dtype code -> the torch dtype."""

SAFETENSORS_CODES: dict[torch.dtype, str] = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items()}
"""A torch dtype -> its safetensors header code."""


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (as config.json and recipes write it)."""
    return str(dtype).removeprefix("torch.")
