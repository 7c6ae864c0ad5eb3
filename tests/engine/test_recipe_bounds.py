"""Recipe loading is bounded: alias bombs, merge-key bombs, deep nesting and huge files fail fast and small."""

from __future__ import annotations

import subprocess
import sys
import tracemalloc

import pytest

from mksuite.common.errors import RecipeError
from mksuite.common.recipe import MAX_DEPTH, MAX_NODES, MAX_RECIPE_BYTES, load_documents, read_recipe_file

MIB = 1024 * 1024


def alias_bomb(levels: int = 9) -> str:
    """The "billion laughs" file: each anchor lists the previous one ten times (10**levels strings)."""
    lines = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, levels + 1)]
    return "\n".join(lines) + "\n"


def merge_key_bomb(levels: int = 9) -> str:
    """The same growth through `<<:` merge keys, which PyYAML flattens eagerly."""
    lines = ["b0: &b0 {" + ", ".join(f"k{j}: 1" for j in range(10)) + "}"]
    lines += [f"b{i}: &b{i}\n  <<: [" + ", ".join([f"*b{i - 1}"] * 10) + "]" for i in range(1, levels + 1)]
    return "\n".join(lines) + "\n"


def load_measured(text: str) -> tuple[RecipeError, int]:
    """The RecipeError loading ``text`` raises, and the peak Python allocation while loading it."""
    tracemalloc.start()
    try:
        with pytest.raises(RecipeError) as info:
            load_documents(text, source_name="bomb.yml")
        return info.value, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("text", [alias_bomb(), merge_key_bomb()], ids=["aliases", "merge-keys"])
def test_expansion_bomb_fails_small_with_a_recipe_error_saying_why(text):
    error, peak = load_measured(text)
    assert error.exit_code == 2 and error.file == "bomb.yml"
    assert f"more than {MAX_NODES:,} values" in error.message and "alias" in error.message
    assert peak < 64 * MIB  # the unbounded load grows past 2 GiB


def test_bomb_in_a_later_document_is_caught_across_documents():
    # Each document alone stays under the bound; together they must not.
    small = alias_bomb(levels=4)  # 10**4 strings per document
    error, _ = load_measured("---\n".join([small] * 12))
    assert "values" in error.message


def test_aliases_within_the_bound_still_load():
    (document,) = load_documents(alias_bomb(levels=3))
    assert len(document.data["a3"]) == 10 and document.data["a3"][0][0][0] == ["lol"] * 10


@pytest.mark.parametrize("opening", ["[", "{a: "], ids=["lists", "mappings"])
def test_deep_nesting_is_refused_before_the_stack_runs_out(opening):
    error, peak = load_measured(opening * 1000)
    assert f"more than {MAX_DEPTH} levels deep" in error.message and error.line == 1
    assert peak < 64 * MIB


def test_nesting_a_recipe_would_use_loads():
    (document,) = load_documents("a: " + "[" * 20 + "]" * 20 + "\n")
    assert document.data["a"] is not None


def test_oversized_text_is_refused_before_parsing():
    error, _ = load_measured("# padding\n" * (MAX_RECIPE_BYTES // 10 + 1))
    assert "larger than 2 MiB" in error.message


def test_huge_sparse_file_is_refused_without_being_read(tmp_path):
    huge = tmp_path / "huge.yml"
    with open(huge, "wb") as file:
        file.truncate(8 * 1024 * MIB)  # sparse: costs no disk
    tracemalloc.start()
    try:
        with pytest.raises(RecipeError, match="larger than 2 MiB") as info:
            read_recipe_file(huge)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert info.value.file == str(huge) and peak < 16 * MIB


@pytest.mark.parametrize("tool", ["mkmerge", "mkstack", "mkmoe"])
def test_every_tool_exits_2_on_a_bomb_and_writes_nothing(tmp_path, tool):
    text = "merge_method: linear\nmodels: [{model: a, parameters: {weight: 1}}]\n" + alias_bomb()
    if tool == "mkmerge":  # the bomb in the second stage of a multi-stage recipe
        text = "name: first\nmerge_method: linear\nmodels: [{model: a}]\n---\n" + text
    recipe = tmp_path / "bomb.yml"
    recipe.write_text(text)
    # A process of its own: the exit code and output a user sees, whatever the CLI is built with.
    result = subprocess.run(
        [sys.executable, "-m", tool, str(recipe), str(tmp_path / "out")], capture_output=True, text=True, timeout=120
    )
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "bomb.yml" in output and "values" in output and "Traceback" not in output
    assert not (tmp_path / "out").exists()
