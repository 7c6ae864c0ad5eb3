"""The geometric methods in the engine: declarations, plan-time checks, whole merges on tiny models."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_methods_spherical import karcher_reference, multislerp_reference, nuslerp_reference
from test_methods_stock_swap_fusion import model_stock_reference, nearswap_reference
from typer.testing import CliRunner

from mkmerge.cli import merge_app, methods_app
from mkmerge.methods import METHODS, REQUIRED, MethodCall, get_method
from mkmerge.methods.karcher import karcher_merge
from mkmerge.plan import plan_merge
from mkmerge.recipe import parse_recipe
from mkmerge.run import run_merge
from mkmerge.tasks import MergeTensor
from mksuite.common.build import BuildOptions
from mksuite.common.errors import MergeError, RecipeError, ShapeMismatchError

from run_helpers import merged_tensors
from tiny_models import copy_model, load_causal_lm, logits, read_tensors

GEOMETRIC = ("nuslerp", "multislerp", "karcher", "model_stock", "nearswap", "arcee_fusion")

RECIPES = {
    "nuslerp": "merge_method: nuslerp\nbase_model: {base}\nmodels:\n  - model: {a}\n    parameters: {{weight: 0.7}}\n"
    "  - model: {b}\n    parameters: {{weight: 0.3}}\nparameters: {{nuslerp_flatten: false}}\n",
    "multislerp": "merge_method: multislerp\nmodels:\n  - model: {base}\n    parameters: {{weight: 0.2}}\n"
    "  - model: {a}\n    parameters: {{weight: 0.5}}\n  - model: {b}\n    parameters: {{weight: 0.3}}\n",
    "karcher": "merge_method: karcher\nbase_model: {base}\nmodels:\n  - model: {a}\n  - model: {b}\n",
    "model_stock": "merge_method: model_stock\nbase_model: {base}\nmodels:\n  - model: {a}\n  - model: {b}\n",
    "nearswap": "merge_method: nearswap\nbase_model: {base}\nmodels:\n  - model: {a}\nparameters: {{t: 0.002}}\n",
    "arcee_fusion": "merge_method: arcee_fusion\nbase_model: {base}\nmodels:\n  - model: {a}\n",
}


def plan(text: str):
    return plan_merge(parse_recipe(text, known_methods=METHODS.keys()))


def merge(text: str, out: Path, **options) -> dict[str, torch.Tensor]:
    # model_stock warns about t on random fine-tunes
    return merged_tensors(text, out, quiet_warnings=True, **options)


def refused(tmp_path: Path, text: str, error: type) -> str:
    """Run the CLI on `text`; it must exit with `error`'s code and write nothing. Returns stderr."""
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(text)
    result = CliRunner().invoke(merge_app, [str(recipe), str(tmp_path / "out"), "--quiet"])
    assert result.exit_code == error.exit_code, result.output
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()
    return result.stderr


# --- declarations -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, base, inputs, globals_, per_model",
    [
        ("nuslerp", "optional", (2, 3), {"nuslerp_flatten": True, "nuslerp_row_wise": False}, {"weight": REQUIRED}),
        ("multislerp", "optional", (1, None), {"normalize_weights": True, "eps": 1e-8}, {"weight": REQUIRED}),
        ("karcher", "none", (1, None), {"max_iter": 10, "tol": 1e-5}, {}),
        ("model_stock", "required", (3, None), {"filter_wise": False}, {}),
        ("nearswap", "required", (2, 2), {"t": REQUIRED}, {}),
        ("arcee_fusion", "required", (2, 2), {}, {}),
    ],
)
def test_geometric_methods_declare_the_spec_parameters(name, base, inputs, globals_, per_model):
    method = get_method(name)
    assert method.base_model == base and (method.min_inputs, method.max_inputs) == inputs
    assert {p.name: p.default for p in method.global_parameters()} == globals_
    assert {p.name: p.default for p in method.per_model_parameters()} == per_model
    for spec in method.parameters:  # values are converted to the default's type
        assert spec.default is REQUIRED or spec.kind is type(spec.default), spec.name


