"""Quantized checkpoints: FP8 (block-scaled and per-tensor) is dequantized exactly; every other format is refused."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import mkmerge.methods.reductions as reductions
from mkmerge.cli import merge_app
from mkmerge.methods import METHODS
from mkmerge.recipe import parse_recipe
from mkmerge.run import run_merge
from mksuite.common.build import BuildOptions
from mksuite.common.errors import AdapterError, ModelFileError
from mksuite.common.loading import open_model, with_adapter

from lora_adapters import adapter_config, linear_factors, write_adapter
from tiny_models import copy_model, load_causal_lm, logits, read_tensors

FP8_MAX = 448.0  # largest finite float8_e4m3fn


def quantize_blocks(weight: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 codes and the per-block `weight_scale_inv` (the dequantizing factor), as DeepSeek-V3 stores them."""
    rows, cols = weight.shape
    grid = (math.ceil(rows / block[0]), math.ceil(cols / block[1]))
    scale = torch.empty(grid, dtype=torch.float32)
    codes = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    for i in range(grid[0]):
        for j in range(grid[1]):
            part = weight[i * block[0] : (i + 1) * block[0], j * block[1] : (j + 1) * block[1]].float()
            scale[i, j] = part.abs().max().clamp(min=1e-12) / FP8_MAX
            codes[i * block[0] : (i + 1) * block[0], j * block[1] : (j + 1) * block[1]] = (part / scale[i, j]).to(
                torch.float8_e4m3fn
            )
    return codes, scale


def dequantize_by_hand(codes: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """The real weight, element by element: code times the scale of the block the element lies in."""
    rows, cols = codes.shape
    out = torch.empty(rows, cols, dtype=torch.float32)
    for r in range(rows):
        for c in range(cols):
            out[r, c] = codes[r, c].float() * scale[r // block[0], c // block[1]]
    return out


def fp8_config(config: dict, block: list[int] | None = (128, 128)) -> dict:
    config = dict(config)
    config["quantization_config"] = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": list(block) if block is not None else None,
    }
    return config


def write_model(directory, tensors: dict, config: dict):
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(config))
    return directory


PLAIN_CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "bfloat16"}


@pytest.mark.parametrize("block", [(128, 128), (16, 24), (7, 5)])
def test_block_scaled_fp8_dequantizes_to_the_hand_computation_with_partial_edge_blocks(tmp_path, block):
    weight = torch.randn(40, 50, generator=torch.Generator().manual_seed(0)) * 3
    codes, scale = quantize_blocks(weight, block)
    norm = torch.randn(50)
    tensors = {"w.weight": codes, "w.weight_scale_inv": scale, "norm.weight": norm.to(torch.bfloat16)}
    model = write_model(tmp_path / "m", tensors, fp8_config(PLAIN_CONFIG, block))
    files = open_model(model)
    with files.tensors as source:
        assert sorted(source.names()) == ["norm.weight", "w.weight"]  # the scale is not a model tensor
        assert "w.weight_scale_inv" not in source
        assert source.info("w.weight").dtype == torch.bfloat16 and source.info("w.weight").shape == (40, 50)
        expected = dequantize_by_hand(codes, scale, block).to(torch.bfloat16)
        assert torch.equal(source.load("w.weight"), expected)
        assert torch.equal(source.load("norm.weight"), norm.to(torch.bfloat16))
        # Far from the raw codes (the silent bug this replaces), close to the original weights.
        assert torch.allclose(expected.float(), weight, rtol=0.07, atol=1e-2)
        for start, stop in [(0, 40), (0, 1), (3, 9), (6, 7), (15, 33), (39, 40), (16, 32), (20, 20)]:
            assert torch.equal(source.load_rows("w.weight", start, stop), expected[start:stop]), (start, stop)
        assert source.byte_range("w.weight") is None  # never copied verbatim as codes
        assert source.byte_range("norm.weight") is not None


def test_per_tensor_fp8_uses_its_single_scale(tmp_path):
    weight = torch.randn(6, 10)
    scale = weight.abs().max() / FP8_MAX
    codes = (weight / scale).to(torch.float8_e4m3fn)
    tensors = {"w.weight": codes, "w.weight_scale_inv": scale.reshape(()).float(), "w.input_scale": torch.tensor(1.0)}
    model = write_model(tmp_path / "m", tensors, fp8_config({**PLAIN_CONFIG, "torch_dtype": "float32"}, None))
    with open_model(model).tensors as source:
        assert source.names() == ["w.weight"]  # the activation scale goes with the FP8 kernels
        expected = codes.float() * scale.float()
        assert source.info("w.weight").dtype == torch.float32
        assert torch.equal(source.load("w.weight"), expected)
        assert torch.equal(source.load_rows("w.weight", 2, 5), expected[2:5])


