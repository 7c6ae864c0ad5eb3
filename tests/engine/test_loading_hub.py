"""resolve_model_path: local directories and Hugging Face cache snapshots, offline."""

import hashlib
import json

import huggingface_hub
import pytest
import torch
from huggingface_hub import constants as hub_constants
from safetensors.torch import save_file

from mksuite.common.errors import ModelNotFoundError
from mksuite.common.loading import ModelReference, open_model, resolve_model_path
from mksuite.common.loading.hub import hub_commit

MAIN_COMMIT = "a" * 40
DEV_COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME"):
        monkeypatch.delenv(variable, raising=False)


def add_blob(repo_dir, commit, filename, data: bytes):
    """Store a file the way huggingface_hub does: content in blobs/, symlinked from the snapshot."""
    blob = repo_dir / "blobs" / hashlib.sha256(data).hexdigest()
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(data)
    link = repo_dir / "snapshots" / commit / filename
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(f"../../blobs/{blob.name}")


def add_snapshot(cache, repo_id, commit, tensors, tmp_path, *, refs=("main",)):
    repo_dir = cache / ("models--" + repo_id.replace("/", "--"))
    add_blob(repo_dir, commit, "config.json", json.dumps({"architectures": ["LlamaForCausalLM"]}).encode())
    weights = tmp_path / f"{commit}.safetensors"
    save_file(tensors, str(weights))
    add_blob(repo_dir, commit, "model.safetensors", weights.read_bytes())
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    for ref in refs:
        (repo_dir / "refs" / ref).write_text(commit)  # no trailing newline, as huggingface_hub writes it
    return repo_dir / "snapshots" / commit


@pytest.fixture
def hub_cache(tmp_path):
    cache = tmp_path / "hub"
    main = add_snapshot(cache, "org/tiny", MAIN_COMMIT, {"w": torch.full((2, 2), 1.0)}, tmp_path)
    dev = add_snapshot(cache, "org/tiny", DEV_COMMIT, {"w": torch.full((2, 2), 2.0)}, tmp_path, refs=("dev",))
    return cache, main, dev


def test_existing_local_directory_is_used_as_is(tmp_path):
    assert resolve_model_path(ModelReference(str(tmp_path))) == tmp_path


def test_local_path_that_is_a_file_is_not_a_model(tmp_path):
    file = tmp_path / "model.safetensors"
    file.write_bytes(b"x")
    with pytest.raises(ModelNotFoundError, match="is a file, not a model directory") as caught:
        resolve_model_path(ModelReference(str(file)))
    assert caught.value.model == str(file)


def test_repo_id_resolves_to_the_main_snapshot_in_the_given_cache(hub_cache):
    cache, main, _ = hub_cache
    path = resolve_model_path(ModelReference("org/tiny"), cache_dir=str(cache))
    assert path == main
    model = open_model(path)
    assert model.config == {"architectures": ["LlamaForCausalLM"]}
    assert torch.equal(model.tensors.load("w"), torch.full((2, 2), 1.0))


def test_branch_revision_resolves_through_refs(hub_cache):
    cache, _, dev = hub_cache
    assert resolve_model_path(ModelReference("org/tiny", "dev"), cache_dir=cache) == dev
    assert hub_commit("org/tiny", "dev") == DEV_COMMIT  # what the model card records


def test_commit_hash_revision_resolves_to_that_snapshot(hub_cache):
    cache, _, dev = hub_cache
    path = resolve_model_path(ModelReference.parse(f"org/tiny@{DEV_COMMIT}"), cache_dir=cache)
    assert path == dev
    assert torch.equal(open_model(path).tensors.load("w"), torch.full((2, 2), 2.0))


def test_lora_reference_resolves_with_the_same_function(hub_cache):
    cache, _, dev = hub_cache
    ref = ModelReference.parse("./no-such-base+org/tiny@dev")
    assert resolve_model_path(ref.lora, cache_dir=cache) == dev


def test_hf_hub_cache_variable_is_honoured_at_call_time(hub_cache, monkeypatch):
    cache, main, _ = hub_cache
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    assert resolve_model_path(ModelReference("org/tiny")) == main


def test_hf_home_variable_is_honoured_at_call_time(hub_cache, monkeypatch):
    cache, main, _ = hub_cache
    monkeypatch.setenv("HF_HOME", str(cache.parent))  # the cache is HF_HOME/hub
    assert resolve_model_path(ModelReference("org/tiny")) == main


def test_offline_resolution_never_asks_the_hub(hub_cache, monkeypatch):
    cache, main, _ = hub_cache

    def no_network(*args, **kwargs):
        raise AssertionError("the Hub was contacted while offline")

    monkeypatch.setattr(huggingface_hub, "list_repo_files", no_network)
    assert resolve_model_path(ModelReference("org/tiny"), cache_dir=cache) == main


