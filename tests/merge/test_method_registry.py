"""The method registry: declarations (parameters, defaults, base handling) and adapters."""

from __future__ import annotations

import pytest
import torch

from mkmerge.methods import METHODS, REQUIRED, MethodCall, get_method
from mkmerge.methods.linear import linear_merge
from mkmerge.methods.passthrough import passthrough
from mkmerge.methods.ram import ram_merge, ramplus_tl_merge
from mkmerge.methods.sce import sce_merge
from mkmerge.methods.slerp import slerp_merge
from mkmerge.methods.task_arithmetic import task_vector_merge
from mksuite.common.errors import MergeError, RecipeError

from method_helpers import bits

TASK_VECTOR = [
    "task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear",
]  # fmt: skip
# docs/methods.md table: sparsifier, sign consensus, normalize default, rescale default
TASK_VECTOR_TABLE = {
    "task_arithmetic": ("none", False, False, False),
    "ties": ("magnitude", True, True, False),
    "dare_linear": ("random", False, False, True),
    "dare_ties": ("random", True, False, True),
    "breadcrumbs": ("breadcrumbs", False, False, False),
    "breadcrumbs_ties": ("breadcrumbs", True, False, False),
    "della": ("della", True, True, True),
    "della_linear": ("della", False, False, True),
}
# per-model parameters beyond weight and density, with their docs/recipes.md defaults
SPARSIFIER_PARAMETERS = {"breadcrumbs": {"gamma": 0.01}, "della": {"epsilon": 0.15}}


def call(tensors=(), base=None, per_model=None, params=None, base_params=None, seed=0, name="model.layers.0.w"):
    tensors = tuple(tensors)
    return MethodCall(
        tensors=tensors,
        base=base,
        per_model=tuple(per_model if per_model is not None else [{} for _ in tensors]),
        base_params=base_params or {},
        params=params or {},
        generator=lambda i: torch.Generator().manual_seed(1000 * seed + i),
        tensor_name=name,
    )


def defaults(method_name: str, **overrides) -> dict:
    """Global parameters as the engine would resolve them when the recipe sets none."""
    method = get_method(method_name)
    values = {p.name: p.default for p in method.global_parameters() if p.default is not REQUIRED}
    return {**values, **overrides}


def per_model(method_name: str, count: int, **values) -> list[dict]:
    method = get_method(method_name)
    base = {p.name: p.default for p in method.per_model_parameters() if p.default is not REQUIRED}
    return [{**base, **{k: v[i] for k, v in values.items()}} for i in range(count)]


# --- declarations -----------------------------------------------------------------------------


def test_registry_holds_the_implemented_methods():
    assert set(METHODS) == {
        "linear", "slerp", *TASK_VECTOR, "sce", "ram", "ramplus_tl", "passthrough",
        "nuslerp", "multislerp", "karcher", "model_stock", "nearswap", "arcee_fusion",
    }  # fmt: skip
    for name, method in METHODS.items():
        assert get_method(name) is method and method.name == name and method.pretty_name


def test_unknown_method_is_a_recipe_error_on_merge_method_with_a_suggestion():
    with pytest.raises(RecipeError) as info:
        get_method("tie")
    assert info.value.field == "merge_method"
    assert info.value.hint == "did you mean `ties`?"
    assert "unknown merge method `tie`" in info.value.message
    with pytest.raises(RecipeError) as info:
        get_method("zzzzzz")
    assert info.value.hint is None


@pytest.mark.parametrize("name", TASK_VECTOR)
def test_task_vector_defaults_follow_the_spec_table(name):
    sparsifier, _, normalize, rescale = TASK_VECTOR_TABLE[name]
    method = get_method(name)
    assert method.parameter("normalize").default is normalize
    assert method.parameter("rescale").default is rescale
    assert method.parameter("lambda").default == 1.0
    assert method.parameter("int8_mask").default is False and method.parameter("int8_mask").kind is bool
    assert method.parameter("weight").required and method.parameter("weight").per_model
    density = method.parameter("density")
    assert density.per_model and density.default == 1.0
    assert method.base_model == "required"
    assert {p.name for p in method.global_parameters()} == {"normalize", "rescale", "lambda", "int8_mask"}
    extra = SPARSIFIER_PARAMETERS.get(sparsifier, {})
    assert {p.name for p in method.per_model_parameters()} == {"weight", "density", *extra}
    for parameter, default in extra.items():
        assert method.parameter(parameter).default == default and method.parameter(parameter).kind is float