def test_fused_expert_tensors_scale_each_expert_by_its_own_blocks(tmp_path):
    experts = torch.randn(3, 20, 12)
    quantized = [quantize_blocks(e, (8, 8)) for e in experts]
    codes = torch.stack([q for q, _ in quantized])
    scale = torch.stack([s for _, s in quantized])
    model = write_model(
        tmp_path / "m", {"e.weight": codes, "e.weight_scale_inv": scale}, fp8_config(PLAIN_CONFIG, (8, 8))
    )
    with open_model(model).tensors as source:
        expected = torch.stack([dequantize_by_hand(q, s, (8, 8)) for q, s in quantized]).to(torch.bfloat16)
        assert torch.equal(source.load("e.weight"), expected)
        assert torch.equal(source.load_rows("e.weight", 1, 3), expected[1:3])


@pytest.mark.parametrize(
    "tensors, block, fragment",
    [
        (
            {"w.weight": torch.zeros(40, 50).to(torch.float8_e4m3fn), "w.weight_scale_inv": torch.ones(2, 2)},
            (16, 16),
            "needs [3, 4]",
        ),
        ({"w.weight": torch.zeros(4, 4).to(torch.float8_e4m3fn)}, (16, 16), "without its weight_scale_inv"),
        ({"w.weight": torch.zeros(4, 4), "v.weight_scale_inv": torch.ones(1, 1)}, (16, 16), "no FP8 tensor to scale"),
        (
            {
                "w.weight": torch.zeros(4, 4).to(torch.float8_e4m3fn),
                "w.weight_scale_inv": torch.ones(1, 1, dtype=torch.int32),
            },
            (16, 16),
            "not a float",
        ),
    ],
)
def test_inconsistent_fp8_checkpoints_are_refused_naming_the_tensor(tmp_path, tensors, block, fragment):
    model = write_model(tmp_path / "m", tensors, fp8_config(PLAIN_CONFIG, block))
    with pytest.raises(ModelFileError) as caught:
        open_model(model)
    assert fragment in caught.value.message and caught.value.exit_code == 4


# --- formats that are refused ---------------------------------------------------------------------


