"""Pieces of the plan JSON the three tools share (schema ``mkmerge-plan/1``, mkmerge/plan_json.py).

mkmerge, mkstack and mkmoe print one document shape for ``--dry-run --json``: ``inputs``,
``output``, ``config`` (the fields of config.json the run changes), ``tensors`` (each with
its dtype, shape, bytes, shard and the input tensors it is made from), ``shards``. Built from
config.json files and weight headers only.
"""

from __future__ import annotations

import string
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

SCHEMA = "mkmerge-plan/1"
_MISSING = object()


def letters() -> Iterator[str]:
    """Input labels after ``base``: A, B, ..., Z, A1, B1, ..."""
    yield from string.ascii_uppercase
    n = 1
    while True:
        for letter in string.ascii_uppercase:
            yield f"{letter}{n}"
        n += 1


def dtype_text(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def architecture_name(model) -> str:
    """The architecture an opened input model's config names (its class, e.g. LlamaForCausalLM)."""
    names = model.config.get("architectures") or [model.arch.name]
    return str(names[0])


def input_json(model, label: str, *, is_base: bool) -> dict:
    """One input model, from its config and headers (an ``OpenedModel``)."""
    infos = [model.files.tensors.info(name) for name in model.files.tensors.names()]
    return {
        "label": label,
        "reference": str(model.ref),
        "path": str(model.path),
        "architecture": architecture_name(model),
        "layers": model.num_layers,
        "dtypes": sorted({dtype_text(info.dtype) for info in infos}),
        "tensors": len(infos),
        "bytes": sum(info.nbytes for info in infos),
        "is_base": is_base,
    }


def config_changes(before: Mapping[str, Any], after: Mapping[str, Any], prefix: str = "") -> dict[str, dict]:
    """``{"dotted.key": {"from": old, "to": new}}`` for every field the output config changes.

    Nested objects are compared key by key, lists whole; a key the output adds has no
    ``from``, a key it drops no ``to``.
    """
    changes: dict[str, dict] = {}
    for key in sorted(set(before) | set(after)):
        old, new = before.get(key, _MISSING), after.get(key, _MISSING)
        path = f"{prefix}{key}"
        if isinstance(old, Mapping) and isinstance(new, Mapping):
            changes.update(config_changes(old, new, prefix=f"{path}."))
        elif old != new:
            changes[path] = {side: value for side, value in (("from", old), ("to", new)) if value is not _MISSING}
    return changes


def shards_json(layout: Sequence) -> list[dict]:
    """The output's weight files (``plan_shards`` layout): name, tensor count, bytes."""
    return [{"file": s.filename, "tensors": len(s.tensors), "bytes": s.file_bytes} for s in layout]


def shard_of(layout: Sequence) -> dict[str, str]:
    """Output tensor name -> the file it is written to."""
    return {t.name: shard.filename for shard in layout for t in shard.tensors}
