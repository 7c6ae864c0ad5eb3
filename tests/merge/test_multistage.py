"""Multi-stage recipes: several documents in one file, run in dependency order by one command."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from mkmerge.cli import merge_app
from mkmerge.methods import METHODS
from mkmerge.stages import parse_stages, rewrite_references
from mksuite.common.errors import RecipeError

from run_helpers import invoke
from tiny_models import load_causal_lm, logits, read_tensors


def cli(*args):
    return invoke(merge_app, *args)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "stages.yml"
    path.write_text(text)
    return path


def stages_of(text: str, out: Path, **kw):
    return parse_stages(text, out=out, known_methods=METHODS.keys(), source_name="stages.yml", **kw)


def three_stage_recipe(base, a, b) -> str:
    # Listed final-first: the runner must order them s1, s2, final.
    return f"""\
merge_method: linear
models:
  - model: s2
    parameters: {{weight: 0.3}}
  - model: {a}
    parameters: {{weight: 0.7}}
---
name: s2
merge_method: task_arithmetic
base_model: {base}
models:
  - model: s1
    parameters: {{weight: 2.0}}
---
name: s1
merge_method: linear
models:
  - model: {a}
    parameters: {{weight: 0.5}}
  - model: {b}
    parameters: {{weight: 0.5}}
"""


def mtimes(directory: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted(directory.iterdir())}


# --- end to end ----------------------------------------------------------------------------------


def test_three_stages_equal_the_composition_computed_directly(family, tmp_path):
    base, a, b = family
    out = tmp_path / "final"
    result = cli(write(tmp_path, three_stage_recipe(base, a, b)), out)
    assert result.exit_code == 0, result.output
    W_base, W_a, W_b = read_tensors(base), read_tensors(a), read_tensors(b)
    stage_dir = tmp_path / "final.stages"
    s1, s2, final = read_tensors(stage_dir / "s1"), read_tensors(stage_dir / "s2"), read_tensors(out)
    assert final.keys() == W_a.keys()
    for name in W_a:
        expect_s1 = (0.5 * W_a[name] + 0.5 * W_b[name]) / 1.0
        expect_s2 = W_base[name] + 2.0 * (expect_s1 - W_base[name])
        expect_final = 0.3 * expect_s2 + 0.7 * W_a[name]
        torch.testing.assert_close(s1[name], expect_s1, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(s2[name], expect_s2, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(final[name], expect_final, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(logits(load_causal_lm(out), [1, 5, 9, 3])).all()


def test_stage_card_and_recipe_copy_hold_the_rewritten_recipe(family, tmp_path):
    base, a, b = family
    out = tmp_path / "final"
    assert cli(write(tmp_path, three_stage_recipe(base, a, b)), out).exit_code == 0
    s2_dir = tmp_path / "final.stages" / "s2"
    copy = (s2_dir / "mergekit_config.yml").read_text()
    assert yaml.safe_load(copy)["models"][0]["model"] == str(tmp_path / "final.stages" / "s1")
    assert "weight: 2.0" in copy and "normalize" not in copy  # only what the document wrote
    assert copy in (s2_dir / "README.md").read_text()
    final_copy = yaml.safe_load((out / "mergekit_config.yml").read_text())
    assert final_copy["models"][0]["model"] == str(tmp_path / "final.stages" / "s2")


def test_numeric_lists_are_reserialised_in_flow_style(family, tmp_path):
    base, a, _ = family
    text = f"""\
name: top
merge_method: passthrough
slices:
  - sources:
      - model: {a}
        layer_range: [0, 3]
---
merge_method: slerp
base_model: {base}
models:
  - model: top
parameters:
  t:
    - 0
    - 0.5
    - 1