F16 = torch.zeros(4, 4, dtype=torch.float16)
REFUSED = {
    "gptq": ({"quant_method": "gptq", "bits": 4}, {"l.qweight": torch.zeros(1, 4, dtype=torch.int32)}, "gptq"),
    "awq": ({"quant_method": "awq", "bits": 4}, {"l.weight": F16}, "awq"),
    "bitsandbytes": ({"quant_method": "bitsandbytes", "load_in_4bit": True}, {"l.weight": F16}, "bitsandbytes"),
    "compressed-tensors": ({"quant_method": "compressed-tensors"}, {"l.weight": F16}, "compressed-tensors"),
    "mxfp4": ({"quant_method": "mxfp4"}, {"l.weight": F16}, "mxfp4"),
    "fp8 with unknown fmt": ({"quant_method": "fp8", "fmt": "e3m4"}, {"l.weight": F16}, "fmt `e3m4`"),
    "bad block size": ({"quant_method": "fp8", "weight_block_size": [0, 128]}, {"l.weight": F16}, "weight_block_size"),
    "int8 weights, no config": (None, {"l.weight": torch.zeros(4, 4, dtype=torch.int8)}, "`l.weight` is int8"),
    "uint8 weights, no config": (None, {"l.weight": torch.zeros(4, 4, dtype=torch.uint8)}, "uint8"),
    "int32 packed, no config": (None, {"l.weight": torch.zeros(4, 4, dtype=torch.int32)}, "int32"),
    "fp8 codes, no config": (None, {"l.weight": torch.zeros(4, 4).to(torch.float8_e4m3fn)}, "float8_e4m3fn"),
    "gptq names, no config": (None, {"l.qzeros": F16.clone(), "l.weight": F16}, "`l.qzeros`"),
    "bnb 4-bit state": (None, {"l.weight.quant_state.bitsandbytes__nf4": F16}, "quant_state"),
    "fp8 scales, no config": (None, {"l.weight": F16, "l.weight_scale_inv": torch.ones(1)}, "weight_scale_inv"),
    "in text_config": ({"quant_method": "gptq"}, {"l.weight": F16}, "gptq"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_formats_not_read_are_refused_before_any_work_naming_model_and_format(tmp_path, case, no_tensor_reads):
    settings, tensors, fragment = REFUSED[case]
    config = dict(PLAIN_CONFIG)
    if case == "in text_config":
        config["text_config"] = {"quantization_config": settings}
    elif settings is not None:
        config["quantization_config"] = settings
    model = write_model(tmp_path / "m", tensors, config)
    with pytest.raises(ModelFileError) as caught:
        open_model(model)
    assert fragment in caught.value.message and str(model) in caught.value.message
    assert "quantized" in caught.value.message and caught.value.exit_code == 4


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_a_weight_stored_as_integers_or_booleans_is_refused(tmp_path, dtype):
    model = write_model(tmp_path / "m", {"norm.weight": torch.ones(4, dtype=dtype)}, PLAIN_CONFIG)
    with pytest.raises(ModelFileError, match="weight `norm.weight` is stored as"):
        open_model(model)


def test_int64_buffers_and_bool_masks_are_not_mistaken_for_quantized_weights(tmp_path):
    tensors = {"l.weight": F16, "pos.position_ids": torch.arange(4), "attn.mask": torch.ones(2, dtype=torch.bool)}
    open_model(write_model(tmp_path / "m", tensors, PLAIN_CONFIG)).close()


def test_a_quantized_model_is_refused_through_the_cli_with_exit_4(tiny_model, tmp_path, no_tensor_reads):
    model = copy_model(tiny_model("llama", layers=2), tmp_path / "m")
    config = json.loads((model / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "awq", "bits": 4}
    (model / "config.json").write_text(json.dumps(config))
    recipe = tmp_path / "r.yml"
    recipe.write_text(f"merge_method: linear\nmodels:\n  - model: {model}\n    parameters: {{weight: 1.0}}\n")
    result = CliRunner().invoke(merge_app, [str(recipe), str(tmp_path / "out"), "--quiet"])
    assert result.exit_code == 4, result.output
    assert "awq" in result.output and str(model) in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


# --- a whole model in FP8, merged with its bf16 twin ---------------------------------------------------


def make_fp8_twin(source, directory, block=(128, 128)):
    """The model with every 2-D projection weight in block-scaled FP8, as an FP8 release ships it."""
    tensors = load_file(str(source / "model.safetensors"))
    stored = {}
    for name, tensor in tensors.items():
        if name.endswith("proj.weight") and tensor.dim() == 2:
            stored[name], stored[name + "_scale_inv"] = quantize_blocks(tensor, block)
        else:
            stored[name] = tensor
    config = fp8_config(json.loads((source / "config.json").read_text()), block)
    copy_model(source, directory)
    (directory / "model.safetensors").unlink()
    save_file(stored, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(config))
    return directory, stored


@pytest.mark.parametrize("chunk_bytes", [None, 256])
def test_an_fp8_model_merged_with_its_bf16_twin_gives_the_dequantized_weights_and_loads(
    tiny_model, tmp_path, chunk_bytes, tensor_reads, monkeypatch
):
    monkeypatch.setattr(reductions, "CHUNK", 64)  # so chunk boundaries can fall inside the tiny matrices
    twin = tiny_model("llama", layers=2, dtype=torch.bfloat16)
    fp8, stored = make_fp8_twin(twin, tmp_path / "fp8", block=(24, 40))
    text = (
        f"merge_method: linear\ndtype: float32\nout_dtype: bfloat16\nmodels:\n"
        f"  - model: {fp8}\n    parameters: {{weight: 1.0}}\n  - model: {twin}\n    parameters: {{weight: 0.0}}\n"
    )
    out = tmp_path / "out"
    plan, _ = run_merge(parse_recipe(text, known_methods=METHODS.keys()), out, BuildOptions(chunk_bytes=chunk_bytes))
    if chunk_bytes:  # the row-block path really ran on FP8 tensors
        assert any(
            isinstance(o.rows, tuple) and o.name in stored and o.name + "_scale_inv" in stored for o in plan.outputs
        )
    # Scales are read (to dequantize their weights), but every one with its weight.
    scaled = {name.removesuffix("_scale_inv") for name in tensor_reads if name.endswith("_scale_inv")}
    assert scaled and scaled <= set(tensor_reads)
    merged = read_tensors(out)
    assert not any(name.endswith("_scale_inv") for name in merged)
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    assert set(merged) == {n for n in stored if not n.endswith("_scale_inv")}
    for name, tensor in merged.items():
        assert tensor.dtype == torch.bfloat16
        if name + "_scale_inv" in stored:
            expected = dequantize_by_hand(stored[name], stored[name + "_scale_inv"], (24, 40)).to(torch.bfloat16)
            assert torch.equal(tensor, expected), name
        else:
            assert torch.equal(tensor, stored[name]), name
    model = load_causal_lm(out)
    assert torch.isfinite(logits(model, [1, 5, 9, 3])).all()


# --- adapters -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "factor_dtype, config_change, fragment",
    [
        (torch.float8_e4m3fn, {}, "floating-point matrix"),
        (torch.int8, {}, "floating-point matrix"),
        (torch.float32, {"lora_alpha": float("nan")}, "`lora_alpha` must be a finite number"),
        (torch.float32, {"lora_alpha": float("inf")}, "`lora_alpha` must be a finite number"),
    ],
)
def test_quantized_or_non_finite_lora_adapters_are_refused(tiny_model, tmp_path, factor_dtype, config_change, fragment):
    base = tiny_model("llama", layers=2)
    factors = linear_factors("model.layers.0.self_attn.q_proj", 4, 32, 32, seed=0)
    factors = {name: t.to(factor_dtype) for name, t in factors.items()}
    adapter = write_adapter(tmp_path / "a", factors, adapter_config(target_modules=["q_proj"], **config_change))
    with open_model(base).tensors as tensors, pytest.raises(AdapterError, match=fragment) as caught:
        with_adapter(tensors, adapter, model=str(base))
    assert caught.value.exit_code == 4