def test_sce_has_no_per_model_weights_and_a_global_select_topk():
    sce = get_method("sce")
    assert sce.base_model == "required" and sce.per_model_parameters() == ()
    assert sce.parameter("select_topk").default == 1.0 and not sce.parameter("select_topk").per_model
    assert sce.parameter("int8_mask").default is False


def test_ram_methods_take_a_global_epsilon_and_ramplus_r_and_alpha():
    for name in ("ram", "ramplus_tl"):
        method = get_method(name)
        assert method.base_model == "required" and method.per_model_parameters() == ()
        epsilon = method.parameter("epsilon")
        assert not epsilon.per_model and epsilon.default == 1e-5
    ramplus = get_method("ramplus_tl")
    assert ramplus.parameter("r").default == 0.1 and ramplus.parameter("alpha").default == 0.2
    assert get_method("ram").parameter("r") is None


def test_linear_treats_the_base_as_an_ordinary_input_and_normalizes_by_default():
    linear = get_method("linear")
    assert linear.base_model == "none"
    assert linear.parameter("normalize").default is True and not linear.parameter("normalize").per_model
    assert linear.parameter("weight").required and linear.parameter("weight").per_model
    assert (linear.min_inputs, linear.max_inputs) == (1, None)


def test_slerp_takes_a_required_global_t_and_exactly_two_inputs_including_the_base():
    slerp = get_method("slerp")
    t = slerp.parameter("t")
    assert t.required and not t.per_model
    assert slerp.base_model == "required" and (slerp.min_inputs, slerp.max_inputs) == (2, 2)


def test_passthrough_takes_one_input_and_an_optional_per_model_scale():
    method = get_method("passthrough")
    scale = method.parameter("scale")
    assert scale.per_model and scale.default is None and not scale.required
    assert (method.min_inputs, method.max_inputs) == (1, 1)


# --- adapters ---------------------------------------------------------------------------------


def test_linear_adapter_passes_weights_and_normalize_to_the_math():
    g = torch.Generator().manual_seed(1)
    tensors = [torch.randn(4, 5, generator=g).to(torch.bfloat16) for _ in range(3)]
    out = get_method("linear").run(
        call(tensors, per_model=per_model("linear", 3, weight=[0.2, 0.3, 0.5]), params=defaults("linear"))
    )
    assert bits(out) == bits(linear_merge(tensors, [0.2, 0.3, 0.5], normalize=True))


def test_linear_adapter_weighs_a_base_passed_separately_like_any_other_input():
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 6.0])
    out = get_method("linear").run(
        call([a], base=b, per_model=[{"weight": 1.0}], base_params={"weight": 3.0}, params=defaults("linear"))
    )
    assert out.tolist() == [2.5, 5.0]


def test_slerp_adapter_interpolates_base_to_other():
    g = torch.Generator().manual_seed(2)
    base, other = torch.randn(8, generator=g), torch.randn(8, generator=g)
    out = get_method("slerp").run(call([other], base=base, params={"t": 0.3}))
    assert bits(out) == bits(slerp_merge(0.3, base, other))


def test_slerp_with_only_one_input_present_returns_it_unchanged():
    x = torch.randn(6)
    assert get_method("slerp").run(call([], base=x, params={"t": 0.3})) is x
    assert get_method("slerp").run(call([x], base=None, params={"t": 0.3})) is x


def test_slerp_with_two_non_base_inputs_is_a_merge_error_naming_the_tensor():
    with pytest.raises(MergeError, match="model.layers.0.w.*exactly one other model"):
        get_method("slerp").run(call([torch.ones(2), torch.ones(2)], base=torch.ones(2), params={"t": 0.5}))


