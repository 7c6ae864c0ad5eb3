"""open_model: config.json plus one tensor source over whatever weight files a directory has."""

import json

import pytest
import torch
from safetensors.torch import save_file

from mksuite.common.errors import ModelNotFoundError, TensorFileError
from mksuite.common.loading import (
    ModelReference,
    PickleCheckpoint,
    SafetensorsFile,
    ShardedSource,
    open_model,
    pickle_source,
    resolve_model_path,
    safetensors_source,
)

CONFIG = {"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 2}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {f"layers.{i}.w": torch.randn(4, 3, generator=g).to(torch.bfloat16) for i in range(4)}


def model_dir(tmp_path, name="model", config=CONFIG):
    directory = tmp_path / name
    directory.mkdir()
    if config is not None:
        (directory / "config.json").write_text(json.dumps(config))
    return directory


def write_index(directory, filename, weight_map):
    (directory / filename).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def assert_loads(source, expected):
    assert sorted(source.names()) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(source.load(name).view(torch.int16), tensor.view(torch.int16))


def test_single_model_safetensors(tmp_path):
    directory = model_dir(tmp_path)
    save_file(tensors(), str(directory / "model.safetensors"))
    model = open_model(directory)
    assert model.path == directory
    assert model.config == CONFIG
    assert isinstance(model.tensors, SafetensorsFile)
    assert_loads(model.tensors, tensors())


def test_safetensors_index_with_shards(tmp_path):
    directory = model_dir(tmp_path)
    t = tensors()
    names = sorted(t)
    save_file({n: t[n] for n in names[:2]}, str(directory / "model-00001-of-00002.safetensors"))
    save_file({n: t[n] for n in names[2:]}, str(directory / "model-00002-of-00002.safetensors"))
    weight_map = {n: f"model-0000{1 + (i >= 2)}-of-00002.safetensors" for i, n in enumerate(names)}
    write_index(directory, "model.safetensors.index.json", weight_map)
    model = open_model(directory)
    assert isinstance(model.tensors, ShardedSource)
    assert_loads(model.tensors, t)


def test_safetensors_are_preferred_over_pickles(tmp_path):
    directory = model_dir(tmp_path)
    save_file(tensors(), str(directory / "model.safetensors"))
    torch.save({"other": torch.ones(1)}, directory / "pytorch_model.bin")
    assert isinstance(open_model(directory).tensors, SafetensorsFile)


def test_pytorch_model_bin_when_there_are_no_safetensors(tmp_path):
    directory = model_dir(tmp_path)
    torch.save(tensors(), directory / "pytorch_model.bin")
    model = open_model(directory)
    assert isinstance(model.tensors, PickleCheckpoint)
    assert_loads(model.tensors, tensors())


def test_pytorch_bin_index_with_shards(tmp_path):
    directory = model_dir(tmp_path)
    t = tensors()
    names = sorted(t)
    torch.save({n: t[n] for n in names[:3]}, directory / "pytorch_model-00001-of-00002.bin")
    torch.save({n: t[n] for n in names[3:]}, directory / "pytorch_model-00002-of-00002.bin")
    weight_map = {n: f"pytorch_model-0000{1 + (i >= 3)}-of-00002.bin" for i, n in enumerate(names)}
    write_index(directory, "pytorch_model.bin.index.json", weight_map)
    assert_loads(open_model(directory).tensors, t)


def test_any_single_safetensors_file_is_used(tmp_path):
    directory = model_dir(tmp_path)
    save_file(tensors(), str(directory / "weights.safetensors"))
    assert_loads(open_model(directory).tensors, tensors())


def test_several_unindexed_safetensors_files_are_combined(tmp_path):
    directory = model_dir(tmp_path)
    t = tensors()
    names = sorted(t)
    save_file({n: t[n] for n in names[:1]}, str(directory / "a.safetensors"))
    save_file({n: t[n] for n in names[1:]}, str(directory / "b.safetensors"))
    assert_loads(open_model(directory).tensors, t)


def test_a_tensor_stored_twice_in_unindexed_files_is_an_error(tmp_path):
    directory = model_dir(tmp_path)
    save_file(tensors(), str(directory / "a.safetensors"))
    save_file(tensors(), str(directory / "b.safetensors"))
    with pytest.raises(TensorFileError, match="stored in both"):
        open_model(directory)


def test_directory_without_weights_lists_what_is_expected(tmp_path):
    directory = model_dir(tmp_path)
    with pytest.raises(ModelNotFoundError) as caught:
        open_model(directory)
    assert caught.value.message == f"no weights in {directory}"
    assert "model.safetensors" in caught.value.hint and "pytorch_model.bin" in caught.value.hint


def test_missing_config_is_model_not_found(tmp_path):
    directory = model_dir(tmp_path, config=None)
    save_file(tensors(), str(directory / "model.safetensors"))
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        open_model(directory)


def test_invalid_config_json_names_the_file(tmp_path):
    directory = model_dir(tmp_path, config=None)
    (directory / "config.json").write_text("{oops")
    with pytest.raises(TensorFileError) as caught:
        open_model(directory)
    assert str(directory / "config.json") in caught.value.message


def test_index_naming_a_missing_shard_names_both_files(tmp_path):
    directory = model_dir(tmp_path)
    save_file(tensors(), str(directory / "model-00001-of-00002.safetensors"))
    write_index(
        directory,
        "model.safetensors.index.json",
        {"layers.0.w": "model-00001-of-00002.safetensors", "layers.1.w": "model-00002-of-00002.safetensors"},
    )
    with pytest.raises(TensorFileError) as caught:
        open_model(directory)
    assert "model.safetensors.index.json" in caught.value.message
    assert "model-00002-of-00002.safetensors" in caught.value.message


def test_opening_a_model_and_reading_infos_touches_no_tensor_data(tmp_path, monkeypatch):
    directory = model_dir(tmp_path)
    t = tensors()
    names = sorted(t)
    save_file({n: t[n] for n in names[:2]}, str(directory / "model-00001-of-00002.safetensors"))
    torch.save({n: t[n] for n in names[2:]}, directory / "model-00002-of-00002.bin")
    shards = ["model-00001-of-00002.safetensors", "model-00002-of-00002.bin"]
    weight_map = {n: shards[i >= 2] for i, n in enumerate(names)}
    write_index(directory, "model.safetensors.index.json", weight_map)

    def refuse(*args, **kwargs):
        raise AssertionError("tensor data was read")

    monkeypatch.setattr(safetensors_source, "read_bytes", refuse)
    monkeypatch.setattr(pickle_source, "read_bytes", refuse)
    model = open_model(directory)
    assert {n: model.tensors.info(n).shape for n in names} == {n: (4, 3) for n in names}


def test_resolved_local_reference_opens_end_to_end(tmp_path):
    directory = model_dir(tmp_path)
    save_file(tensors(), str(directory / "model.safetensors"))
    with open_model(resolve_model_path(ModelReference.parse(str(directory)))).tensors as source:
        assert_loads(source, tensors())