def test_methods_command_lists_every_geometric_method_with_parameters_and_base():
    result = CliRunner().invoke(methods_app, [], terminal_width=200)
    assert result.exit_code == 0, result.output
    rows = {line.split("│")[1].strip(): line for line in result.output.splitlines() if line.count("│") >= 3}
    for name in GEOMETRIC:
        assert name in rows, result.output
    assert "optional" in rows["nuslerp"] and "weight (per model, required)" in rows["nuslerp"]
    assert "ordinary input" in rows["karcher"] and "max_iter (global, 10)" in rows["karcher"]
    assert "required" in rows["model_stock"] and "filter_wise (global, False)" in rows["model_stock"]
    assert "t (global, required)" in rows["nearswap"]
    assert "nuslerp_flatten (global, True)" in result.output and "eps (global, 1e-08)" in result.output


def test_merge_task_label_names_the_tensor_without_splitting_identical_tasks():
    one = MergeTensor("karcher", (), None, (), (), label="model.layers.0.mlp.up_proj.weight")
    two = MergeTensor("karcher", (), None, (), (), label="model.layers.5.mlp.up_proj.weight")
    assert one == two and hash(one) == hash(two)


# --- adapters ---------------------------------------------------------------------------------


def call(tensors=(), base=None, per_model=None, params=None, name="model.layers.0.w"):
    tensors = tuple(tensors)
    return MethodCall(
        tensors=tensors,
        base=base,
        per_model=tuple(per_model if per_model is not None else [{} for _ in tensors]),
        base_params={},
        params=params or {},
        generator=lambda i: torch.Generator().manual_seed(100 + i),
        tensor_name=name,
    )


def test_nuslerp_adapter_takes_t_from_the_two_weights_and_keeps_a_lone_input():
    g = torch.Generator().manual_seed(1)
    a, b, base = (torch.randn(4, 6, generator=g) for _ in range(3))
    params = {"nuslerp_flatten": False, "nuslerp_row_wise": True}
    out = get_method("nuslerp").run(call([a, b], base, [{"weight": 3.0}, {"weight": 1.0}], params))
    expected = nuslerp_reference(0.25, a, b, base=base, flatten=False, row_wise=True)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)
    assert get_method("nuslerp").run(call([a], base, [{"weight": 1.0}], params)) is a
    assert get_method("nuslerp").run(call([], base, [], params)) is base


def test_karcher_adapter_counts_the_base_as_an_ordinary_input():
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(10, generator=g), torch.randn(10, generator=g)
    out = get_method("karcher").run(call([a], b, params={"max_iter": 10, "tol": 1e-5}))
    torch.testing.assert_close(out.double(), karcher_reference([a, b]), rtol=1e-5, atol=1e-6)