@pytest.mark.parametrize("name", TASK_VECTOR)
def test_task_vector_adapters_return_the_base_when_no_other_input_has_the_tensor(name):
    base = torch.randn(5)
    assert get_method(name).run(call([], base=base, params=defaults(name))) is base


@pytest.mark.parametrize("name", TASK_VECTOR)
def test_task_vector_adapters_run_the_family_math_with_their_defaults(name):
    g = torch.Generator().manual_seed(3)
    base = torch.randn(10, 10, generator=g)
    tensors = [base + 0.1 * torch.randn(10, 10, generator=g) for _ in range(2)]
    sparsifier, consensus, normalize, rescale = TASK_VECTOR_TABLE[name]
    options = [{"gamma": 0.03, "epsilon": 0.2}, {"gamma": 0.1, "epsilon": 0.05}]
    models = [{**p, **o} for p, o in zip(per_model(name, 2, weight=[0.6, 0.4], density=[0.5, 0.7]), options)]
    out = get_method(name).run(call(tensors, base=base, per_model=models, params=defaults(name), seed=4))
    expected = task_vector_merge(
        base,
        tensors,
        [0.6, 0.4],
        [0.5, 0.7],
        sparsifier=sparsifier,
        consensus=consensus,
        normalize=normalize,
        rescale=rescale,
        generators=[torch.Generator().manual_seed(4000 + i) for i in range(2)],
        sparsifier_options=options,
    )
    assert bits(out) == bits(expected)


@pytest.mark.parametrize("name, parameter", [("breadcrumbs", "gamma"), ("della_linear", "epsilon")])
def test_task_vector_adapters_pass_gamma_and_epsilon_to_the_sparsifier(name, parameter):
    g = torch.Generator().manual_seed(7)
    base = torch.randn(20, 20, generator=g)
    tensors = [base + torch.randn(20, 20, generator=g)]
    run = get_method(name).run
    outputs = [
        run(call(tensors, base=base, per_model=per_model(name, 1, weight=[1.0], density=[0.5], **{parameter: [v]}),
                 params=defaults(name), seed=3))
        for v in (0.0, 0.3)
    ]  # fmt: skip
    assert not torch.equal(outputs[0], outputs[1])


def test_sce_and_ram_adapters_run_their_math_with_the_resolved_globals():
    g = torch.Generator().manual_seed(8)
    base = torch.randn(12, 9, generator=g).to(torch.bfloat16)
    tensors = [base + torch.randn(12, 9, generator=g).to(torch.bfloat16) for _ in range(3)]
    models = [{}, {}, {}]
    sce = get_method("sce").run(call(tensors, base=base, per_model=models, params=defaults("sce", select_topk=0.4)))
    assert bits(sce) == bits(sce_merge(base, tensors, select_topk=0.4))
    ram = get_method("ram").run(call(tensors, base=base, per_model=models, params=defaults("ram", epsilon=0.5)))
    assert bits(ram) == bits(ram_merge(base, tensors, epsilon=0.5))
    params = defaults("ramplus_tl", r=0.3, alpha=1.0)
    ramplus = get_method("ramplus_tl").run(call(tensors, base=base, per_model=models, params=params))
    assert bits(ramplus) == bits(ramplus_tl_merge(base, tensors, epsilon=1e-5, r=0.3, alpha=1.0))


@pytest.mark.parametrize("name", ["sce", "ram", "ramplus_tl"])
def test_sce_and_ram_adapters_need_a_base_tensor_and_return_it_alone(name):
    base = torch.randn(4)
    assert get_method(name).run(call([], base=base, params=defaults(name))) is base
    with pytest.raises(MergeError, match="model.layers.0.w.*no base tensor"):
        get_method(name).run(call([torch.ones(4)], base=None, params=defaults(name)))


