"""Quantized checkpoints: FP8 ones are read (dequantized as they load); every other format is refused.

A merge of quantized codes is silently wrong (an FP8 code cast to bf16 is off by its scale,
up to 448x; GPTQ's int32 words are not numbers at all), so a format not read here is refused
before any work. FP8 as DeepSeek-V3 and Qwen3-FP8 ship it is read: each float8_e4m3fn
`weight` has a float32 `weight_scale_inv` holding one factor per block of
`weight_block_size` (128x128; edge blocks partial) or, without a block size, one factor per
tensor. ``weight.float() * scale`` is the real weight; the scales themselves are not tensors
of the model, so they are hidden from the tensor list and never reach an output.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import torch

from mksuite.common.errors import ModelFileError
from mksuite.common.loading.source import ByteRange, TensorInfo, TensorSource, byte_range, load_rows

FP8_DTYPES = frozenset({torch.float8_e4m3fn, torch.float8_e5m2})
SCALE_SUFFIX = "_scale_inv"
# Dtypes a weight of an unquantized checkpoint may have: floats, plus the int64 and bool of
# buffers some checkpoints carry (position ids, attention masks). Anything narrower than
# int64 (int32 words, uint8 nibbles, int8 codes, float8) is a quantized or packed format.
PLAIN_DTYPES = frozenset({torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.bool})
# Tensor-name endings that only quantized formats store (GPTQ/AWQ, bitsandbytes, compressed-tensors, ...).
# (Packed formats are caught by dtype too; these catch the float side tensors of the rest.)
QUANTIZED_NAME_ENDINGS = (
    ".qweight",
    ".qzeros",
    ".g_idx",
    ".SCB",
    ".weight_format",
    ".absmax",
    ".quant_map",
    ".nested_absmax",
    ".nested_quant_map",
    ".weight_packed",
    ".weight_zero_point",
    ".weight_scale",
    ".weight_global_scale",
)
_DECLARED_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def read_quantized(path: Path, config: dict, tensors: TensorSource) -> TensorSource:
    """``tensors`` as the merge must see them: FP8 dequantized, any other quantized format refused."""
    method, settings = _quantization(config)
    if method is None:
        _refuse_quantized_tensors(path, tensors, None)
        return tensors
    if method != "fp8":
        raise _unsupported(path, f"quantization_config.quant_method `{method}`")
    source = Fp8Source(tensors, block=_block_size(path, settings), dtype=_declared_dtype(config), model=str(path))
    _refuse_quantized_tensors(path, source, "fp8")
    return source


def _quantization(config: dict) -> tuple[str | None, dict]:
    """(quant_method, settings) from config.json, or its text config; (None, {}) when unquantized."""
    for holder in (config, config.get("text_config")):
        if not isinstance(holder, dict):
            continue
        for key in ("quantization_config", "compression_config"):
            settings = holder.get(key)
            if settings is None:
                continue
            if not isinstance(settings, dict):
                return f"unreadable {key} ({settings!r})", {}
            method = settings.get("quant_method") or settings.get("format") or "unnamed"
            return str(method).lower(), settings
    return None, {}


def _unsupported(path: Path, what: str) -> ModelFileError:
    return ModelFileError(
        f"model {path} is quantized ({what}); mksuite reads only unquantized and FP8 "
        "(block-scaled or per-tensor, weight_scale_inv) checkpoints",
        path=str(path),
        hint="merge the unquantized release of this model (or dequantize it first), then quantize the output",
    )


def _block_size(path: Path, settings: dict) -> tuple[int, int] | None:
    fmt = settings.get("fmt", "e4m3")
    if fmt not in ("e4m3", "e5m2"):
        raise _unsupported(path, f"fp8 with fmt `{fmt}`")
    block = settings.get("weight_block_size")
    if block is None:
        return None
    if not (isinstance(block, list) and len(block) == 2 and all(type(b) is int and b > 0 for b in block)):
        raise ModelFileError(
            f"model {path} is FP8-quantized, but its quantization_config.weight_block_size must be two positive integers, "
            f"got {block!r}",
            path=str(path),
        )
    return block[0], block[1]


def _declared_dtype(config: dict) -> torch.dtype:
    """The precision the model was trained in (what FP8 weights dequantize to); bfloat16 if unsaid."""
    for holder in (config, config.get("text_config")):
        if isinstance(holder, dict):
            for key in ("torch_dtype", "dtype"):
                dtype = _DECLARED_DTYPES.get(str(holder.get(key)))
                if dtype is not None:
                    return dtype
    return torch.bfloat16


def _refuse_quantized_tensors(path: Path, tensors: TensorSource, method: str | None) -> None:
    """Refuse tensors only quantized formats have: by name, or by a dtype weights never have."""
    for name in tensors.names():
        marked = name.endswith(QUANTIZED_NAME_ENDINGS) or ".quant_state." in name
        if marked or (method is None and name.endswith(SCALE_SUFFIX)):
            raise _unsupported(path, f"tensor `{name}` belongs to a quantized format")
        dtype = tensors.info(name).dtype
        if dtype not in PLAIN_DTYPES:
            detail = "without its weight_scale_inv" if dtype in FP8_DTYPES and method == "fp8" else "not a float"
            raise _unsupported(path, f"tensor `{name}` is {str(dtype).removeprefix('torch.')}, {detail}")
        if name.endswith(".weight") and not dtype.is_floating_point:  # int64/bool are for buffers only
            raise ModelFileError(
                f"model {path}: weight `{name}` is stored as {str(dtype).removeprefix('torch.')}, not a float",
                path=str(path),
                hint="weights are floating-point; the file is damaged or was converted wrongly",
            )


class Fp8Source(TensorSource):
    """FP8 weights with their `weight_scale_inv`, read as ``dtype`` tensors; the scales are hidden."""

    def __init__(self, inner: TensorSource, *, block: tuple[int, int] | None, dtype: torch.dtype, model: str):
        self.inner = inner
        self.block = block
        self.dtype = dtype
        self.model = model
        names = inner.names()
        present = set(names)
        self._scales = {
            name: name + SCALE_SUFFIX
            for name in names
            if inner.info(name).dtype in FP8_DTYPES and name + SCALE_SUFFIX in present
        }
        hidden = set(self._scales.values())
        for name in present:
            if name.endswith(SCALE_SUFFIX) and name not in hidden:
                raise ModelFileError(f"model {model}: scale `{name}` has no FP8 tensor to scale", path=model)
        # Static activation scales only matter to FP8 kernels; the dequantized weights don't use them.
        hidden |= {
            n for n in present if n.endswith(".input_scale") and n[: -len("input_scale")] + "weight" in self._scales
        }
        self._names = [name for name in names if name not in hidden]
        self._name_set = set(self._names)
        for name in self._scales:
            self._check_scale_shape(name)

    def _check_scale_shape(self, name: str) -> None:
        shape = self.inner.info(name).shape
        scale = self.inner.info(self._scales[name])
        if scale.dtype not in PLAIN_DTYPES or not scale.dtype.is_floating_point:
            raise ModelFileError(
                f"model {self.model}: scale `{scale.name}` is {scale.dtype}, not a float", path=self.model
            )
        if scale.shape in ((), (1,)):
            return  # one factor for the whole tensor
        expected = None
        if self.block is not None and len(shape) >= 2:
            rows, cols = shape[-2:]
            expected = (*shape[:-2], math.ceil(rows / self.block[0]), math.ceil(cols / self.block[1]))
        if scale.shape != expected:
            raise ModelFileError(
                f"model {self.model}: scale `{scale.name}` has shape {list(scale.shape)}, but FP8 tensor `{name}` "
                f"{list(shape)} with weight_block_size {list(self.block) if self.block else None} "
                f"needs {list(expected) if expected else [1]}",
                path=self.model,
            )

    def names(self) -> list[str]:
        return list(self._names)

    def __contains__(self, name: object) -> bool:
        return name in self._name_set

    def info(self, name: str) -> TensorInfo:
        info = self.inner.info(name)
        return replace(info, dtype=self.dtype) if name in self._scales else info

    def load(self, name: str) -> torch.Tensor:
        if name not in self._scales:
            return self.inner.load(name)
        weight = self.inner.load(name)
        scale = self.inner.load(self._scales[name])
        return self._dequantize(weight, scale, row_offset=0)

    def load_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)``, reading only the scale rows of the blocks they fall in."""
        if name not in self._scales:
            return load_rows(self.inner, name, start, stop)
        weight = load_rows(self.inner, name, start, stop)
        scale_name = self._scales[name]
        if self.inner.info(scale_name).numel == 1:
            return self._dequantize(weight, self.inner.load(scale_name), row_offset=0)
        if weight.dim() > 2:  # rows index experts (or another leading dim): scales share it
            return self._dequantize(weight, load_rows(self.inner, scale_name, start, stop), row_offset=0)
        block_rows = self.block[0]
        first = start // block_rows
        last = max(first + 1, math.ceil(stop / block_rows))
        scale = load_rows(self.inner, scale_name, first, last)
        return self._dequantize(weight, scale, row_offset=start - first * block_rows)

    def _dequantize(self, weight: torch.Tensor, scale: torch.Tensor, *, row_offset: int) -> torch.Tensor:
        """``weight.float() * scale``, each scale entry spread over its block; rows start at ``row_offset``."""
        values = weight.to(torch.float32)
        scale = scale.to(torch.float32)
        if scale.numel() == 1 or values.dim() < 2:
            return values.mul_(scale.reshape(())).to(self.dtype)
        rows, cols = values.shape[-2:]
        spread = scale.repeat_interleave(self.block[0], dim=-2)[..., row_offset : row_offset + rows, :]
        spread = spread.repeat_interleave(self.block[1], dim=-1)[..., :cols]
        return values.mul_(spread).to(self.dtype)

    def byte_range(self, name: str, rows: tuple[int, int] | None = None) -> ByteRange | None:
        # Dequantized tensors are not their stored bytes, so they can never be copied verbatim.
        return None if name in self._scales else byte_range(self.inner, name, rows)

    def close(self) -> None:
        self.inner.close()

    def __repr__(self) -> str:
        return f"Fp8Source({self.inner!r}, {len(self._scales)} FP8 tensors, block {self.block})"