def test_model_stock_adapter_warns_naming_the_tensor_when_t_leaves_zero_to_one():
    base = torch.zeros(3)
    a, b = torch.tensor([1.0, 0.2, 0.0]), torch.tensor([-1.0, 0.2, 0.0])
    with pytest.warns(UserWarning, match=r"model_stock, tensor model\.layers\.0\.w: t = -\d"):
        get_method("model_stock").run(call([a, b], base, params={"filter_wise": False}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        get_method("model_stock").run(call([a, a * 2], base, params={"filter_wise": False}))
    assert get_method("model_stock").run(call([], base, params={"filter_wise": False})) is base


@pytest.mark.parametrize("name, params", [("nearswap", {"t": 0.1}), ("arcee_fusion", {})])
def test_base_and_one_other_methods_refuse_a_second_other_and_return_a_lone_base(name, params):
    x = torch.ones(3)
    with pytest.raises(MergeError, match=rf"model\.layers\.0\.w.*{name} merges the base model with exactly one"):
        get_method(name).run(call([x, x], x, params=params))
    assert get_method(name).run(call([], x, params=params)) is x


# --- plan-time refusals -----------------------------------------------------------------------


def test_nuslerp_base_that_is_one_of_the_two_models_is_refused_before_reading(tmp_path, family, tensor_reads):
    base, a, _ = family
    text = (
        f"merge_method: nuslerp\nbase_model: {a}\nmodels:\n  - model: {a}\n    parameters: {{weight: 0.5}}\n"
        f"  - model: {base}\n    parameters: {{weight: 0.5}}\n"
    )
    stderr = refused(tmp_path, text, RecipeError)
    assert f"the base model {a} cannot be one of the 2" in stderr and "third model" in stderr
    assert tensor_reads == []


def test_nuslerp_with_three_models_and_no_base_is_refused(tmp_path, family, tensor_reads):
    text = "merge_method: nuslerp\nmodels:\n" + "".join(
        f"  - model: {m}\n    parameters: {{weight: 1}}\n" for m in family
    )
    stderr = refused(tmp_path, text, RecipeError)
    assert "takes exactly 2 models besides the base model, but 3 are given" in stderr
    assert tensor_reads == []


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "merge_method: nearswap\nbase_model: {base}\nparameters: {{t: 1}}\nmodels:\n  - model: {a}\n  - model: {b}\n",
            "takes exactly 2 input models",
        ),
        (
            "merge_method: arcee_fusion\nbase_model: {base}\nmodels:\n  - model: {a}\n  - model: {b}\n",
            "takes exactly 2 input models",
        ),
        ("merge_method: model_stock\nbase_model: {base}\nmodels:\n  - model: {a}\n", "takes at least 3 input models"),
        (
            "merge_method: model_stock\nmodels:\n  - model: {a}\n  - model: {b}\n  - model: {base}\n",
            "needs a base model",
        ),
        ("merge_method: nearswap\nbase_model: {base}\nmodels:\n  - model: {a}\n", "needs parameter `t`"),
        (
            "merge_method: multislerp\nmodels:\n  - model: {a}\n  - model: {b}\n    parameters: {{weight: 1}}\n",
            "needs parameter `weight` for model",
        ),
    ],
)
def test_input_counts_base_and_parameters_are_checked_at_plan_time(tmp_path, family, tensor_reads, text, message):
    base, a, b = family
    assert message in refused(tmp_path, text.format(base=base, a=a, b=b), RecipeError)
    assert tensor_reads == []


def test_multislerp_weights_summing_to_zero_are_refused_before_reading(tmp_path, family, tensor_reads):
    base, a, b = family
    text = (
        f"merge_method: multislerp\nbase_model: {base}\nmodels:\n  - model: {a}\n    parameters: {{weight: 1}}\n"
        f"  - model: {b}\n    parameters: {{weight: -1}}\n"
    )
    assert "sum to zero" in refused(tmp_path, text, MergeError)
    assert tensor_reads == []
    merged = merge(text + "parameters: {normalize_weights: false}\n", tmp_path / "raw")
    assert merged.keys() == read_tensors(a).keys()


# --- vocabulary sizes (docs/methods.md) -------------------------------------------------------------


@pytest.fixture
def wide_vocab(tiny_model):
    """A llama of the family's shape but 160 tokens instead of 128."""
    return tiny_model("llama", vocab=160, seed=5)


@pytest.mark.parametrize("name", ["nuslerp", "karcher", "model_stock", "arcee_fusion"])
def test_cutting_methods_merge_the_common_embedding_rows(family, wide_vocab, name):
    base, a, _ = family
    with pytest.warns(UserWarning, match="different vocabulary sizes"):
        planned = plan_merge(
            parse_recipe(RECIPES[name].format(base=base, a=wide_vocab, b=a), known_methods=METHODS.keys()),
            unsafe_truncate_embeddings=True,
        )
    shapes = {o.name: o.shape for o in planned.outputs}
    assert shapes["model.embed_tokens.weight"] == (128, 32)


@pytest.mark.parametrize("name", ["multislerp", "nearswap"])
def test_different_vocabularies_without_tokenizer_settings_are_refused_before_reading(
    tmp_path, family, wide_vocab, tensor_reads, name
):
    base, a, _ = family
    text = RECIPES[name].format(base=base, a=wide_vocab, b=a)
    stderr = refused(tmp_path, text, ShapeMismatchError)
    assert "different vocabulary sizes (128, 160 rows)" in stderr and "--unsafe-truncate-embeddings" in stderr
    assert tensor_reads == []


