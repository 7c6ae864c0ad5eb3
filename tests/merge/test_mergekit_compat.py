"""Rules and numbers that follow mergekit 0.1.5 (each found by running it on tiny models)."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from mkmerge.cli import merge_app
from mkmerge.methods import METHODS
from mkmerge.plan import plan_merge
from mkmerge.recipe import parse_recipe
from mkmerge.run import run_merge
from mksuite.common.build import BuildOptions
from mksuite.common.errors import ShapeMismatchError

EMBED = "model.embed_tokens.weight"


@pytest.fixture
def vocabularies(tiny_family, tiny_model):
    """The family's base and a fine-tune (128 tokens), and a llama of the same shape with 160 tokens."""
    base, (ft1, _) = tiny_family("llama")
    return base, ft1, tiny_model("llama", vocab=160, seed=6)


def task_arithmetic(base, other) -> str:
    return (
        f"merge_method: task_arithmetic\nbase_model: {base}\ndtype: float32\n"
        f"models:\n  - model: {other}\n    parameters: {{weight: 0.5}}\n"
    )


def run_cli(tmp_path, text: str, *options: str):
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(text)
    return CliRunner().invoke(merge_app, [str(recipe), str(tmp_path / "out"), "--quiet", *options])


# --- vocabulary sizes ----------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["linear", "ties", "slerp"])
def test_different_vocabulary_sizes_without_tokenizer_settings_are_refused(
    tmp_path, vocabularies, no_tensor_reads, method
):
    base, _, wide = vocabularies
    text = (
        f"merge_method: {method}\nbase_model: {base}\nparameters: {{t: 0.5, weight: 0.5, density: 0.5}}\n"
        f"models:\n  - model: {base}\n  - model: {wide}\n"
    )
    result = run_cli(tmp_path, text)
    assert result.exit_code == ShapeMismatchError.exit_code, result.output
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()
    message = " ".join(result.stderr.split())
    for expected in ("128, 160 rows", f"{base}: [128, 32]", f"{wide}: [160, 32]"):
        assert expected in message
    assert "tokenizer_source: base" in message and "--unsafe-truncate-embeddings" in message


def test_tokenizer_settings_align_different_vocabularies_instead_of_refusing(vocabularies):
    base, _, wide = vocabularies
    text = task_arithmetic(base, wide) + "tokenizer_source: base\n"
    planned = plan_merge(parse_recipe(text, known_methods=METHODS.keys()))
    assert {o.name: o.shape for o in planned.outputs}[EMBED] == (128, 32)


@pytest.mark.parametrize("larger_is_base", [False, True])
def test_unsafe_truncation_keeps_the_smallest_vocabulary_whichever_model_is_the_base(
    tmp_path, vocabularies, larger_is_base
):
    """mergekit 0.1.5 with the flag cuts every input to the smallest row count, the base too."""
    from tiny_models import read_tensors

    small, _, wide = vocabularies
    base, other = (wide, small) if larger_is_base else (small, wide)
    with pytest.warns(UserWarning, match=r"UNSAFE: cutting to 128 rows"):
        run_merge(
            parse_recipe(task_arithmetic(base, other), known_methods=METHODS.keys()),
            tmp_path / "out",
            BuildOptions(),
            unsafe_truncate_embeddings=True,
        )
    merged, b, o = read_tensors(tmp_path / "out"), read_tensors(base), read_tensors(other)
    b_rows, o_rows = b[EMBED][:128].double(), o[EMBED][:128].double()
    expected = (b_rows + 0.5 * (o_rows - b_rows)).float()
    assert merged[EMBED].shape == (128, 32)
    torch.testing.assert_close(merged[EMBED], expected, rtol=0, atol=2e-7)
    # config.json states the rows written, so the output loads (mergekit leaves the base's count)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == 128


def test_the_cli_flag_turns_truncation_on(tmp_path, vocabularies):
    base, _, wide = vocabularies
    result = run_cli(tmp_path, task_arithmetic(base, wide), "--unsafe-truncate-embeddings")
    assert result.exit_code == 0, result.output
    assert "UNSAFE: cutting to 128 rows" in " ".join(result.stderr.split())


def test_arcee_fusion_writes_float32_as_mergekit_and_precise_keeps_the_recipe_dtype(tmp_path, tiny_family):
    from safetensors import safe_open

    from tiny_models import load_causal_lm, read_tensors

    base, (ft1, _) = tiny_family("llama", dtype=torch.bfloat16)
    text = f"merge_method: arcee_fusion\nbase_model: {base}\ndtype: bfloat16\nmodels:\n  - model: {base}\n  - model: {ft1}\n"
    outputs = {}
    for name, options in (("default", ()), ("precise", ("--precise",))):
        (tmp_path / name).mkdir()
        result = run_cli(tmp_path / name, text, *options)
        assert result.exit_code == 0, result.output
        out = tmp_path / name / "out"
        with safe_open(out / "model.safetensors", "pt") as f:
            dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
        assert dtypes == ({"F32"} if name == "default" else {"BF16"})
        assert json.loads((out / "config.json").read_text()).get("dtype", "bfloat16") == "bfloat16"
        load_causal_lm(out)  # loads either way
        outputs[name] = read_tensors(out)
    inputs = read_tensors(base), read_tensors(ft1)
    for key, merged in outputs["precise"].items():
        a, b = (t[key] for t in inputs)
        # --precise copies the chosen entries: every entry is the base's or the other model's
        assert torch.equal(torch.where(merged == b, b, a), merged)
        # the default adds the masked delta in float32: the same choice wherever both are exact
        assert outputs["default"][key].dtype == torch.float32


def test_precise_is_not_an_mkstack_option_and_is_one_for_mkmoe():
    from mkmoe.cli import app as moe_app
    from mkstack.cli import stack_app

    assert "--precise" in CliRunner().invoke(moe_app, ["build", "--help"], terminal_width=200).output
    stack_help = CliRunner().invoke(stack_app, ["stack", "--help"], terminal_width=200).output
    assert "--expand" in stack_help and "--precise" not in stack_help
