"""The shipped definitions (package data of `architectures`) and lookup by config (docs/architectures.md)."""

from __future__ import annotations

import functools
import importlib.resources
import json
import re
from collections.abc import Collection, Iterator, Mapping
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


def candidate_architectures(
    config: dict, definitions: Mapping[str, ArchitectureDefinition] | None = None
) -> Iterator[ArchitectureDefinition]:
    """Every description that may fit ``config``, best first, each bound to it.

    A shipped definition claiming the config's class and model_type (an override) comes
    first, then the one transformers' own class implies, then shipped definitions that claim
    only the class name (a checkpoint that borrowed another family's class name). Lazily:
    deriving a description imports the model's transformers code (seconds), which a fitting
    override makes unnecessary.
    """
    from .derived import derive_architecture

    names = config.get("architectures")
    name = names[0] if isinstance(names, list) and len(names) == 1 else None
    if definitions is None:
        definitions = _shipped()
    claimants = [d for d in definitions.values() if name in d.architectures]
    exact = [d for d in claimants if d.model_type == config.get("model_type")]

    def ordered() -> Iterator[ArchitectureDefinition | None]:
        yield from exact
        yield derive_architecture(config)
        yield from (d for d in claimants if d not in exact)

    for definition in ordered():
        if definition is None:
            continue
        try:
            yield definition.for_config(config)
        except ArchitectureError:
            continue  # e.g. an expert-count key this config lacks: the next candidate may fit


def coverage(definition: ArchitectureDefinition, config: dict, tensor_names: Collection[str]) -> float:
    """The fraction of ``definition``'s required weights the model stores (by name, alias or tie)."""
    try:
        weights = [w for w in definition.all_weights(definition.num_layers(config)) if not w.optional]
    except ArchitectureError:
        return 0.0
    if not weights:
        return 1.0
    present = set(tensor_names)
    stored = sum(any(n in present for n in (w.name, *w.aliases, *w.tied_names)) for w in weights)
    return stored / len(weights)


def fits(definition: ArchitectureDefinition, config: dict, tensor_names: Collection[str]) -> bool:
    """Whether every required weight of ``definition`` is stored (by name, alias or tie)."""
    return coverage(definition, config, tensor_names) == 1.0


# A description that names nearly all of a model's tensors is that model's, with a few missing:
# the planner then names the missing tensor, which says more than inferring another description.
_NEARLY_ALL = 0.9


def choose_architecture(config: dict, tensor_names: Collection[str]) -> ArchitectureDefinition | None:
    """The first candidate description whose required tensors the model stores; else the best
    one that stores nearly all of them; None when none comes close (the caller infers one)."""
    scored = []
    for definition in candidate_architectures(config):
        score = coverage(definition, config, tensor_names)
        if score == 1.0:
            return definition
        scored.append((score, definition))
    best = max(scored, key=lambda pair: pair[0], default=(0.0, None))
    return best[1] if best[0] >= _NEARLY_ALL else None


# Buffers older checkpoints carry that today's classes recompute: stored, never described.
STALE_BUFFERS = re.compile(r"(^|\.)(rotary_emb\.inv_freq|attn\.masked_bias|attn\.bias)$")


def undescribed_tensors(
    definition: ArchitectureDefinition, num_layers: int, tensor_names: Collection[str]
) -> list[str]:
    """Stored tensors no weight of ``definition`` names (stale buffers aside), in stored order."""
    known = {n for w in definition.all_weights(num_layers) for n in (w.name, *w.aliases, *w.tied_names)}
    return [n for n in tensor_names if n not in known and not STALE_BUFFERS.search(n)]