def test_karcher_of_different_vocabularies_merges_the_leading_rows_and_loads(tmp_path, family, wide_vocab):
    base, _, _ = family
    text = f"merge_method: karcher\nbase_model: {base}\nmodels:\n  - model: {wide_vocab}\n"
    with pytest.warns(UserWarning, match="cutting to 128 rows"):
        run_merge(
            parse_recipe(text, known_methods=METHODS.keys()),
            tmp_path / "out",
            BuildOptions(),
            unsafe_truncate_embeddings=True,
        )
    merged = read_tensors(tmp_path / "out")
    small, large = read_tensors(base), read_tensors(wide_vocab)
    name = "model.embed_tokens.weight"
    assert merged[name].shape == (128, 32)
    assert torch.equal(merged[name], karcher_merge([large[name][:128], small[name]]))
    assert torch.isfinite(logits(load_causal_lm(tmp_path / "out"), [1, 2, 3])).all()


# --- model_stock and optional tensors (docs/methods.md) ---------------------------------------------


def with_extra_tensor(model: Path, target: Path, name: str, value: torch.Tensor) -> Path:
    copy = copy_model(model, target)
    tensors = load_file(copy / "model.safetensors")
    tensors[name] = value
    save_file(tensors, copy / "model.safetensors", metadata={"format": "pt"})
    return copy


BIAS = "model.layers.0.self_attn.q_proj.bias"


def test_model_stock_leaves_out_an_optional_tensor_fewer_than_three_inputs_have(tmp_path, family):
    base, a, b = family
    g = torch.Generator().manual_seed(3)
    base2 = with_extra_tensor(base, tmp_path / "base", BIAS, torch.randn(32, generator=g))
    a2 = with_extra_tensor(a, tmp_path / "a", BIAS, torch.randn(32, generator=g))
    text = RECIPES["model_stock"].format(base=base2, a=a2, b=b)
    with pytest.warns(UserWarning, match=re.escape(BIAS) + r": only 2 input model\(s\) have this optional tensor"):
        planned = plan(text)
    assert BIAS not in {o.name for o in planned.outputs}
    assert "model.layers.0.self_attn.q_proj.weight" in {o.name for o in planned.outputs}
    # linear has no such minimum: it merges the two that have it
    linear = plan(
        f"merge_method: linear\nmodels:\n  - model: {base2}\n  - model: {a2}\n  - model: {b}\n"
        "parameters: {weight: 1}\n"
    )
    assert BIAS in {o.name for o in linear.outputs}


def test_model_stock_merges_an_optional_tensor_all_inputs_have(tmp_path, family):
    base, a, b = family
    g = torch.Generator().manual_seed(4)
    shared = torch.randn(32, generator=g)
    models = [
        with_extra_tensor(m, tmp_path / n, BIAS, shared + 0.1 * torch.randn(32, generator=g) * (n != "base"))
        for m, n in ((base, "base"), (a, "a"), (b, "b"))
    ]
    merged = merge(RECIPES["model_stock"].format(base=models[0], a=models[1], b=models[2]), tmp_path / "out")
    inputs = [read_tensors(m)[BIAS] for m in models]
    expected, _ = model_stock_reference(inputs[0], inputs[1:])
    torch.testing.assert_close(merged[BIAS].double(), expected, rtol=1e-5, atol=1e-6)


# --- whole merges -----------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("name", GEOMETRIC)
def test_geometric_merge_output_loads_in_transformers(tiny_family, tmp_path, arch, name):
    base, (a, b) = tiny_family(arch)
    merged = merge(RECIPES[name].format(base=base, a=a, b=b), tmp_path / "out")
    reference = read_tensors(a)
    assert merged.keys() == reference.keys()
    assert all(merged[k].shape == reference[k].shape and merged[k].dtype == reference[k].dtype for k in merged)
    assert torch.isfinite(logits(load_causal_lm(tmp_path / "out"), [1, 5, 9, 14])).all()


