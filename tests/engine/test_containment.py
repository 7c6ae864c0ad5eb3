"""Every file read or copied from a model resolves inside that model's root (or the run is refused, exit 4)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mkmerge.cli import merge_app
from mksuite.common.errors import ModelFileError
from mksuite.common.loading import ModelReference, open_adapter, open_model, resolve_model_path
from mksuite.common.loading.containment import model_root
from mksuite.common.writing.model_files import copy_tokenizer_files

from tiny_models import copy_model

SECRET = "do-not-upload: the contents of a private file"


@pytest.fixture
def model(tiny_model, tmp_path):
    return copy_model(tiny_model("llama", layers=2), tmp_path / "models" / "m")


@pytest.fixture
def secret(tmp_path):
    path = tmp_path / "private" / "id_rsa"
    path.parent.mkdir()
    path.write_text(SECRET)
    return path


def merge(tmp_path: Path, model: Path, *options: str):
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(f"merge_method: linear\nmodels:\n  - model: {model}\n    parameters: {{weight: 1.0}}\n")
    out = tmp_path / "out"
    return CliRunner().invoke(merge_app, [str(recipe), str(out), "--quiet", *options]), out


def leaked(out: Path) -> bool:
    return out.exists() and any(SECRET in p.read_text(errors="ignore") for p in out.rglob("*") if p.is_file())


@pytest.mark.parametrize(
    "name", ["tokenizer.json", "tokenizer_config.json", "generation_config.json", "special_tokens_map.json"]
)
def test_a_copied_file_symlinked_outside_the_model_is_refused_naming_it(model, secret, tmp_path, name):
    (model / name).unlink(missing_ok=True)
    (model / name).symlink_to(secret)
    with pytest.raises(ModelFileError) as caught:
        open_model(model)
    assert str(model / name) in caught.value.message and "outside the model's folder" in caught.value.message
    result, out = merge(tmp_path, model)
    assert result.exit_code == 4, result.output
    assert name in result.output and "Traceback" not in result.output
    assert not leaked(out) and not out.exists()


@pytest.mark.parametrize("name", ["config.json", "model.safetensors", "x.tiktoken", "preprocessor_config.json"])
def test_config_weights_and_tagalong_files_symlinked_outside_are_refused(model, tmp_path, name):
    outside = tmp_path / "elsewhere" / name
    outside.parent.mkdir()
    if (model / name).exists():
        shutil.move(model / name, outside)
    else:
        outside.write_text("{}")
    (model / name).symlink_to(outside)
    with pytest.raises(ModelFileError, match="outside the model's folder"):
        open_model(model)


def test_a_symlink_that_stays_inside_the_model_is_fine(model):
    (model / "shared").mkdir()
    shutil.move(model / "tokenizer.json", model / "shared" / "tokenizer.json")
    (model / "tokenizer.json").symlink_to("shared/tokenizer.json")
    open_model(model).close()


def test_a_model_directory_that_is_itself_a_symlink_is_fine(model, tmp_path):
    link = tmp_path / "link"
    link.symlink_to(model)
    open_model(link).close()


def test_a_symlink_loop_is_a_clear_error(model):
    (model / "tokenizer.json").unlink()
    (model / "tokenizer.json").symlink_to("tokenizer.json")
    with pytest.raises(ModelFileError, match="tokenizer.json"):
        open_model(model)


@pytest.mark.parametrize("escape", ["../elsewhere/x.safetensors", "ABSOLUTE", "sub/../../elsewhere/x.safetensors"])
def test_an_index_naming_a_shard_outside_the_model_is_refused_before_opening_it(tiny_model, tmp_path, escape):
    model = copy_model(tiny_model("llama", layers=2, fmt="sharded"), tmp_path / "m")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    index = json.loads((model / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[0]
    shutil.copy(model / shard, elsewhere / "x.safetensors")
    target = str(elsewhere / "x.safetensors") if escape == "ABSOLUTE" else escape
    index["weight_map"] = {k: (target if v == shard else v) for k, v in index["weight_map"].items()}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelFileError) as caught:
        open_model(model)
    assert f"shard `{target}`" in caught.value.message and "outside" in caught.value.message
    result, _ = merge(tmp_path, model)
    assert result.exit_code == 4, result.output


def test_the_reference_writer_shard_names_in_a_subfolder_stay_allowed(tiny_model, tmp_path):
    model = copy_model(tiny_model("llama", layers=2, fmt="sharded"), tmp_path / "m")
    index = json.loads((model / "model.safetensors.index.json").read_text())
    (model / "weights").mkdir()
    for shard in set(index["weight_map"].values()):
        shutil.move(model / shard, model / "weights" / shard)
    index["weight_map"] = {k: f"weights/{v}" for k, v in index["weight_map"].items()}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    with open_model(model).tensors as tensors:
        assert len(tensors.names()) == len(index["weight_map"])


def test_copy_refuses_an_outside_file_even_for_a_donor_not_opened_through_open_model(model, secret, tmp_path):
    (model / "tokenizer.json").unlink()
    (model / "tokenizer.json").symlink_to(secret)
    out = tmp_path / "o"
    out.mkdir()
    with pytest.raises(ModelFileError, match="tokenizer.json"):
        copy_tokenizer_files(model, out)
    assert not leaked(out)


# --- a real Hub cache layout -------------------------------------------------------------------


def hub_repo(cache: Path, repo_id: str, files: dict[str, bytes], commit: str = "c" * 40) -> Path:
    """Store files as huggingface_hub does: blobs/<sha256>, symlinked from snapshots/<commit>/."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / name).symlink_to(f"../../blobs/{blob.name}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snapshot


