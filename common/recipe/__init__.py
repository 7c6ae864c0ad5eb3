"""The recipe layer every tool shares: YAML with lines, field errors and warnings, typed values.

* :mod:`.yaml_lines`  bounded YAML loading that records the line of every key and list item;
* :mod:`.text`        reading a recipe file (size-bounded);
* :mod:`.fields`      field problems, unknown-key warnings, pydantic errors -> one RecipeError;
* :mod:`.values`      model references and dtype names as typed fields;
* :mod:`.parameters`  parameter settings (scalars, gradients, ``{filter, value}`` lists);
* :mod:`.suggest`     "did you mean …?" ranked by edit distance;

A tool defines its own schema (pydantic models) from these pieces; nothing here knows any
tool's recipe keys.
"""

from mksuite.common.recipe.fields import (
    FieldProblem,
    RecipeWarning,
    UnknownKey,
    document_mapping,
    duplicate_key_warnings,
    emit,
    unknown_key_warning,
    unknown_keys,
    validation_error,
)
from mksuite.common.recipe.parameters import (
    CONDITIONAL_KEYS,
    ConditionalEntry,
    ParameterSetting,
    SettingProblem,
    setting_from_raw,
)
from mksuite.common.recipe.suggest import closest, is_slip_of, suggestion
from mksuite.common.recipe.text import read_recipe_file
from mksuite.common.recipe.values import (
    DTYPE_NAMES,
    DType,
    ModelReferenceField,
    dtype_from_name,
    dtypes,
    model_reference,
)
from mksuite.common.recipe.yaml_lines import (
    MAX_DEPTH,
    MAX_NODES,
    MAX_RECIPE_BYTES,
    LineTable,
    YamlDocument,
    format_path,
    load_document,
    load_documents,
)

__all__ = [
    "CONDITIONAL_KEYS",
    "DTYPES",
    "DTYPE_NAMES",
    "MAX_DEPTH",
    "MAX_NODES",
    "MAX_RECIPE_BYTES",
    "ConditionalEntry",
    "DType",
    "FieldProblem",
    "LineTable",
    "ModelReferenceField",
    "ParameterSetting",
    "RecipeWarning",
    "SettingProblem",
    "UnknownKey",
    "YamlDocument",
    "closest",
    "document_mapping",
    "dtype_from_name",
    "dtypes",
    "duplicate_key_warnings",
    "emit",
    "format_path",
    "is_slip_of",
    "load_document",
    "load_documents",
    "model_reference",
    "read_recipe_file",
    "setting_from_raw",
    "suggestion",
    "unknown_key_warning",
    "unknown_keys",
    "validation_error",
]


def __getattr__(name: str):
    if name == "DTYPES":  # built on first use: importing the recipe layer needs no torch
        return dtypes()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
