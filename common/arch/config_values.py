"""Reading and writing config.json values by dotted path ("text_config.num_hidden_layers")."""

from __future__ import annotations

from typing import Any

_NO_DEFAULT: Any = object()


def get_config_value(config: dict, dotted_key: str, default: Any = _NO_DEFAULT) -> Any:
    """The value at ``dotted_key``; ``default`` if any step is absent, else KeyError.

    A step through something that is not a dict counts as absent.
    """
    node: Any = config
    for part in dotted_key.split("."):
        if not isinstance(node, dict) or part not in node:
            if default is _NO_DEFAULT:
                raise KeyError(dotted_key)
            return default
        node = node[part]
    return node


def set_config_value(config: dict, dotted_key: str, value: Any) -> None:
    """Set ``dotted_key`` in place, creating missing intermediate dicts.

    Mutates ``config``: callers that plan from a config copy it first.
    Raises TypeError when an intermediate step exists but is not a dict.
    """
    *parents, leaf = dotted_key.split(".")
    node = config
    walked: list[str] = []
    for part in parents:
        walked.append(part)
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise TypeError(f"config `{'.'.join(walked)}` is {type(child).__name__}, not an object")
        node = child
    node[leaf] = value