@pytest.fixture
def hub(model, tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    files = {p.name: p.read_bytes() for p in model.iterdir() if p.is_file()}
    snapshot = hub_repo(cache, "org/tiny", files)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache, snapshot


def test_a_hub_snapshot_whose_files_link_into_blobs_opens_and_merges(hub, tmp_path):
    cache, snapshot = hub
    assert model_root(snapshot) == (cache / "models--org--tiny").resolve()
    assert resolve_model_path(ModelReference("org/tiny")).resolve() == snapshot.resolve()
    result, out = merge(tmp_path, "org/tiny")  # type: ignore[arg-type]
    assert result.exit_code == 0, result.output
    assert (out / "tokenizer.json").read_bytes() == (snapshot / "tokenizer.json").read_bytes()
    assert not (out / "tokenizer.json").is_symlink()


def test_a_hub_snapshot_file_linking_into_another_repos_blobs_is_refused(hub, secret, tmp_path):
    cache, snapshot = hub
    other = hub_repo(cache, "evil/other", {"tokenizer.json": SECRET.encode()})
    (snapshot / "tokenizer.json").unlink()
    (snapshot / "tokenizer.json").symlink_to(
        Path("../../../models--evil--other/snapshots") / other.name / "tokenizer.json"
    )
    with pytest.raises(ModelFileError, match="outside the model's folder"):
        open_model(snapshot)
    result, out = merge(tmp_path, "org/tiny")  # type: ignore[arg-type]
    assert result.exit_code == 4 and not leaked(out)


def test_a_hub_blob_that_is_itself_a_symlink_outside_is_refused(hub, secret):
    cache, snapshot = hub
    blob = (snapshot / "generation_config.json").resolve()
    blob.unlink()
    blob.symlink_to(secret)
    with pytest.raises(ModelFileError, match="generation_config.json"):
        open_model(snapshot)


def test_adapter_files_symlinked_outside_the_adapter_are_refused(tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    outside = tmp_path / "outside.json"
    outside.write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": ["q_proj"]}))
    (adapter / "adapter_config.json").symlink_to(outside)
    with pytest.raises(ModelFileError, match="adapter file .*adapter_config.json"):
        open_adapter(adapter)


def test_a_tokenizer_source_outside_the_merged_models_is_contained_too(model, tiny_model, secret, tmp_path):
    source = copy_model(tiny_model("llama", layers=2), tmp_path / "tokenizer-source")
    outside = tmp_path / "private" / "tokenizer.json"  # a valid tokenizer: only containment can refuse it
    shutil.move(source / "tokenizer.json", outside)
    (source / "tokenizer.json").symlink_to(outside)
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(
        f"merge_method: linear\nmodels:\n  - model: {model}\n    parameters: {{weight: 1.0}}\n"
        f"tokenizer:\n  source: {source}\n"
    )
    out = tmp_path / "out"
    result = CliRunner().invoke(merge_app, [str(recipe), str(out), "--quiet"])
    assert result.exit_code == 4, result.output
    assert "outside the model's folder" in result.output and not out.exists()
