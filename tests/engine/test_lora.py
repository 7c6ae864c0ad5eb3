"""LoRA adapters applied while loading: W + s·B·A per tensor, checked against plain torch.

Each adapter is written by hand in PEFT's format (tests/lora_adapters.py). Results are checked
two ways: against the dense formula, and against what PEFT's LoRA layers compute in their
forward pass (base output plus the adapter branch), which fixes the shape conventions
independently of the merge formula.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mksuite.common.errors import AdapterError, MissingTensorError, ModelNotFoundError, ShapeMismatchError
from mksuite.common.input_models import open_input_models
from mksuite.common.loading import LoraSource, ModelReference, open_model, with_adapter

from lora_adapters import PREFIX, adapter_config, embedding_factors, linear_factors, write_adapter

Q = "model.layers.0.self_attn.q_proj"  # [32, 32] in the tiny llama
V = "model.layers.1.self_attn.v_proj"  # [16, 32]
UP = "model.layers.2.mlp.up_proj"  # [64, 32]


@pytest.fixture
def llama(tiny_model):
    return tiny_model("llama")


@pytest.fixture
def gpt2(tiny_model):
    return tiny_model("gpt2")


def base_tensor(model, name: str) -> torch.Tensor:
    return open_model(model).tensors.load(name)


def lora_source(model, adapter, **kw) -> LoraSource:
    return with_adapter(open_model(model).tensors, adapter, model=str(model), **kw)


def factor(tensors: dict, module: str, which: str) -> torch.Tensor:
    return next(t for k, t in tensors.items() if k.startswith(f"{PREFIX}{module}.{which}"))


def test_linear_update_is_w_plus_alpha_over_r_times_b_a_exactly(llama, tmp_path):
    tensors = linear_factors(Q, 4, 32, 32, seed=1) | linear_factors(V, 4, 32, 16, seed=2)
    adapter = write_adapter(tmp_path / "lora", tensors, adapter_config(r=4, lora_alpha=16))
    source = lora_source(llama, adapter)
    for module in (Q, V):
        a, b = factor(tensors, module, "lora_A"), factor(tensors, module, "lora_B")
        expected = base_tensor(llama, f"{module}.weight") + (b @ a) * (16 / 4)
        assert torch.equal(source.load(f"{module}.weight"), expected), module


def test_untouched_tensors_load_bit_for_bit(llama, tmp_path):
    adapter = write_adapter(tmp_path / "lora", linear_factors(Q, 4, 32, 32, seed=1), adapter_config())
    source = lora_source(llama, adapter)
    base = open_model(llama).tensors
    assert source.names() == base.names()
    for name in base.names():
        if name != f"{Q}.weight":
            assert torch.equal(source.load(name), base.load(name)), name
            assert source.info(name) == base.info(name)


def test_merged_linear_matches_peft_forward_of_base_plus_adapter_branch(llama, tmp_path):
    tensors = linear_factors(UP, 4, 32, 64, seed=3)
    adapter = write_adapter(tmp_path / "lora", tensors, adapter_config(target_modules=["up_proj"], lora_alpha=6))
    merged = lora_source(llama, adapter).load(f"{UP}.weight")
    a, b = factor(tensors, UP, "lora_A"), factor(tensors, UP, "lora_B")
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(0))
    peft_forward = x @ base_tensor(llama, f"{UP}.weight").T + (x @ a.T @ b.T) * (6 / 4)
    torch.testing.assert_close(x @ merged.T, peft_forward, rtol=1e-5, atol=1e-5)


def test_rslora_scales_by_alpha_over_sqrt_r(llama, tmp_path):
    tensors = linear_factors(Q, 16, 32, 32, seed=4)
    adapter = write_adapter(tmp_path / "lora", tensors, adapter_config(r=16, lora_alpha=8, use_rslora=True))
    a, b = factor(tensors, Q, "lora_A"), factor(tensors, Q, "lora_B")
    expected = base_tensor(llama, f"{Q}.weight") + (b @ a) * (8 / math.sqrt(16))
    assert torch.equal(lora_source(llama, adapter).load(f"{Q}.weight"), expected)


def test_rank_and_alpha_patterns_override_per_module(llama, tmp_path):
    # q_proj of layer 0 has rank 2 and alpha 10; v_proj of layer 1 keeps r=4, alpha=8.
    tensors = linear_factors(Q, 2, 32, 32, seed=5) | linear_factors(V, 4, 32, 16, seed=6)
    config = adapter_config(rank_pattern={r"layers\.0\.self_attn\.q_proj": 2}, alpha_pattern={"q_proj": 10})
    source = lora_source(llama, write_adapter(tmp_path / "lora", tensors, config))
    for module, scale in ((Q, 10 / 2), (V, 8 / 4)):
        a, b = factor(tensors, module, "lora_A"), factor(tensors, module, "lora_B")
        expected = base_tensor(llama, f"{module}.weight") + (b @ a) * scale
        assert torch.equal(source.load(f"{module}.weight"), expected), module


def test_adapter_name_segment_in_keys_is_accepted(llama, tmp_path):
    tensors = linear_factors(Q, 4, 32, 32, seed=7, adapter_name="default")
    adapter = write_adapter(tmp_path / "lora", tensors, adapter_config())
    a, b = factor(tensors, Q, "lora_A"), factor(tensors, Q, "lora_B")
    expected = base_tensor(llama, f"{Q}.weight") + (b @ a) * 2
    assert torch.equal(lora_source(llama, adapter).load(f"{Q}.weight"), expected)


def test_adapter_model_bin_is_read_through_the_restricted_unpickler(llama, tmp_path):
    tensors = linear_factors(Q, 4, 32, 32, seed=8)
    adapter = write_adapter(tmp_path / "lora", tensors, adapter_config(), fmt="bin")
    a, b = factor(tensors, Q, "lora_A"), factor(tensors, Q, "lora_B")
    expected = base_tensor(llama, f"{Q}.weight") + (b @ a) * 2
    assert torch.equal(lora_source(llama, adapter).load(f"{Q}.weight"), expected)


@pytest.mark.parametrize("flag", [True, False])
def test_conv1d_weights_take_the_transposed_update_whatever_fan_in_fan_out_says(gpt2, tmp_path, flag):
    # GPT-2's c_attn stores [in=32, out=96]; peft forces fan_in_fan_out for Conv1D layers.
    module = "transformer.h.0.attn.c_attn"
    tensors = linear_factors(module, 4, 32, 96, seed=9)
    config = adapter_config(target_modules=["c_attn"], fan_in_fan_out=flag)
    merged = lora_source(gpt2, write_adapter(tmp_path / "lora", tensors, config)).load(f"{module}.weight")
    a, b = factor(tensors, module, "lora_A"), factor(tensors, module, "lora_B")
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(1))
    peft_forward = x @ base_tensor(gpt2, f"{module}.weight") + (x @ a.T @ b.T) * 2
    torch.testing.assert_close(x @ merged, peft_forward, rtol=1e-5, atol=1e-5)


def test_square_conv1d_follows_fan_in_fan_out(gpt2, tmp_path):
    module = "transformer.h.1.attn.c_proj"  # [32, 32]: only the flag can tell the orientation
    tensors = linear_factors(module, 4, 32, 32, seed=10)
    config = adapter_config(target_modules=["c_proj"], fan_in_fan_out=True)
    merged = lora_source(gpt2, write_adapter(tmp_path / "lora", tensors, config)).load(f"{module}.weight")
    a, b = factor(tensors, module, "lora_A"), factor(tensors, module, "lora_B")
    assert torch.equal(merged, base_tensor(gpt2, f"{module}.weight") + ((b @ a) * 2).T)


def test_embedding_update_matches_peft_embedding_forward(llama, tmp_path):
    module = "model.embed_tokens"
    tensors = embedding_factors(module, 4, 128, 32, seed=11)
    config = adapter_config(target_modules=["embed_tokens"], lora_alpha=12)
    merged = lora_source(llama, write_adapter(tmp_path / "lora", tensors, config)).load(f"{module}.weight")
    a, b = tensors[f"{PREFIX}{module}.lora_embedding_A"], tensors[f"{PREFIX}{module}.lora_embedding_B"]
    ids = torch.tensor([0, 5, 17, 127, 5])
    base = base_tensor(llama, f"{module}.weight")
    peft_forward = F.embedding(ids, base) + F.embedding(ids, a.T) @ b.T * (12 / 4)
    torch.testing.assert_close(F.embedding(ids, merged), peft_forward, rtol=1e-5, atol=1e-5)
    assert torch.equal(merged, base + ((b @ a) * 3).T)


def test_modules_to_save_tensors_replace_the_base_tensor(llama, tmp_path):
    g = torch.Generator().manual_seed(12)
    head = torch.randn(128, 32, generator=g)
    norm = torch.randn(32, generator=g)
    tensors = {
        f"{PREFIX}lm_head.modules_to_save.default.weight": head,
        f"{PREFIX}model.norm.weight": norm,
    } | linear_factors(Q, 4, 32, 32, seed=13)
    source = lora_source(llama, write_adapter(tmp_path / "lora", tensors, adapter_config(modules_to_save=["lm_head"])))
    assert torch.equal(source.load("lm_head.weight"), head)
    assert torch.equal(source.load("model.norm.weight"), norm)


def test_saved_base_layer_is_replaced_before_the_update_is_added(llama, tmp_path):
    module = "model.embed_tokens"
    resaved = torch.randn(128, 32, generator=torch.Generator().manual_seed(14))
    tensors = embedding_factors(module, 4, 128, 32, seed=15) | {f"{PREFIX}{module}.base_layer.weight": resaved}
    config = adapter_config(target_modules=["embed_tokens"])
    merged = lora_source(llama, write_adapter(tmp_path / "lora", tensors, config)).load(f"{module}.weight")
    a, b = tensors[f"{PREFIX}{module}.lora_embedding_A"], tensors[f"{PREFIX}{module}.lora_embedding_B"]
    assert torch.equal(merged, resaved + ((b @ a) * 2).T)


def test_bfloat16_base_is_updated_in_float32_and_cast_back(tiny_model, tmp_path):
    model = tiny_model("llama", dtype=torch.bfloat16)
    tensors = linear_factors(Q, 4, 32, 32, seed=16)
    merged = lora_source(model, write_adapter(tmp_path / "lora", tensors, adapter_config())).load(f"{Q}.weight")
    a, b = factor(tensors, Q, "lora_A"), factor(tensors, Q, "lora_B")
    expected = (base_tensor(model, f"{Q}.weight").float() + (b @ a) * 2).to(torch.bfloat16)
    assert merged.dtype == torch.bfloat16
    assert torch.equal(merged, expected)


def test_merge_dtype_sets_the_dtype_of_every_tensor_of_the_model(llama, tmp_path):
    tensors = linear_factors(Q, 4, 32, 32, seed=17)
    source = lora_source(llama, write_adapter(tmp_path / "lora", tensors, adapter_config()), merge_dtype=torch.float16)
    a, b = factor(tensors, Q, "lora_A"), factor(tensors, Q, "lora_B")
    assert source.info(f"{Q}.weight").dtype == torch.float16
    assert torch.equal(source.load(f"{Q}.weight"), (base_tensor(llama, f"{Q}.weight") + (b @ a) * 2).half())
    assert torch.equal(source.load("model.norm.weight"), base_tensor(llama, "model.norm.weight").half())


def test_model_plus_lora_reference_opens_through_the_adapter(llama, tmp_path):
    tensors = linear_factors(Q, 4, 32, 32, seed=18)
    adapter = write_adapter(tmp_path / "lora", tensors, adapter_config())
    ref = ModelReference.parse(f"{llama}+{adapter}")
    model = open_input_models([ref])[ref]
    assert model.key == f"{llama}+{adapter}"
    assert isinstance(model.files.tensors, LoraSource)
    a, b = factor(tensors, Q, "lora_A"), factor(tensors, Q, "lora_B")
    assert torch.equal(model.files.tensors.load(f"{Q}.weight"), base_tensor(llama, f"{Q}.weight") + (b @ a) * 2)


# --- errors, all found from headers before any tensor data is read --------------------------------


def open_lora(model, adapter):
    ref = ModelReference(str(model), lora=ModelReference(str(adapter)))
    return open_input_models([ref])


def test_adapter_key_matching_no_tensor_is_an_error(llama, tmp_path, no_tensor_reads):
    tensors = linear_factors("model.layers.7.self_attn.q_proj", 4, 32, 32, seed=19)
    adapter = write_adapter(tmp_path / "lora", tensors, adapter_config())
    with pytest.raises(MissingTensorError, match=r"model\.layers\.7\.self_attn\.q_proj\.weight.*does not have"):
        open_lora(llama, adapter)


def test_rank_disagreeing_with_adapter_config_is_a_shape_error(llama, tmp_path, no_tensor_reads):
    adapter = write_adapter(tmp_path / "lora", linear_factors(Q, 8, 32, 32, seed=20), adapter_config(r=4))
    with pytest.raises(ShapeMismatchError, match="has rank 4 in adapter_config.json"):
        open_lora(llama, adapter)


def test_adapter_for_a_wider_model_is_a_shape_error(llama, tmp_path, no_tensor_reads):
    adapter = write_adapter(tmp_path / "lora", linear_factors(Q, 4, 64, 64, seed=21), adapter_config())
    with pytest.raises(ShapeMismatchError, match=r"\[64, 64\].*does not fit its shape \[32, 32\]"):
        open_lora(llama, adapter)


def test_replacement_of_another_shape_is_a_shape_error(llama, tmp_path, no_tensor_reads):
    tensors = {f"{PREFIX}lm_head.weight": torch.zeros(130, 32)}
    adapter = write_adapter(tmp_path / "lora", tensors, adapter_config(modules_to_save=["lm_head"]))
    with pytest.raises(ShapeMismatchError, match=r"\[130, 32\].*\[128, 32\]"):
        open_lora(llama, adapter)


def test_missing_adapter_directory_names_the_adapter(llama, tmp_path, no_tensor_reads):
    with pytest.raises(ModelNotFoundError, match=r"LoRA adapter of `.*no-such-lora`"):
        open_lora(llama, tmp_path / "no-such-lora")


def test_directory_without_adapter_config_is_not_an_adapter(llama, tmp_path, no_tensor_reads):
    (tmp_path / "lora").mkdir()
    with pytest.raises(ModelNotFoundError, match="has no adapter_config.json"):
        open_lora(llama, tmp_path / "lora")


def test_factor_without_its_partner_is_an_error(llama, tmp_path, no_tensor_reads):
    tensors = {k: v for k, v in linear_factors(Q, 4, 32, 32, seed=22).items() if "lora_A" in k}
    adapter = write_adapter(tmp_path / "lora", tensors, adapter_config())
    with pytest.raises(AdapterError, match="needs one A and one B factor"):
        open_lora(llama, adapter)


def test_module_outside_target_modules_is_an_error(llama, tmp_path, no_tensor_reads):
    adapter = write_adapter(tmp_path / "lora", linear_factors(UP, 4, 32, 64, seed=23), adapter_config())
    with pytest.raises(AdapterError, match="target_modules"):
        open_lora(llama, adapter)


@pytest.mark.parametrize(
    "overrides, message",
    [({"use_dora": True}, "DoRA"), ({"peft_type": "IA3"}, "IA3 adapter"), ({"r": 0}, "`r` must be a positive")],
)
def test_unsupported_or_invalid_adapter_config_is_refused(llama, tmp_path, no_tensor_reads, overrides, message):
    adapter = write_adapter(tmp_path / "lora", linear_factors(Q, 4, 32, 32, seed=24), adapter_config(**overrides))
    with pytest.raises(AdapterError, match=message):
        open_lora(llama, adapter)


def test_dora_magnitude_vectors_are_refused(llama, tmp_path, no_tensor_reads):
    tensors = linear_factors(Q, 4, 32, 32, seed=25) | {f"{PREFIX}{Q}.lora_magnitude_vector": torch.ones(32)}
    adapter = write_adapter(tmp_path / "lora", tensors, adapter_config())
    with pytest.raises(AdapterError, match="cannot apply"):
        open_lora(llama, adapter)
