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