"""
    stages = stages_of(text, tmp_path / "out")
    assert "layer_range: [0, 3]" in stages[0].recipe.text
    assert "t: [0, 0.5, 1]" in stages[1].recipe.text


def test_each_stage_output_is_checked_in_full_once(family, tmp_path, monkeypatch):
    """The full output check (name, location, existing contents) runs once per stage; inputs
    learnt later (a stage's inputs that earlier stages produce) are checked as they come."""
    from mksuite.common.writing import output_dir

    base, a, b = family
    checked: list[Path] = []
    full_check = output_dir.OutputDirectory._check_name

    def counting(self):
        checked.append(self.final)
        return full_check(self)

    monkeypatch.setattr(output_dir.OutputDirectory, "_check_name", counting)
    out = tmp_path / "final"
    result = cli(write(tmp_path, three_stage_recipe(base, a, b)), out)
    assert result.exit_code == 0, result.output
    stage_dir = (tmp_path / "final.stages").absolute()
    assert sorted(checked) == sorted([stage_dir / "s1", stage_dir / "s2", out.absolute()])


def test_lazy_rerun_with_overwrite_reuses_the_intermediate_stages_and_recomputes_out(family, tmp_path):
    base, a, b = family
    recipe, out = write(tmp_path, three_stage_recipe(base, a, b)), tmp_path / "final"
    assert cli(recipe, out).exit_code == 0
    stages = (tmp_path / "final.stages" / "s1", tmp_path / "final.stages" / "s2")
    before = {d: mtimes(d) for d in stages}
    final_before = mtimes(out)
    again = CliRunner().invoke(merge_app, [str(recipe), str(out), "--overwrite"])
    assert again.exit_code == 0, again.output
    assert again.output.count("reused (up to date)") == 2
    assert "final stage (document 1): merged" in again.output
    assert {d: mtimes(d) for d in stages} == before
    assert mtimes(out)["model.safetensors"] != final_before["model.safetensors"]


def _one_stage_recipe(a, b) -> str:
    return f"merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 0.5}}\n  - model: {b}\n    parameters: {{weight: 0.5}}\n"


@pytest.mark.parametrize("kind", ["one stage", "final stage", "every stage named"])
def test_an_existing_out_follows_one_rule_for_one_and_several_stages(family, tmp_path, kind):
    """Without --overwrite a rerun into an OUT that exists is refused (exit 8) and touches nothing;
    with --overwrite what goes to OUT is recomputed, never reused."""
    base, a, b = family
    text = {
        "one stage": _one_stage_recipe(a, b),
        "final stage": three_stage_recipe(base, a, b),
        "every stage named": "name: last\n" + three_stage_recipe(base, a, b),
    }[kind]
    recipe, out = write(tmp_path, text), tmp_path / "out"
    assert cli(recipe, out).exit_code == 0
    models = [out] if kind != "every stage named" else [out / "last", out / "s1", out / "s2"]
    if kind == "final stage":
        models += [tmp_path / "out.stages" / "s1", tmp_path / "out.stages" / "s2"]
    before = {d: mtimes(d) for d in models}
    refused = CliRunner().invoke(merge_app, [str(recipe), str(out)])
    assert refused.exit_code == 8, refused.output
    assert "already exists" in refused.output and "--overwrite" in refused.output
    assert {d: mtimes(d) for d in models} == before
    replaced = CliRunner().invoke(merge_app, [str(recipe), str(out), "--overwrite"])
    assert replaced.exit_code == 0, replaced.output
    at_out = [out] if kind != "every stage named" else [out / "last", out / "s1", out / "s2"]
    for model in at_out:
        assert mtimes(model)["model.safetensors"] != before[model]["model.safetensors"], model
    assert "reused" not in replaced.output or kind == "final stage"


def test_no_lazy_recomputes_every_stage(family, tmp_path):
    base, a, b = family
    recipe, out = write(tmp_path, three_stage_recipe(base, a, b)), tmp_path / "final"
    assert cli(recipe, out).exit_code == 0
    s1 = tmp_path / "final.stages" / "s1"
    before = mtimes(s1)
    assert cli(recipe, out, "--no-lazy", "--overwrite").exit_code == 0
    after = mtimes(s1)
    assert after.keys() == before.keys()
    assert all(after[f] != before[f] for f in before)


def test_final_output_in_the_way_is_refused_before_any_stage_computes(family, tmp_path):
    base, a, b = family
    recipe, out = write(tmp_path, three_stage_recipe(base, a, b)), tmp_path / "final"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = cli(recipe, out)
    assert result.exit_code == 8, result.output
    assert "final stage (document 1)" in result.output
    assert not (tmp_path / "final.stages").exists()


def test_edited_stage_is_recomputed_with_the_stages_that_use_it(family, tmp_path):
    base, a, b = family
    recipe, out = write(tmp_path, three_stage_recipe(base, a, b)), tmp_path / "final"
    assert cli(recipe, out).exit_code == 0
    stage_dir = tmp_path / "final.stages"
    untouched = read_tensors(out)
    recipe.write_text(three_stage_recipe(base, a, b).replace("weight: 2.0", "weight: 1.0"))
    result = CliRunner().invoke(merge_app, [str(recipe), str(out), "--overwrite"])
    assert result.exit_code == 0, result.output
    assert "stage `s1` (document 3): reused" in result.output
    assert "stage `s2` (document 2): merged" in result.output
    assert "final stage (document 1): merged" in result.output
    name = "model.layers.0.mlp.up_proj.weight"
    s1 = read_tensors(stage_dir / "s1")[name]
    expected = 0.3 * read_tensors(base)[name] + 0.3 * (s1 - read_tensors(base)[name]) + 0.7 * read_tensors(a)[name]
    torch.testing.assert_close(read_tensors(out)[name], expected, rtol=1e-5, atol=1e-5)
    assert not torch.equal(read_tensors(out)[name], untouched[name])


def test_every_stage_named_writes_each_to_out_slash_name(family, tmp_path):
    base, a, b = family
    text = "name: last\n" + three_stage_recipe(base, a, b)
    out = tmp_path / "all"
    assert cli(write(tmp_path, text), out).exit_code == 0
    assert sorted(p.name for p in out.iterdir()) == ["last", "s1", "s2"]
    assert not (tmp_path / "all.stages").exists()


def test_intermediate_dir_option_places_the_named_stages(family, tmp_path):
    base, a, b = family
    work = tmp_path / "work"
    result = cli(write(tmp_path, three_stage_recipe(base, a, b)), tmp_path / "final", "--intermediate-dir", work)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in work.iterdir()) == ["s1", "s2"]


