"""The tiny model factory builds real, loadable checkpoints of every architecture the tests use."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
import transformers

from tiny_models import (
    ARCHS,
    BOS_ID,
    EOS_ID,
    PAD_ID,
    UNK_ID,
    build_model,
    load_causal_lm,
    logits,
    read_tensors,
    tiny_config,
    tiny_tokenizer,
)

TEXT = "the quick brown fox jumps over the lazy dog"


@pytest.mark.parametrize("arch", ARCHS)
def test_every_family_member_loads_with_transformers_and_gives_finite_logits(arch, tiny_family):
    base, finetunes = tiny_family(arch)
    ids = tiny_tokenizer(128)(TEXT).input_ids
    for path in (base, *finetunes):
        out = logits(load_causal_lm(path), ids)
        assert out.shape == (len(ids), 128)
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("arch", ARCHS)
def test_finetunes_differ_from_base_in_every_tensor_but_stay_close(arch, tiny_family):
    base, finetunes = tiny_family(arch)
    base_tensors = read_tensors(base)
    for ft in finetunes:
        ft_tensors = read_tensors(ft)
        assert ft_tensors.keys() == base_tensors.keys()
        for name, b in base_tensors.items():
            f = ft_tensors[name]
            assert f.shape == b.shape and f.dtype == b.dtype
            assert not torch.equal(f, b), name
            # noise of std perturb=0.02 times the tensor's own std (1 for constant tensors, e.g. zero biases)
            scale = b.float().std().item() or 1.0
            relative_noise = (f - b).float().pow(2).mean().sqrt().item() / scale
            assert 0.005 < relative_noise < 0.05, (name, relative_noise)
    first, second = (read_tensors(p) for p in finetunes)
    assert any(not torch.equal(first[n], second[n]) for n in first)


def test_same_seed_builds_identical_tensors_and_another_seed_does_not(tmp_path):
    a = read_tensors(build_model("qwen2", tmp_path / "a", seed=3, tokenizer=False))
    b = read_tensors(build_model("qwen2", tmp_path / "b", seed=3, tokenizer=False))
    c = read_tensors(build_model("qwen2", tmp_path / "c", seed=4, tokenizer=False))
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not torch.equal(a["model.embed_tokens.weight"], c["model.embed_tokens.weight"])


def test_tied_llama_stores_no_lm_head_and_untied_llama_does(tiny_model):
    tied = read_tensors(tiny_model("llama", tie=True))
    untied = read_tensors(tiny_model("llama", tie=False))
    assert "lm_head.weight" not in tied and "model.embed_tokens.weight" in tied
    assert "lm_head.weight" in untied


def test_tied_llama_loads_with_lm_head_equal_to_embeddings(tiny_model):
    model = load_causal_lm(tiny_model("llama", tie=True))
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)


def test_sharded_format_writes_safetensors_shards_and_an_index_covering_every_tensor(tiny_model):
    path = tiny_model("llama", fmt="sharded", shard_size="20KB")
    shards = sorted(p.name for p in path.glob("*.safetensors"))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert set(index["weight_map"]) == set(read_tensors(path))


def test_bin_format_writes_one_pytorch_model_bin_with_the_safetensors_tensors(tiny_model):
    path = tiny_model("llama", fmt="bin")
    assert sorted(p.name for p in path.iterdir() if "model" in p.name and p.suffix != ".json") == ["pytorch_model.bin"]
    reference = read_tensors(tiny_model("llama"))
    pickled = torch.load(path / "pytorch_model.bin", weights_only=True)
    assert pickled.keys() == reference.keys()
    assert all(torch.equal(pickled[n], reference[n]) for n in reference)


def test_sharded_bin_format_writes_bin_shards_and_an_index_that_transformers_loads(tiny_model):
    path = tiny_model("llama", fmt="sharded_bin", shard_size="20KB")
    shards = sorted(p.name for p in path.glob("pytorch_model-*.bin"))
    assert len(shards) > 1 and not list(path.glob("*.safetensors"))
    index = json.loads((path / "pytorch_model.bin.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    ids = [BOS_ID, 10, 20, 30]
    assert torch.equal(logits(load_causal_lm(path), ids), logits(load_causal_lm(tiny_model("llama")), ids))


def test_dtype_argument_sets_the_stored_dtype(tiny_model):
    tensors = read_tensors(tiny_model("mistral", dtype=torch.bfloat16))
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}


def test_tokenizer_fits_the_vocab_round_trips_text_and_knows_its_special_tokens(tiny_model):
    tok = tiny_tokenizer(128)
    assert len(tok) <= 128
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (UNK_ID, BOS_ID, EOS_ID, PAD_ID)
    assert tok.decode(tok(TEXT).input_ids) == TEXT
    assert len(tiny_tokenizer(48)) <= 48
    saved = transformers.AutoTokenizer.from_pretrained(tiny_model("gpt2"))
    assert saved(TEXT).input_ids == tok(TEXT).input_ids


def test_gemma_configs_mix_sliding_and_full_attention_layers():
    for arch in ("gemma2", "gemma3"):
        assert set(tiny_config(arch).layer_types) == {"sliding_attention", "full_attention"}


def test_tiny_config_uses_four_heads_two_kv_heads_and_the_requested_sizes():
    config = tiny_config("qwen3", layers=5, hidden=64, vocab=96)
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (5, 64, 96)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (4, 2, 16)
    assert config.intermediate_size == 128 and len(config.layer_types) == 5


def test_tiny_config_overrides_win_over_defaults():
    assert tiny_config("llama", rms_norm_eps=1e-3).rms_norm_eps == 1e-3


def test_tiny_family_fixture_returns_the_same_directories_for_the_same_arguments(tiny_family):
    assert tiny_family("llama") == tiny_family("llama")
    assert tiny_family("llama")[0] != tiny_family("llama", seed=1)[0]


def test_unknown_architecture_and_format_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown tiny architecture"):
        tiny_config("llama2")
    with pytest.raises(ValueError, match="unknown format"):
        build_model("llama", tmp_path, fmt="gguf")


# --- benchmarks/model_family.py: big families written tensor by tensor --------------------------


def _model_family_module():
    spec = importlib.util.spec_from_file_location(
        "model_family", Path(__file__).resolve().parent.parent.parent / "benchmarks" / "model_family.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def model_family():
    module = _model_family_module()
    module.SIZES["toy"] = module.LlamaShape(hidden=64, intermediate=96, layers=2, heads=4, kv_heads=2, vocab=128)
    return module


def test_benchmark_sizes_have_the_advertised_parameter_counts(model_family):
    assert model_family.SIZES["1.1b"].n_params() == 1_100_048_384  # TinyLlama-1.1B exactly
    assert 0.45e9 < model_family.SIZES["0.5b"].n_params() < 0.55e9
    assert 3.3e9 < model_family.SIZES["3b"].n_params() < 3.5e9


def test_benchmark_family_is_a_loadable_sharded_llama_base_with_close_finetunes(model_family, tmp_path):
    paths = model_family.build_llama_family(tmp_path, "toy", 3, shard_bytes=40_000, threads=2)
    assert [p.name for p in paths] == ["llama-toy-base", "llama-toy-ft1", "llama-toy-ft2"]
    index = json.loads((paths[0] / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    base = read_tensors(paths[0])
    assert base.keys() == set(index["weight_map"]) and {t.dtype for t in base.values()} == {torch.bfloat16}
    assert torch.equal(base["model.norm.weight"], torch.ones(64, dtype=torch.bfloat16))
    for ft in paths[1:]:
        tensors = read_tensors(ft)
        delta = tensors["model.layers.1.mlp.up_proj.weight"].float() - base["model.layers.1.mlp.up_proj.weight"].float()
        assert 0.0015 < delta.std() < 0.0025  # delta_std 0.002, next to the base's 0.02
    model = transformers.AutoModelForCausalLM.from_pretrained(paths[2], dtype=torch.float32)
    assert isinstance(model, transformers.LlamaForCausalLM)
    assert torch.isfinite(logits(model.eval(), [1, 5, 9])).all()


def test_benchmark_family_bytes_do_not_depend_on_thread_count_and_reruns_reuse_finished_models(model_family, tmp_path):
    one = model_family.build_llama_family(tmp_path / "one", "toy", 2, threads=1)
    two = model_family.build_llama_family(tmp_path / "two", "toy", 2, threads=2)
    for a, b in zip(one, two):
        assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    stamp = (one[1] / "model.safetensors").stat().st_mtime_ns
    model_family.build_llama_family(tmp_path / "one", "toy", 2, threads=1)
    assert (one[1] / "model.safetensors").stat().st_mtime_ns == stamp
    rebuilt = model_family.build_llama_family(tmp_path / "one", "toy", 2, seed=1)
    assert (rebuilt[1] / "model.safetensors").read_bytes() != (two[1] / "model.safetensors").read_bytes()


def test_benchmark_family_refuses_to_overwrite_a_directory_it_did_not_write(model_family, tmp_path):
    (tmp_path / "llama-toy-base").mkdir()
    with pytest.raises(FileExistsError, match="not written by"):
        model_family.build_llama_family(tmp_path, "toy", 1)
