"""A merge method is one declaration: registering a new one in a test is enough for recipes,
the planner, plan-time checks, the memory estimate, the run and the model card to handle it."""

from __future__ import annotations

import warnings

import pytest
import torch

from mkmerge.memory_estimate import working_set_of
from mkmerge.methods import METHODS, MergeMethod, MethodCall, ParameterSpec, PlannedInputs, register
from mkmerge.methods.declaration import required_base
from mkmerge.methods.working_set import WorkingSet
from mkmerge.plan import plan_merge
from mkmerge.recipe import parse_recipe
from mkmerge.run import run_merge
from mkmerge.tasks import MergeTensor
from mksuite.common.build import BuildOptions
from mksuite.common.errors import MergeError, RecipeError


def _pull(call: MethodCall) -> torch.Tensor:
    """base + pull_scale · Σ pull_i · (x_i − base), in the base's dtype."""
    base = required_base(call)
    out = base.clone()
    for tensor, params in zip(call.tensors, call.per_model):
        out += float(call.params["pull_scale"]) * params["pull"] * (tensor - base)
    return out


def _refuse_negative_pulls(planned: PlannedInputs) -> None:
    for model, params in planned.others():
        if params["pull"] < 0:
            raise MergeError(f"{model}: pull {params['pull']} is negative (tensor {planned.tensor_name})")


TOY = MergeMethod(
    name="toy_pull",
    pretty_name="Toy Pull",
    reference_url="https://example.org/toy-pull",
    parameters=(
        ParameterSpec("pull", per_model=True, help="how far this model pulls the base"),
        ParameterSpec("pull_scale", per_model=False, default=1.0, help="scale of every pull"),
    ),
    base_model="required",
    min_inputs=2,
    max_inputs=None,
    merge=_pull,
    working_set=WorkingSet(copies=3),
    check=_refuse_negative_pulls,
    card_lists_base=True,
)


@pytest.fixture
def toy_method():
    register(TOY)
    yield TOY
    del METHODS[TOY.name]


def _recipe(base, a, b, pull_a=0.25, pull_b=0.5, scale_line="  pull_scale: 0.5\n"):
    text = (
        f"merge_method: toy_pull\nbase_model: {base}\nmodels:\n"
        f"  - model: {a}\n    parameters: {{pull: {pull_a}}}\n"
        f"  - model: {b}\n    parameters: {{pull: {pull_b}}}\n"
        f"parameters:\n{scale_line}dtype: float32\n"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # its parameter names are known: no unknown-key warning
        return parse_recipe(text, known_methods=METHODS.keys())


def test_a_registered_method_merges_a_real_model_to_its_formula_and_names_itself_in_the_card(
    toy_method, tiny_family, tmp_path
):
    from tiny_models import read_tensors

    base, (a, b) = tiny_family("llama")
    out = tmp_path / "out"
    run_merge(_recipe(base, a, b), out, BuildOptions())
    merged, x0, x1, x2 = (read_tensors(p) for p in (out, base, a, b))
    assert set(merged) == set(x0)
    for name, tensor in merged.items():
        expected = x0[name].clone()
        expected += 0.5 * 0.25 * (x1[name] - x0[name])
        expected += 0.5 * 0.5 * (x2[name] - x0[name])
        assert torch.equal(tensor, expected), name
    card = (out / "README.md").read_text()
    assert "[Toy Pull](https://example.org/toy-pull)" in card
    assert f"* {base}\n" in card  # listed with the models: the card rule the method declared


def test_a_registered_method_is_planned_with_its_defaults_and_working_set_before_any_read(
    toy_method, tiny_family, no_tensor_reads
):
    base, (a, b) = tiny_family("llama")
    plan = plan_merge(_recipe(base, a, b, scale_line=""))
    merges = [o.task for o in plan.outputs if isinstance(o.task, MergeTensor)]
    assert merges and all(task.method == "toy_pull" and dict(task.params) == {"pull_scale": 1.0} for task in merges)
    assert working_set_of("toy_pull") is TOY.working_set


def test_a_registered_methods_parameters_and_check_refuse_bad_recipes_before_any_read(
    toy_method, tiny_family, no_tensor_reads
):
    base, (a, b) = tiny_family("llama")
    with pytest.raises(MergeError, match="pull -1.0 is negative"):
        plan_merge(_recipe(base, a, b, pull_b=-1))
    text = f"merge_method: toy_pull\nbase_model: {base}\nmodels:\n  - model: {a}\n  - model: {b}\n"
    with pytest.raises(RecipeError, match="needs parameter `pull`"):
        plan_merge(parse_recipe(text, known_methods=METHODS.keys()))
    with pytest.raises(RecipeError, match="needs a base model"):
        plan_merge(parse_recipe(text.replace(f"base_model: {base}\n", ""), known_methods=METHODS.keys()))