def test_missing_model_in_a_later_stage_fails_before_the_first_stage_computes(family, tmp_path):
    base, a, b = family
    final_input = f"  - model: {a}\n    parameters: {{weight: 0.7}}"
    text = three_stage_recipe(base, a, b).replace(final_input, "  - model: ./nowhere\n    parameters: {weight: 0.7}", 1)
    result = cli(write(tmp_path, text), tmp_path / "final")
    assert result.exit_code == 3, result.output
    assert "final stage (document 1)" in result.output and "nowhere" in result.output
    assert not (tmp_path / "final.stages").exists()


# --- recipe errors -------------------------------------------------------------------------------


def stage_error(text: str, tmp_path: Path) -> RecipeError:
    with pytest.raises(RecipeError) as caught:
        stages_of(text, tmp_path / "out")
    return caught.value


TWO = "merge_method: linear\nmodels:\n  - model: {ref}\n    parameters: {{weight: 1.0}}\n"


def test_cycle_is_an_error_naming_its_stages(tmp_path):
    text = "name: a\n" + TWO.format(ref="b") + "---\nname: b\n" + TWO.format(ref="a") + "---\n" + TWO.format(ref="a")
    error = stage_error(text, tmp_path)
    assert "`a` -> `b` -> `a`" in error.message
    assert error.line == 1


def test_stage_using_itself_is_a_cycle(tmp_path):
    error = stage_error("name: a\n" + TWO.format(ref="a") + "---\n" + TWO.format(ref="x"), tmp_path)
    assert "`a` -> `a`" in error.message


def test_duplicate_names_are_an_error_at_the_second_name(tmp_path):
    text = "name: a\n" + TWO.format(ref="x") + "---\nname: a\n" + TWO.format(ref="y")
    error = stage_error(text, tmp_path)
    assert "used by documents 1 and 2" in error.message
    assert error.line == 7 and error.field == "name"


def test_two_unnamed_documents_are_an_error(tmp_path):
    error = stage_error(TWO.format(ref="x") + "---\n" + TWO.format(ref="y"), tmp_path)
    assert re.search(r"documents 1 \(line 1\) and 2 \(line 6\) both have no `name`", error.message)


def test_error_in_a_later_document_names_the_document_and_the_file_line(tmp_path):
    text = "name: a\n" + TWO.format(ref="x") + "---\nmerge_method: lineer\nmodels:\n  - model: a\n"
    error = stage_error(text, tmp_path)
    assert error.message.startswith("final stage (document 2): stages.yml:7")
    assert "unknown merge method `lineer`" in error.message


def test_stage_name_that_is_not_a_directory_name_is_refused(tmp_path):
    error = stage_error("name: a/b\n" + TWO.format(ref="x") + "---\n" + TWO.format(ref="a/b"), tmp_path)
    assert "cannot name a directory" in error.message and error.line == 1


def test_intermediate_dir_with_every_stage_named_is_refused(tmp_path):
    text = "name: a\n" + TWO.format(ref="x") + "---\nname: b\n" + TWO.format(ref="a")
    with pytest.raises(RecipeError, match="every stage is named"):
        stages_of(text, tmp_path / "out", intermediate_dir=tmp_path / "elsewhere")


