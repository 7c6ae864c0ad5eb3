"""The output never costs an input or a user's files: OUT is refused when it is, contains or lies
inside anything the run reads, and --overwrite replaces only a model directory.

Every refusal exits 8 before a tensor is read and leaves every input byte-identical.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mkmerge.cli import merge_app
from mkmoe.cli import app as moe_app
from mkstack.cli import stack_app
from mksuite.common.writing.output_guard import foreign_entries

from lora_adapters import adapter_config, linear_factors, write_adapter
from tiny_models import copy_model


@pytest.fixture
def models(tiny_family, tmp_path):
    """A folder `models/` holding a base and a fine-tune (private copies: tests may point OUT at them)."""
    base, (ft, _) = tiny_family("llama")
    folder = tmp_path / "models"
    return folder, copy_model(base, folder / "base"), copy_model(ft, folder / "ft")


def linear(base: Path, other: Path) -> str:
    return f"merge_method: linear\nmodels:\n  - model: {base}\n    parameters: {{weight: 0.5}}\n" + (
        f"  - model: {other}\n    parameters: {{weight: 0.5}}\ndtype: float32\n"
    )


def tree_digest(root: Path) -> dict[str, str]:
    """Every file under ``root`` (symlinks by target) -> a hash of its bytes."""
    found = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        if path.is_symlink():
            found[key] = "-> " + os.readlink(path)
        elif path.is_file():
            found[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def mkmerge(*args: str):
    return CliRunner().invoke(merge_app, [*map(str, args), "--quiet"])


def assert_refused(result, *fragments: str) -> None:
    assert result.exit_code == 8, result.output
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in result.output, result.output


@pytest.mark.parametrize("where", ["model itself", "folder of models", "inside a model"])
def test_overwrite_never_targets_an_input_model(models, tmp_path, where, no_tensor_reads):
    folder, base, ft = models
    recipe = tmp_path / "r.yml"
    recipe.write_text(linear(base, ft))
    out = {"model itself": ft, "folder of models": folder, "inside a model": base / "merged"}[where]
    before = tree_digest(folder)
    result = mkmerge(recipe, out, "--overwrite")
    # The folder of models is refused twice over: it is no model directory, and it holds inputs.
    assert_refused(result, *([] if where == "folder of models" else ["could destroy an input"]))
    assert tree_digest(folder) == before
    assert not list(tmp_path.glob(".*partial*")) and not list(folder.glob(".*partial*"))


def test_a_symlinked_input_or_output_is_seen_through(models, tmp_path):
    folder, base, ft = models
    link = tmp_path / "link-to-ft"
    link.symlink_to(ft, target_is_directory=True)
    recipe = tmp_path / "r.yml"
    recipe.write_text(linear(base, link))
    before = tree_digest(folder)
    assert_refused(mkmerge(recipe, ft, "--overwrite"), "is input model")  # input by link, OUT by real path
    recipe.write_text(linear(base, ft))
    assert_refused(mkmerge(recipe, link, "--overwrite"), "is input model")  # OUT by link
    assert tree_digest(folder) == before and link.is_symlink()


def test_out_folder_holding_the_recipe_is_refused(models, tmp_path):
    _, base, ft = models
    work = tmp_path / "work"
    work.mkdir()
    (work / "config.json").write_text("{}")  # looks like a model directory, but holds the recipe
    recipe = work / "recipe.yml"
    recipe.write_text(linear(base, ft))
    assert_refused(mkmerge(recipe, work, "--overwrite"), "contains the recipe")
    assert recipe.read_text() == linear(base, ft)


def test_hub_cache_repo_folder_is_an_input_as_a_whole(models, tmp_path, monkeypatch):
    _, base, ft = models
    repo = tmp_path / "hub" / "models--org--tiny"
    snapshot = repo / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    for path in ft.iterdir():  # as huggingface_hub stores it: content in blobs/, links in snapshots/
        blob = repo / "blobs" / hashlib.sha256(path.read_bytes()).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(path.read_bytes())
        (snapshot / path.name).symlink_to(f"../../blobs/{blob.name}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    recipe = tmp_path / "r.yml"
    recipe.write_text(linear(base, "org/tiny"))
    before = tree_digest(repo)
    for out in (snapshot, repo / "merged", snapshot / "merged", repo / "blobs", repo, tmp_path / "hub"):
        result = mkmerge(recipe, out, "--overwrite", "--cache-dir", tmp_path / "hub")
        assert_refused(result)
        if out.name == "merged" or out == snapshot:  # the others are no model directories either
            assert "input model `org/tiny`" in result.output
    assert tree_digest(repo) == before
    ok = mkmerge(recipe, tmp_path / "merged", "--cache-dir", tmp_path / "hub")
    assert ok.exit_code == 0, ok.output


def test_lora_adapter_is_an_input(models, tmp_path):
    _, base, ft = models
    adapter = write_adapter(
        tmp_path / "adapter", linear_factors("model.layers.0.self_attn.q_proj", 4, 32, 32, seed=1), adapter_config()
    )
    (adapter / "config.json").write_text("{}")
    recipe = tmp_path / "r.yml"
    recipe.write_text(linear(f"{base}+{adapter}", ft))
    before = tree_digest(adapter)
    assert_refused(mkmerge(recipe, adapter, "--overwrite"), "LoRA adapter")
    assert tree_digest(adapter) == before


def test_mkstack_expand_onto_its_own_input_is_refused(models):
    folder, base, _ = models
    before = tree_digest(folder)
    result = CliRunner().invoke(stack_app, [str(base), "--expand", str(base), "--every", "1", "--overwrite"])
    assert result.exit_code == 8, result.output
    assert "could destroy an input" in result.output
    assert tree_digest(folder) == before


def test_mkmoe_out_onto_an_expert_or_around_its_config_is_refused(models, tmp_path):
    folder, base, ft = models
    config = folder / "moe.yml"
    config.write_text(
        f"base_model: {base}\ngate_mode: random\ndtype: float32\nexperts:\n"
        f"  - source_model: {base}\n  - source_model: {ft}\n"
    )
    before = tree_digest(folder)
    for out in (ft, folder):
        result = CliRunner().invoke(moe_app, [str(config), str(out), "--overwrite", "--quiet"])
        assert result.exit_code == 8, result.output
    assert tree_digest(folder) == before


def test_multistage_final_output_may_not_contain_the_intermediates(models, tmp_path):
    _, base, ft = models
    recipe = tmp_path / "stages.yml"
    recipe.write_text(f"name: half\n{linear(base, ft)}---\n{linear('half', base)}")
    out = tmp_path / "final"
    result = mkmerge(recipe, out, "--intermediate-dir", out / "work")
    assert_refused(result, "intermediate")
    assert not out.exists()


def test_overwrite_refuses_a_folder_that_is_not_a_model(models, tmp_path):
    _, base, ft = models
    home = tmp_path / "home"
    (home / "Documents").mkdir(parents=True)
    (home / "config.json").write_text("{}")
    (home / "notes.txt").write_text("mine")
    recipe = tmp_path / "r.yml"
    recipe.write_text(linear(base, ft))
    before = tree_digest(home)
    assert_refused(mkmerge(recipe, home, "--overwrite"), "does not look like a model directory", "Documents/")
    assert tree_digest(home) == before


@pytest.mark.parametrize(
    ("names", "foreign"),
    [
        (["config.json", "model.safetensors", "tokenizer.json", "README.md", "mergekit_config.yml"], []),
        (["config.json", "model-00001-of-00002.safetensors", "merges.txt", "modeling_x.py"], []),
        (["config.json", "id_rsa"], ["id_rsa"]),
        (["model.safetensors"], ["(no config.json)"]),
        (["config.json", "photo.jpg", "thesis.docx"], ["photo.jpg", "thesis.docx"]),
    ],
)
def test_what_looks_like_a_model_directory(tmp_path, names, foreign):
    for name in names:
        (tmp_path / name).write_text("x")
    assert foreign_entries(tmp_path) == foreign


def test_overwrite_replaces_a_previous_output_and_leaves_no_debris(models, tmp_path):
    _, base, ft = models
    recipe = tmp_path / "r.yml"
    recipe.write_text(linear(base, ft))
    out = tmp_path / "merged"
    assert mkmerge(recipe, out).exit_code == 0
    (out / "stale.safetensors").write_bytes(b"old")
    result = mkmerge(recipe, out, "--overwrite")
    assert result.exit_code == 0, result.output
    assert not (out / "stale.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged", "models", "r.yml"]
    assert oct(out.stat().st_mode & 0o777) != oct(0o700)  # a normal directory, not mkdtemp's private one
