"""Recipe forms older mergekit versions accepted, rewritten to the modern form with a warning.

Published models were built from these recipes, so they must keep running; mergekit 0.1.5
refuses them. Each rewrite is one function here, applied to the raw YAML data before
validation (the recipe text kept for the model card stays as the user wrote it), and each
warning names the modern form to write instead:

* ``tokenizer_source: model:<repo>``: before the ``tokenizer:`` block existed, a model was
  named with a ``model:`` prefix; today the reference is written bare.
* ``slerp`` whose base model is not among a slice's sources: older mergekit slerped the
  slice's two sources and, finding no base among them, took the first source as the base
  (t = 0 gives the first source). The slice gets that first source as its ``base_model``;
  the recipe's own ``base_model`` still gives the config and tokenizer, as it did then.
"""

from __future__ import annotations

from typing import Any

from mksuite.common.errors import RecipeError
from mksuite.common.loading import ModelReference
from mksuite.common.recipe import LineTable, RecipeWarning, format_path

MODEL_PREFIX = "model:"


def modernize(data: dict, lines: LineTable) -> tuple[dict, list[RecipeWarning]]:
    """``data`` with every legacy form rewritten (a copy where anything changed), one warning per rewrite."""
    found: list[RecipeWarning] = []
    data = _tokenizer_source_prefix(data, lines, found)
    data = _slerp_base_outside_slice(data, lines, found)
    return data, found


def _tokenizer_source_prefix(data: dict, lines: LineTable, found: list[RecipeWarning]) -> dict:
    value = data.get("tokenizer_source")
    if not (isinstance(value, str) and value.startswith(MODEL_PREFIX) and value[len(MODEL_PREFIX) :].strip()):
        return data
    bare = value[len(MODEL_PREFIX) :].strip()
    found.append(
        RecipeWarning(
            f"`tokenizer_source: {value}` is the prefix form of older mergekit (mergekit 0.1.5 refuses it); "
            f"read as the model {bare}",
            field="tokenizer_source",
            line=lines.exact(("tokenizer_source",)),
            hint=f"write `tokenizer_source: {bare}`",
        )
    )
    return {**data, "tokenizer_source": bare}


def _slerp_base_outside_slice(data: dict, lines: LineTable, found: list[RecipeWarning]) -> dict:
    slices = data.get("slices")
    if data.get("merge_method") != "slerp" or not isinstance(slices, list):
        return data
    rewritten = list(slices)
    for index, output_slice in enumerate(slices):
        first = _first_source_model(output_slice)
        own = "base_model" in output_slice if isinstance(output_slice, dict) else False
        base = output_slice["base_model"] if own else data.get("base_model")
        if first is None or base is None:
            continue
        base_ref, source_refs = _reference(base), [_reference(s.get("model")) for s in output_slice["sources"]]
        if base_ref is None or None in source_refs or base_ref in source_refs:
            continue  # malformed references are reported by validation
        path = ("slices", index, "base_model") if own else ("base_model",)
        found.append(
            RecipeWarning(
                f"slerp's base model {base_ref} is not among the sources of slices[{index}]; older mergekit "
                f"took the slice's first source ({source_refs[0]}) as the base, which is done here "
                "(mergekit 0.1.5 refuses the recipe)",
                field=format_path(path),
                line=lines.exact(path) or lines.exact(("slices", index)),
                hint=f"write `base_model: {source_refs[0]}` in slices[{index}]",
            )
        )
        rewritten[index] = {**output_slice, "base_model": first}
    return {**data, "slices": rewritten} if rewritten != slices else data


def _first_source_model(output_slice: Any) -> Any:
    sources = output_slice.get("sources") if isinstance(output_slice, dict) else None
    if not (isinstance(sources, list) and sources and all(isinstance(s, dict) for s in sources)):
        return None
    return sources[0].get("model")


def _reference(value: Any) -> ModelReference | None:
    try:
        return ModelReference.parse(value)
    except RecipeError:
        return None