def test_missing_repo_offline_says_where_it_looked_and_how_to_fix(hub_cache):
    cache, _, _ = hub_cache
    with pytest.raises(ModelNotFoundError) as caught:
        resolve_model_path(ModelReference("org/tiyn"), cache_dir=cache)
    error = caught.value
    assert error.model == "org/tiyn"
    assert "no local directory" in error.message
    assert f"no cached snapshot of Hub repo `org/tiyn` at revision `main` in {cache}" in error.message
    assert "HF_HUB_OFFLINE" in error.message and "HF_HUB_OFFLINE" in error.hint
    assert "did you mean `org/tiny`?" in error.hint


def test_missing_revision_offline_is_model_not_found(hub_cache):
    cache, _, _ = hub_cache
    with pytest.raises(ModelNotFoundError, match="at revision `nope`"):
        resolve_model_path(ModelReference("org/tiny", "nope"), cache_dir=cache)


def test_path_that_is_neither_local_nor_a_repo_id_is_model_not_found(tmp_path):
    missing = tmp_path / "models" / "llama" / "7b"
    with pytest.raises(ModelNotFoundError, match="not a valid Hub repo id"):
        resolve_model_path(ModelReference(str(missing)), cache_dir=tmp_path)


def test_misspelled_local_directory_gets_a_suggestion(tmp_path):
    (tmp_path / "my-model").mkdir()
    with pytest.raises(ModelNotFoundError) as caught:
        resolve_model_path(ModelReference(str(tmp_path / "my-modle")), cache_dir=tmp_path)
    assert "did you mean `my-model`?" in caught.value.hint


def go_online(monkeypatch):
    """Lift every offline switch; each test then replaces the Hub calls with fakes."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)


@pytest.fixture
def local_hub(tmp_path, monkeypatch):
    """A Hub on 127.0.0.1 (tests/hub_server.py), online, with the cache under tmp_path/hub."""
    from hub_server import HubServer

    go_online(monkeypatch)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no token or cache of the user's
    with HubServer() as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        yield server


def test_online_resolution_downloads_small_files_and_leaves_safetensors_on_the_hub(local_hub, tmp_path):
    weights = tmp_path / "w.safetensors"
    save_file({"w": torch.ones(2, 2)}, str(weights))
    files = {
        "config.json": b'{"architectures": ["LlamaForCausalLM"]}',
        "notes.txt": b"hello",
        "chat_template.jinja": b"{{ x }}",
        "model.safetensors": weights.read_bytes(),
        "pytorch_model.bin": b"never fetched",
    }
    sha = local_hub.add_repo("org/tiny", files, branch="dev")
    path = resolve_model_path(ModelReference("org/tiny", "dev"), cache_dir=tmp_path / "hub")
    assert path == tmp_path / "hub" / "models--org--tiny" / "snapshots" / sha
    assert sorted(p.name for p in path.iterdir()) == ["chat_template.jinja", "config.json", "notes.txt"]
    assert sorted(local_hub.full_downloads("")) == [
        f"/org/tiny/resolve/{sha}/{n}" for n in sorted(p.name for p in path.iterdir())
    ]
    model = open_model(path)  # the header comes by a range request; the data on first load
    assert local_hub.full_downloads(".safetensors") == []
    assert torch.equal(model.tensors.load("w"), torch.ones(2, 2))
    assert local_hub.full_downloads(".safetensors") == [f"/org/tiny/resolve/{sha}/model.safetensors"]


def test_a_repo_with_only_pickled_weights_has_them_downloaded_at_resolution(local_hub, tmp_path):
    files = {"config.json": b"{}", "pytorch_model.bin": b"pickle bytes"}
    sha = local_hub.add_repo("org/old", files)
    path = resolve_model_path(ModelReference("org/old"), cache_dir=tmp_path / "hub")
    assert (path / "pytorch_model.bin").read_bytes() == b"pickle bytes"
    assert f"/org/old/resolve/{sha}/pytorch_model.bin" in local_hub.full_downloads("")


def test_unreachable_hub_falls_back_to_the_cache(hub_cache, monkeypatch):
    import socket

    cache, main, _ = hub_cache
    go_online(monkeypatch)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")  # closed: connection refused
    assert resolve_model_path(ModelReference("org/tiny"), cache_dir=cache) == main
    with pytest.raises(ModelNotFoundError, match="could not be reached") as caught:
        resolve_model_path(ModelReference("org/other"), cache_dir=cache)
    assert "HF_HUB_OFFLINE" in caught.value.hint


def test_repo_unknown_to_the_hub_is_model_not_found(local_hub, tmp_path):
    with pytest.raises(ModelNotFoundError, match="the Hub has no repository `org/ghost`"):
        resolve_model_path(ModelReference("org/ghost"), cache_dir=tmp_path / "hub")
    assert local_hub.gets() == []


def test_revision_unknown_to_the_hub_is_model_not_found(local_hub, tmp_path):
    local_hub.add_repo("org/tiny", {"config.json": b"{}"})
    with pytest.raises(ModelNotFoundError, match="has no revision `nope`"):
        resolve_model_path(ModelReference("org/tiny", "nope"), cache_dir=tmp_path / "hub")
