"""mksuite: model merging (mkmerge), layer stacking (mkstack) and Mixture-of-Experts assembly (mkmoe).

The Python API (docs/api.md)::

    import mksuite

    result = mksuite.merge("recipe.yml", "./merged", device="cuda", shard_size="2G")
    mksuite.stack(None, "./solar", upscale="org/model", overlap=8)
    mksuite.moe("moe.yml", "./moe", layout="fused")
    merged = mksuite.merge_tensors("ties", [a, b], base=w, weight=[1, 1], density=0.5)

Importing this package is cheap: each name is imported on first use (torch with it).
"""

from __future__ import annotations

import importlib

_HOME = {
    "merge": "mksuite.api",
    "stack": "mksuite.api",
    "moe": "mksuite.api",
    "BuildResult": "mksuite.api",
    "StageOutcome": "mksuite.api",
    "merge_tensors": "mksuite.tensors",
    "merge_state_dicts": "mksuite.tensors",
    "MkError": "mksuite.common.errors",
    "RecipeError": "mksuite.common.errors",
    "ModelNotFoundError": "mksuite.common.errors",
    "OutputError": "mksuite.common.errors",
}

__all__ = sorted(_HOME)


def __getattr__(name: str):
    if name == "__version__":
        from mksuite.common.cli.app import package_version

        return package_version()
    module = _HOME.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOME))