def test_dependency_order_follows_uses_then_document_order(tmp_path):
    text = TWO.format(ref="c") + "---\nname: b\n" + TWO.format(ref="x") + "---\nname: c\n" + TWO.format(ref="b")
    assert [s.name for s in stages_of(text, tmp_path / "out")] == ["b", "c", None]


# --- reference rewriting -------------------------------------------------------------------------


def test_rewriting_keeps_revision_lora_and_override_and_finds_every_slot():
    paths = {"s1": "/w/s1", "s@2": "/w/odd@dir"}
    data = {
        "base_model": "s1@rev+org/lora",
        "models": [{"model": {"model": {"path": "s1"}, "override_architecture": "LlamaForCausalLM"}}],
        "slices": [{"base_model": "s1", "sources": [{"model": "org/other"}, {"model": "s1"}]}],
        "tokenizer": {
            "source": "s1",
            "tokens": {"<x>": {"source": {"kind": "model_token", "model": "s1", "token": "a"}}},
        },
    }
    rewritten, used = rewrite_references(data, paths)
    assert used == ["s1"]
    assert rewritten["base_model"] == "/w/s1@rev+org/lora"
    assert rewritten["models"][0]["model"] == {
        "model": {"path": "/w/s1"},
        "override_architecture": "LlamaForCausalLM",
    }
    assert rewritten["slices"][0]["base_model"] == "/w/s1"
    assert rewritten["slices"][0]["sources"] == [{"model": "org/other"}, {"model": "/w/s1"}]
    assert rewritten["tokenizer"]["source"] == "/w/s1"
    assert rewritten["tokenizer"]["tokens"]["<x>"]["source"]["model"] == "/w/s1"
    assert data["base_model"] == "s1@rev+org/lora"  # the input is not modified


def test_stage_path_with_at_sign_is_written_in_mapping_form():
    rewritten, _ = rewrite_references({"models": [{"model": "s1+org/lora"}]}, {"s1": "/w/x@y/s1"})
    assert rewritten["models"][0]["model"] == {"model": {"path": "/w/x@y/s1"}, "lora": {"path": "org/lora"}}


def test_empty_documents_are_skipped_and_numbering_follows_the_file(tmp_path):
    text = "name: a\n" + TWO.format(ref="x") + "---\n---\n" + TWO.format(ref="a") + "---\n"
    stages = stages_of(text, tmp_path / "out")
    assert [(s.document, s.name) for s in stages] == [(1, "a"), (3, None)]


def test_single_recipe_with_a_trailing_separator_is_an_ordinary_recipe(tmp_path):
    text = "name: solo\n" + TWO.format(ref="x") + "---\n"
    (stage,) = stages_of(text, tmp_path / "out")
    assert stage.out == tmp_path / "out" and stage.recipe.text == text


EXAMPLES = sorted((Path(__file__).resolve().parent.parent.parent / "examples" / "multistage").glob("*.yml"))


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_multistage_example_runs_on_the_demo_layout(example, tmp_path, monkeypatch):
    from tiny_models import build_model

    base = build_model("llama", tmp_path / "models" / "base", layers=4, hidden=64, seed=0)
    build_model("llama", tmp_path / "models" / "ft-a", base=base, seed=1)
    build_model("llama", tmp_path / "models" / "ft-b", base=base, seed=2)
    monkeypatch.chdir(tmp_path)
    result = cli(example, tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert torch.isfinite(logits(load_causal_lm(tmp_path / "out"), [1, 4, 9, 2])).all()


def test_stages_to_run_follows_completeness_recipe_copy_and_dependencies(tmp_path):
    from mkmerge.run_stages import stages_to_run

    text = "name: a\n" + TWO.format(ref="x") + "---\nname: b\n" + TWO.format(ref="y") + "---\n" + TWO.format(ref="a")
    stages = stages_of(text, tmp_path / "out")
    for stage in stages:
        stage.out.mkdir(parents=True)
        (stage.out / "config.json").write_text("{}")
        (stage.out / "model.safetensors").write_text("")
        (stage.out / "mergekit_config.yml").write_text(stage.recipe.text)
    by_name = {s.name: s for s in stages}
    assert stages_to_run(stages, lazy=True) == {3}  # the final stage, written to OUT, always runs
    assert stages_to_run(stages, lazy=False) == {1, 2, 3}
    (by_name["b"].out / "mergekit_config.yml").write_text("merge_method: something else\n")
    assert stages_to_run(stages, lazy=True) == {2, 3}
    (by_name["a"].out / "model.safetensors").unlink()
    assert stages_to_run(stages, lazy=True) == {1, 2, 3}  # the final document uses `a`