@pytest.mark.parametrize("name", ["ties", "dare_ties", "breadcrumbs_ties", "della"])
def test_int8_mask_has_no_numeric_effect(name):
    g = torch.Generator().manual_seed(5)
    base = torch.randn(30, generator=g).to(torch.bfloat16)
    tensors = [base + torch.randn(30, generator=g).to(torch.bfloat16) for _ in range(3)]
    models = per_model(name, 3, weight=[0.5, 0.3, 0.2], density=[0.5, 0.5, 0.5])
    method = get_method(name)
    plain = method.run(call(tensors, base=base, per_model=models, params=defaults(name, int8_mask=False)))
    int8 = method.run(call(tensors, base=base, per_model=models, params=defaults(name, int8_mask=True)))
    assert bits(plain) == bits(int8)


def test_dare_adapter_draws_one_generator_per_input_so_seeds_change_the_result():
    g = torch.Generator().manual_seed(6)
    base = torch.randn(20, 20, generator=g)
    tensors = [base + torch.randn(20, 20, generator=g) for _ in range(2)]
    models = per_model("dare_linear", 2, weight=[0.5, 0.5], density=[0.5, 0.5])
    run = get_method("dare_linear").run
    first = run(call(tensors, base=base, per_model=models, params=defaults("dare_linear"), seed=1))
    again = run(call(tensors, base=base, per_model=models, params=defaults("dare_linear"), seed=1))
    other = run(call(tensors, base=base, per_model=models, params=defaults("dare_linear"), seed=2))
    assert bits(first) == bits(again) and not torch.equal(first, other)


def test_task_vector_adapter_without_a_base_tensor_is_a_merge_error():
    with pytest.raises(MergeError, match="no base tensor"):
        get_method("ties").run(call([torch.ones(3)], base=None, per_model=per_model("ties", 1, weight=[1.0])))


def test_merge_errors_from_the_math_name_the_output_tensor():
    base = torch.zeros(5)
    models = per_model("ties", 1, weight=[1.0], density=[0.1])
    with pytest.raises(MergeError, match=r"tensor `model.layers.0.w`: density 0\.1"):
        get_method("ties").run(call([torch.ones(5)], base=base, per_model=models, params=defaults("ties")))


def test_passthrough_scales_in_the_tensor_dtype_and_leaves_it_alone_without_a_scale():
    x = torch.randn(7).to(torch.bfloat16)
    run = get_method("passthrough").run
    assert run(call([x], per_model=[{"scale": None}])) is x
    assert run(call([x], per_model=[{"scale": 1.0}])) is x
    scaled = run(call([x], per_model=[{"scale": 0.37}]))
    assert scaled.dtype == torch.bfloat16 and bits(scaled) == bits(x * 0.37)
    assert bits(run(call([], base=x, base_params={"scale": 0.5}))) == bits(x * 0.5)


def test_passthrough_scale_of_one_returns_the_same_bits():
    x = torch.tensor([1.5, -0.0, float("inf")], dtype=torch.float16)
    assert bits(passthrough(x, 1.0)) == bits(x)
    assert bits(passthrough(x, 2.0)) == bits(torch.tensor([3.0, -0.0, float("inf")], dtype=torch.float16))


def test_passthrough_with_more_than_one_input_is_a_merge_error():
    with pytest.raises(MergeError, match="exactly one input"):
        get_method("passthrough").run(call([torch.ones(2), torch.ones(2)]))


def test_mkmerge_methods_lists_every_method_with_its_parameters_defaults_and_base_handling():
    from typer.testing import CliRunner

    from mkmerge.cli import methods_app

    result = CliRunner().invoke(methods_app, [], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    rows = {line.split("│")[1].strip(): line for line in result.output.splitlines() if line.count("│") == 4}
    assert set(METHODS) <= set(rows)
    assert "required" in rows["della"] and "ordinary input" in rows["linear"]
    for expected in (
        "gamma (per model, 0.01)", "epsilon (per model, 0.15)", "select_topk (global, 1.0)",
        "epsilon (global, 1e-05)", "alpha (global, 0.2)", "r (global, 0.1)",
    ):  # fmt: skip
        assert expected in result.output, expected
