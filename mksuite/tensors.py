"""Merging tensors in memory with the merge methods the tools use (no files, no recipe).

``merge_tensors("ties", [a, b], base=w, weight=[1, 1], density=0.5)`` runs the same method
implementation ``mkmerge`` runs for one output tensor. Parameters are the method's recipe
parameters (``mkmerge methods`` lists them): a per-model parameter takes one value per input
(a list aligned with ``tensors``) or one value for all; a global one a single value; unset
ones take the method's default, and a required one that is missing is a RecipeError.

Random methods (DARE, DELLA, arcee_fusion) draw from CPU generators seeded by
``(seed, tensor_name, input position)``, the base (when given) being position 0, so a call
is reproducible.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from mksuite.common.errors import MissingTensorError, RecipeError


def merge_tensors(
    method: str,
    tensors: Sequence[Any] | Mapping[str, Any],
    *,
    base: Any = None,
    seed: int = 0,
    tensor_name: str = "",
    **parameters,
):
    """One merged tensor from ``tensors`` (and ``base``) with merge method ``method``.

    ``tensors``: the inputs other than the base, as a sequence, or a mapping from a model name
    to its tensor (then per-model parameters may also be mappings by the same names).
    ``tensor_name`` is the name filters and random seeds see (as in a model file).
    """
    import torch

    from mkmerge.methods import MethodCall, get_method
    from mksuite.common.graph import tensor_seed

    spec = get_method(method)
    names, inputs = _inputs(tensors)
    if base is None and spec.base_model == "required":
        raise RecipeError(f"merge method `{method}` merges from a base model: give base=...", field="base")
    if base is not None and not spec.uses_base:
        raise RecipeError(f"merge method `{method}` takes no base model: pass every tensor in `tensors`", field="base")
    offset = 1 if base is not None else 0
    per_model, base_params, params = _parameters(spec, names, parameters)
    ordinary = tuple(torch.as_tensor(t) for t in inputs)
    call = MethodCall(
        tensors=ordinary,
        base=torch.as_tensor(base) if base is not None else None,
        per_model=per_model,
        base_params=base_params,
        params=params,
        generator=lambda i: torch.Generator().manual_seed(tensor_seed(seed, tensor_name, i + offset)),
        tensor_name=tensor_name,
    )
    return spec.run(call)


def merge_state_dicts(
    method: str,
    state_dicts: Sequence[Mapping[str, Any]] | Mapping[str, Mapping[str, Any]],
    *,
    base: Mapping[str, Any] | None = None,
    seed: int = 0,
    **parameters,
) -> dict[str, Any]:
    """Every tensor of ``state_dicts`` merged by name: ``merge_tensors`` per key.

    All state dicts (and ``base``) must hold the same names; the names are the ``tensor_name``
    each merge sees (filters, seeds). Parameters as :func:`merge_tensors`'s.
    """
    names, dicts = _inputs(state_dicts)
    keys = list((base or dicts[0]).keys())
    for name, state in zip(names, dicts):
        missing = [key for key in keys if key not in state]
        extra = [key for key in state if key not in keys]
        if missing or extra:
            culprit = missing[0] if missing else extra[0]
            where = "lacks" if missing else "has the extra tensor"
            raise MissingTensorError(f"state dict `{name}` {where} `{culprit}`; every input must hold the same names")
    merged = {}
    for key in keys:
        group = {name: state[key] for name, state in zip(names, dicts)}
        inputs = group if isinstance(state_dicts, Mapping) else list(group.values())
        merged[key] = merge_tensors(
            method, inputs, base=base[key] if base is not None else None, seed=seed, tensor_name=key, **parameters
        )
    return merged


def _inputs(tensors) -> tuple[list[str], list]:
    if isinstance(tensors, Mapping):
        return [str(name) for name in tensors], list(tensors.values())
    items = list(tensors)
    return [f"input {i}" for i in range(len(items))], items


def _parameters(spec, names: list[str], given: Mapping[str, Any]):
    """(per-model values per input, the base's per-model values, global values), defaults filled in."""
    from mkmerge.methods import REQUIRED
    from mksuite.common.errors import did_you_mean

    known = {p.name: p for p in spec.parameters}
    for name in given:
        if name not in known:
            raise RecipeError(
                f"merge method `{spec.name}` has no parameter `{name}`",
                field=name,
                hint=did_you_mean(name, known) or f"it takes: {', '.join(known) or 'none'}",
            )
    per_model: list[dict] = [{} for _ in names]
    params: dict = {}
    for parameter in spec.parameters:
        value = given.get(parameter.name, None)
        if not parameter.per_model:
            if value is None:
                if parameter.default is REQUIRED:
                    raise RecipeError(f"merge method `{spec.name}` needs parameter `{parameter.name}`")
                value = parameter.default
            params[parameter.name] = parameter.convert(value)
            continue
        values = _per_input(parameter.name, value, names)
        for index, item in enumerate(values):
            if item is None:
                if parameter.default is REQUIRED:
                    raise RecipeError(
                        f"merge method `{spec.name}` needs parameter `{parameter.name}` for {names[index]}",
                        hint=f"{parameter.name}=[...] with one value per input, or one value for all",
                    )
                item = parameter.default
            per_model[index][parameter.name] = parameter.convert(item)
    base_params = {p.name: p.convert(p.default) for p in spec.parameters if p.per_model and not p.required}
    _check_bounds(spec, per_model, params)
    return tuple(per_model), base_params, params


def _per_input(name: str, value: Any, names: list[str]) -> list:
    if isinstance(value, Mapping):
        unknown = [key for key in value if key not in names]
        if unknown:
            raise RecipeError(f"`{name}` names {unknown[0]!r}, which is not an input", field=name)
        return [value.get(n) for n in names]
    if isinstance(value, list | tuple):
        if len(value) != len(names):
            raise RecipeError(f"`{name}` has {len(value)} values for {len(names)} inputs", field=name)
        return list(value)
    return [value] * len(names)


def _check_bounds(spec, per_model: list[dict], params: dict) -> None:
    for parameter in spec.parameters:
        low, high = parameter.minimum, parameter.maximum
        if low is None and high is None:
            continue
        values = [m[parameter.name] for m in per_model] if parameter.per_model else [params[parameter.name]]
        for value in values:
            if value is not None and ((low is not None and value < low) or (high is not None and value > high)):
                raise RecipeError(
                    f"{parameter.name} {value:g} is outside [{low if low is not None else '-inf'}, "
                    f"{high if high is not None else 'inf'}]" + (f"; {parameter.domain}" if parameter.domain else ""),
                    field=parameter.name,
                )
