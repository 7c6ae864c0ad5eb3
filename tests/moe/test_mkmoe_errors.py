"""Bad mkmoe input fails with one clear error naming the expert or field, before tensor data is read."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from mkmoe.cli import app
from mkmoe.config import parse_moe_config
from mksuite.common.errors import ArchitectureError, RecipeError, ShapeMismatchError

from mkmoe_helpers import build, moe_yaml

GOOD = """\
base_model: base
gate_mode: hidden
experts:
  - source_model: a
    positive_prompts: ["the fox"]
  - source_model: b
    positive_prompts: ["one two"]
"""


# -- config text alone ------------------------------------------------------------------------------------
CONFIG_ERRORS = {
    "top-k above expert count": (GOOD + "experts_per_token: 3\n", "experts_per_token", 8, "only 2 experts"),
    "top-k below one": (GOOD + "experts_per_token: 0\n", "experts_per_token", 8, "at least 1"),
    "missing prompts": (GOOD.replace('    positive_prompts: ["one two"]\n', ""), "experts[1].positive_prompts", 6,
                        "has no positive_prompts"),
    "identical prompt sets": (GOOD.replace("one two", "the fox"), "experts[1].positive_prompts", 7,
                              "same prompts as experts[0]"),
    "same model everywhere": (GOOD.replace("source_model: b", "source_model: a"), "experts", 3, "same model"),
    "unknown gate mode": (GOOD.replace("gate_mode: hidden", "gate_mode: hiden"), "gate_mode", 2, "unknown gate mode"),
    "unknown architecture": (GOOD + "architecture: llama\n", "architecture", 8, "unknown output architecture"),
    "deepseek output": (GOOD + "architecture: deepseek\n", "architecture", 8, "DeepSeek-MoE output is not supported"),
    "no experts": ("base_model: base\nexperts: []\n", "experts", 2, "must not be empty"),
    "mixed shared prompts": (
        GOOD + "shared_experts:\n  - source_model: c\n    positive_prompts: [x]\n  - source_model: d\n",
        "shared_experts[1].positive_prompts", 11, "either every shared expert",
    ),
    "negative noise": (GOOD + "    noise_scale: -0.5\n", "experts[1].noise_scale", 8, "zero or positive"),
}  # fmt: skip


@pytest.mark.parametrize("case", CONFIG_ERRORS, ids=str)
def test_config_errors_name_field_and_line(case):
    text, field, line, words = CONFIG_ERRORS[case]
    with pytest.raises(RecipeError) as caught:
        parse_moe_config(text, source_name="moe.yml")
    error = caught.value
    assert (error.field, error.line, error.file) == (field, line, "moe.yml")
    assert words in error.message


@pytest.mark.parametrize("mode", ["random", "uniform_random"])
def test_random_gate_modes_need_no_prompts(mode):
    text = f"base_model: base\ngate_mode: {mode}\nexperts:\n  - source_model: a\n  - source_model: b\n"
    config = parse_moe_config(text)
    assert config.gate_mode == mode and not config.uses_prompts


def test_acknowledgement_allows_all_experts_to_be_one_model():
    config = parse_moe_config(GOOD.replace("source_model: b", "source_model: a"), allow_identical_experts=True)
    assert config.experts[0].source_model == config.experts[1].source_model


@pytest.mark.parametrize("spelling,expected", [("Mixtral", "mixtral"), ("qwen", "qwen"), ("Qwen3", "qwen3"),
                                               ("qwen2_moe", "qwen"), ("MIX", "mixtral"), ("GraniteMoe", "granitemoe"),
                                               ("granitemoe_swa", "granitemoe_swa"), ("flex_olmo", "flex_olmo"),
                                               ("Ernie4_5_Moe", "ernie4_5_moe"), ("cohere2_moe", "cohere2_moe")])  # fmt: skip
def test_architecture_is_a_case_insensitive_prefix(spelling, expected):
    assert parse_moe_config(GOOD + f"architecture: {spelling}\n").architecture == expected


def test_hidden_last_is_hidden_and_unknown_keys_only_warn():
    with pytest.warns(UserWarning, match="unknown key `exprts_per_token`.*did you mean `experts_per_token`"):
        config = parse_moe_config(GOOD.replace("hidden", "hidden_last") + "exprts_per_token: 1\n")
    assert config.gate_mode == "hidden" and config.experts_per_token == 2


# -- against the models, before any tensor data ----------------------------------------------------------


def _models(tiny_family, tiny_model):
    llama, (ft1, ft2) = tiny_family("llama")
    return {
        "base": llama, "ft1": ft1, "ft2": ft2,
        "wide": tiny_model("llama", hidden=64), "deep": tiny_model("llama", layers=4),
        "mistral": tiny_model("mistral"), "qwen2": tiny_family("qwen2")[0], "qwen2-ft": tiny_family("qwen2")[1][0],
        "qwen3": tiny_model("qwen3"),
    }  # fmt: skip


MODEL_ERRORS = {
    "wider expert": (["ft1", "wide"], {}, (), ShapeMismatchError, "experts[1] (", "hidden size 64"),
    "deeper expert": (["ft1", "deep"], {}, (), ShapeMismatchError, "experts[1] (", "4 layers"),
    "expert of another architecture": (["ft1", "mistral"], {}, (), ArchitectureError, "experts[1] (", "mistral model"),
    "qwen3 output from llama": (["ft1", "ft2"], {"architecture": "qwen3"}, (), ArchitectureError, "Qwen3-MoE",
                                "inputs are llama"),
    "granitemoe output from llama": (["ft1", "ft2"], {"architecture": "granitemoe"}, (), ArchitectureError,
                                     "GraniteMoe", "built from granite models, but the inputs are llama"),
    "mixtral output with shared expert": (["ft1", "ft2"], {"architecture": "mixtral"}, ["base"], RecipeError,
                                          "shared_experts", "Mixtral has no shared experts"),
    "qwen2 output with two shared experts": (["ft1", "ft2"], {"architecture": "qwen"}, ["base", "ft1"], RecipeError,
                                             "shared_experts", "at most one shared expert"),
}  # fmt: skip


@pytest.mark.parametrize("case", MODEL_ERRORS, ids=str)
def test_incompatible_models_fail_before_reading_tensors_and_write_nothing(
    case, tiny_family, tiny_model, tmp_path, no_tensor_reads
):
    experts, extras, shared, error_type, culprit, words = MODEL_ERRORS[case]
    models = _models(tiny_family, tiny_model)
    text = moe_yaml(models["base"], [models[e] for e in experts], shared=[models[s] for s in shared],
                    gate_mode="random", **extras)  # fmt: skip
    with pytest.raises(error_type) as caught:
        build(tmp_path / "out", text)
    assert culprit in caught.value.render() and words in caught.value.render()
    assert not (tmp_path / "out").exists()


def test_shared_expert_without_prompts_needs_random_gates(tiny_family, tmp_path, no_tensor_reads):
    base, (ft1, ft2) = tiny_family("llama")
    experts = [{"model": ft1, "positive_prompts": ["a"]}, {"model": ft2, "positive_prompts": ["b"]}]
    with pytest.raises(RecipeError, match="shared expert of a Qwen2-MoE is gated") as caught:
        build(tmp_path / "out", moe_yaml(base, experts, shared=[base], gate_mode="hidden"))
    assert caught.value.field == "shared_experts[0].positive_prompts"


def test_existing_output_is_refused_before_anything_else(tiny_family, tmp_path, no_tensor_reads):
    from mkmoe.run import run_moe
    from mksuite.common.build import BuildOptions
    from mksuite.common.errors import OutputError

    base, (ft1, ft2) = tiny_family("llama")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(OutputError):
        run_moe(parse_moe_config(moe_yaml(base, [ft1, ft2], gate_mode="random")), tmp_path / "out", BuildOptions())
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]


# -- command line ------------------------------------------------------------------------------------------------
def test_cli_reports_config_error_with_line_and_exit_code(tmp_path):
    config = tmp_path / "moe.yml"
    config.write_text(GOOD + "experts_per_token: 5\n")
    result = CliRunner().invoke(app, [str(config), str(tmp_path / "out"), "--quiet"])
    assert result.exit_code == 2
    assert "moe.yml:8" in result.output and "experts_per_token" in result.output
    assert not (tmp_path / "out").exists()


def test_cli_flag_acknowledges_identical_experts_and_builds(tiny_family, tmp_path):
    base, _ = tiny_family("llama")
    config = tmp_path / "moe.yml"
    config.write_text(moe_yaml(base, [base, base], gate_mode="uniform_random"))  # `random` needs no flag
    refused = CliRunner().invoke(app, [str(config), str(tmp_path / "no"), "--quiet"])
    assert refused.exit_code == 2 and "--i-understand-this-is-not-useful-without-training" in refused.output
    flag = "--i-understand-this-is-not-useful-without-training"
    built = CliRunner().invoke(app, [str(config), str(tmp_path / "yes"), "--quiet", flag, "--layout", "fused"])
    assert built.exit_code == 0, built.output
    assert (tmp_path / "yes" / "model.safetensors").exists() and not (tmp_path / "no").exists()


def test_cli_rejects_unknown_layout(tmp_path):
    config = tmp_path / "moe.yml"
    config.write_text(GOOD)
    result = CliRunner().invoke(app, [str(config), str(tmp_path / "out"), "--layout", "fuse", "--quiet"])
    assert result.exit_code == 2 and "did you mean `fused`" in result.output


@pytest.mark.parametrize("arch", ["gemma2", "phi3"])
def test_inputs_no_output_architecture_is_built_from_are_refused(arch, tiny_model, tmp_path, no_tensor_reads):
    from mkmoe.cli import app as moe_app
    from mkmoe.outputs import supported_bases

    base, other = tiny_model(arch), tiny_model(arch, seed=1)
    with pytest.raises(ArchitectureError, match=f"no MoE output architecture is built from {arch} models") as caught:
        build(tmp_path / "out", moe_yaml(base, [base, other], gate_mode="random"))
    assert all(name in caught.value.render() for name in supported_bases())
    assert not (tmp_path / "out").exists()
    config = tmp_path / "moe.yml"
    config.write_text(moe_yaml(base, [base, other], gate_mode="random"))
    result = CliRunner().invoke(moe_app, [str(config), str(tmp_path / "out"), "--quiet"])
    assert result.exit_code == 5 and "Traceback" not in result.output
    assert "olmo2" in result.output and not (tmp_path / "out").exists()