def expected_tensor(name: str, key: str, base, a, b) -> torch.Tensor:
    """Each method's documented formula (docs/methods.md) on one tensor of the family, from the test-side references."""
    wb, wa, wbb = base[key], a[key], b[key]
    if name == "nuslerp":
        return nuslerp_reference(0.3, wa, wbb, base=wb, flatten=False)
    if name == "multislerp":
        return multislerp_reference([wb, wa, wbb], [0.2, 0.5, 0.3])
    if name == "karcher":
        return karcher_reference([wa, wbb, wb])
    if name == "model_stock":
        return model_stock_reference(wb, [wa, wbb])[0]
    if name == "nearswap":
        return nearswap_reference(0.002, wb, wa)
    raise AssertionError(name)


@pytest.mark.parametrize("name", [n for n in GEOMETRIC if n != "arcee_fusion"])
def test_geometric_merge_equals_the_spec_formula_on_every_tensor(tiny_family, tmp_path, name):
    base, (a, b) = tiny_family("llama")
    merged = merge(RECIPES[name].format(base=base, a=a, b=b), tmp_path / "out")
    tb, ta, tbb = read_tensors(base), read_tensors(a), read_tensors(b)
    for key in tb:
        expected = expected_tensor(name, key, tb, ta, tbb)
        torch.testing.assert_close(merged[key].double(), expected, rtol=1e-5, atol=1e-6, msg=key)


def test_arcee_fusion_merge_takes_each_entry_from_the_base_or_the_other_model(tiny_family, tmp_path):
    base, (a, _) = tiny_family("llama")
    merged = merge(RECIPES["arcee_fusion"].format(base=base, a=a), tmp_path / "out")
    tb, ta = read_tensors(base), read_tensors(a)
    taken = 0
    for key, w in tb.items():
        from_other = merged[key] == ta[key]
        assert torch.equal(torch.where(from_other, ta[key], tb[key]), merged[key]), key
        taken += int((from_other & (ta[key] != w)).sum())
    assert 0 < taken < sum(w.numel() for w in tb.values())


@pytest.mark.parametrize("name", ["karcher", "model_stock"])
def test_weights_are_not_required_and_do_not_change_methods_that_ignore_them(tiny_family, tmp_path, name):
    base, (a, b) = tiny_family("llama")
    text = RECIPES[name].format(base=base, a=a, b=b)
    plain = merge(text, tmp_path / "plain")
    weighted = merge(text + "parameters:\n  weight: 0.3\n", tmp_path / "weighted")
    assert all(torch.equal(plain[k], weighted[k]) for k in plain)


def test_model_stock_warnings_name_the_output_tensor_through_the_engine(tiny_family, tmp_path):
    base, (a, b) = tiny_family("llama")
    recipe = parse_recipe(RECIPES["model_stock"].format(base=base, a=a, b=b), known_methods=METHODS.keys())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_merge(recipe, tmp_path / "out", BuildOptions())
    messages = [str(w.message) for w in caught if "model_stock" in str(w.message)]
    # random fine-tunes are nearly orthogonal, so about half the tensors get t < 0
    assert messages and all(re.match(r"model_stock, tensor (model|lm_head)\.\S+: t = ", m) for m in messages)


def test_geometric_results_do_not_depend_on_thread_count(tiny_family, tmp_path):
    base, (a, b) = tiny_family("llama")
    for name in ("nuslerp", "multislerp", "karcher", "arcee_fusion"):
        text = RECIPES[name].format(base=base, a=a, b=b)
        one = merge(text, tmp_path / f"{name}-1", threads=1)
        two = merge(text, tmp_path / f"{name}-2", threads=2)
        assert all(torch.equal(one[k], two[k]) for k in one), name


def test_nuslerp_without_a_base_interpolates_the_two_models_themselves(tiny_family, tmp_path):
    _, (a, b) = tiny_family("llama")
    text = (
        f"merge_method: nuslerp\nmodels:\n  - model: {a}\n    parameters: {{weight: 1}}\n"
        f"  - model: {b}\n    parameters: {{weight: 3}}\n"
    )
    merged = merge(text, tmp_path / "out")
    ta, tb = read_tensors(a), read_tensors(b)
    for key in ta:
        expected = nuslerp_reference(0.75, ta[key], tb[key])
        torch.testing.assert_close(merged[key].double(), expected, rtol=1e-5, atol=1e-6, msg=key)
