"""The shipped definitions (package data of `architectures`) and lookup by config (SPEC §7.1)."""

from __future__ import annotations

import functools
import importlib.resources
import json
from collections.abc import Mapping
from types import MappingProxyType

from mksuite.common.errors import ArchitectureError

from .definition import ArchitectureDefinition
from .parsing import parse_definition

DEFINITIONS_PACKAGE = "mksuite.architectures"


def read_definitions(package: str = DEFINITIONS_PACKAGE) -> dict[str, ArchitectureDefinition]:
    """Parse every ``*.json`` in ``package``, keyed by file stem; no caching.

    Files are reached through importlib.resources, so this works for an installed wheel,
    an editable checkout or a zipped package alike.
    """
    root = importlib.resources.files(package)
    definitions: dict[str, ArchitectureDefinition] = {}
    for entry in sorted(root.iterdir(), key=lambda e: e.name):
        if not entry.name.endswith(".json") or not entry.is_file():
            continue
        stem = entry.name[: -len(".json")]
        source = f"{package}/{entry.name}"
        try:
            data = json.loads(entry.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ArchitectureError(
                f"architecture definition {source} is not valid JSON: {exc}",
                hint="fix the file's syntax.",
            ) from None
        definitions[stem] = parse_definition(data, name=stem, source=source)
    return definitions


@functools.cache
def _shipped() -> Mapping[str, ArchitectureDefinition]:
    return MappingProxyType(read_definitions())


def load_definitions() -> dict[str, ArchitectureDefinition]:
    """All shipped definitions by name; read once, then served from a cache.

    Each call returns a fresh dict, so a caller that edits it cannot change what others see.
    """
    return dict(_shipped())


def find_architecture(
    config: dict, definitions: Mapping[str, ArchitectureDefinition] | None = None
) -> ArchitectureDefinition | None:
    """The definition for a model's config.json, bound to it; None when none matches.

    ``config["architectures"]`` must hold exactly one name (absent or empty -> None, several
    -> ArchitectureError). When several definitions claim that name, the one whose
    model_type equals the config's wins. The result is bound with ``for_config`` so
    per-expert templates know the expert count.
    """
    names = config.get("architectures")
    if not names:
        return None
    if not isinstance(names, list) or len(names) != 1:
        raise ArchitectureError(
            f"config.json lists architectures {names!r}; exactly one is supported.",
            hint="edit config.json so `architectures` names the single model class.",
        )
    if definitions is None:
        definitions = _shipped()
    claimants = [d for d in definitions.values() if names[0] in d.architectures]
    if len(claimants) > 1:
        claimants = [d for d in claimants if d.model_type == config.get("model_type")]
        if len(claimants) > 1:
            raise ArchitectureError(
                f"definitions {', '.join(d.source or d.name for d in claimants)} all claim "
                f"architecture `{names[0]}` with model_type `{config.get('model_type')}`.",
                hint="remove or rename one of them.",
            )
    if not claimants:
        return None
    return claimants[0].for_config(config)
