"""The restricted unpickler for torch checkpoints' data.pkl: tensor descriptions, nothing else.

A pickle can run arbitrary code: every global it names is looked up through `find_class`
and may then be called. Here `find_class` knows only the handful of globals torch uses to
describe tensors, and answers each with our own stand-in, so unpickling builds
(storage key, dtype, offset, size, stride) records and never imports, calls or reads
anything else. Persistent ids (torch's storages) become placeholders; no storage bytes
are read. Stand-ins are frozen and slotted so a pickle's BUILD opcode cannot mutate them.
"""

from __future__ import annotations

import _compat_pickle
import io
import pickle
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from mksuite.common.errors import MkError, TensorFileError, UnsafePickleError

RESAVE_HINT = (
    "re-save it with a current torch (torch.save(torch.load(path, weights_only=True), path)) "
    "or convert it to safetensors"
)


@dataclass(frozen=True, slots=True)
class _StorageType:
    """Stands in for a storage class global such as `torch.FloatStorage`."""

    dtype: torch.dtype | None


@dataclass(frozen=True, slots=True)
class _TensorType:
    """Stands in for `torch.Tensor` / `torch.nn.Parameter` in `_rebuild_from_type_v2`."""

    name: str


@dataclass(frozen=True, slots=True)
class _StorageRef:
    """What a persistent id becomes: a storage member of the zip, not yet read."""

    key: str
    dtype: torch.dtype | None


@dataclass(frozen=True, slots=True)
class PickledTensor:
    """A tensor as recorded from data.pkl; offsets and strides are in elements of `dtype`."""

    storage_key: str
    dtype: torch.dtype
    storage_offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]

    @property
    def span(self) -> int:
        """Elements of storage the tensor reaches, from its offset; 0 when it is empty."""
        if 0 in self.size:
            return 0
        return 1 + sum((n - 1) * s for n, s in zip(self.size, self.stride, strict=True))


@dataclass(frozen=True, slots=True)
class _Recorder:
    """Wraps a rebuild replacement; slotted and frozen so a pickle's BUILD cannot mutate it."""

    fn: Callable[..., object]

    def __call__(self, *args, **kwargs) -> object:
        return self.fn(*args, **kwargs)


class _NotATensor(ValueError):
    """A rebuild function was called with arguments that do not describe a tensor."""


def _int_tuple(value: object, what: str) -> tuple[int, ...]:
    if not isinstance(value, tuple | list) or not all(type(v) is int and v >= 0 for v in value):
        raise _NotATensor(f"{what} {value!r} is not a tuple of non-negative integers")
    return tuple(value)


def _record(storage: object, offset: object, size: object, stride: object, dtype: object) -> PickledTensor:
    if not isinstance(storage, _StorageRef):
        raise _NotATensor(f"tensor storage is {type(storage).__name__}, not a storage reference")
    dtype = dtype if dtype is not None else storage.dtype
    if not isinstance(dtype, torch.dtype):
        raise _NotATensor(f"tensor in storage {storage.key!r} has no dtype")
    if type(offset) is not int or offset < 0:
        raise _NotATensor(f"storage offset {offset!r} is not a non-negative integer")
    size_t, stride_t = _int_tuple(size, "size"), _int_tuple(stride, "stride")
    if len(size_t) != len(stride_t):
        raise _NotATensor(f"size {size_t} and stride {stride_t} differ in length")
    return PickledTensor(storage.key, dtype, offset, size_t, stride_t)


# Our replacements for torch's rebuild functions: same signatures, they only record.
def _rebuild_tensor(storage, storage_offset, size, stride):
    return _record(storage, storage_offset, size, stride, None)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    return _record(storage, storage_offset, size, stride, None)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype, metadata=None):
    return _record(storage, storage_offset, size, stride, dtype)


def _rebuild_parameter(data, requires_grad, backward_hooks):
    if not isinstance(data, PickledTensor):
        raise _NotATensor("parameter data is not a tensor")
    return data


def _rebuild_parameter_with_state(data, requires_grad, backward_hooks, state):
    return _rebuild_parameter(data, requires_grad, backward_hooks)


def _rebuild_from_type_v2(func, new_type, args, state):
    # `func` came through find_class too, so it is one of our recorders.
    if not (isinstance(new_type, _TensorType) and isinstance(func, _Recorder) and isinstance(args, tuple)):
        raise _NotATensor("unsupported tensor subclass rebuild")
    return func(*args)


_STORAGE_DTYPES = {
    "DoubleStorage": torch.float64,
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}
# dtypes that `_rebuild_tensor_v3` names explicitly (float8, unsigned ints, ...).
_DTYPE_NAMES = (
    "float64 float32 float16 bfloat16 int64 int32 int16 int8 uint8 bool uint16 uint32 uint64 "
    "float8_e4m3fn float8_e5m2 float8_e4m3fnuz float8_e5m2fnuz float8_e8m0fnu"
).split()

_ALLOWED_GLOBALS: dict[tuple[str, str], object] = {
    ("torch._utils", "_rebuild_tensor"): _Recorder(_rebuild_tensor),
    ("torch._utils", "_rebuild_tensor_v2"): _Recorder(_rebuild_tensor_v2),
    ("torch._utils", "_rebuild_tensor_v3"): _Recorder(_rebuild_tensor_v3),
    ("torch._utils", "_rebuild_parameter"): _Recorder(_rebuild_parameter),
    ("torch._utils", "_rebuild_parameter_with_state"): _Recorder(_rebuild_parameter_with_state),
    ("torch._tensor", "_rebuild_from_type_v2"): _Recorder(_rebuild_from_type_v2),
    ("torch", "Tensor"): _TensorType("Tensor"),
    ("torch.nn.parameter", "Parameter"): _TensorType("Parameter"),
    ("collections", "OrderedDict"): OrderedDict,
    ("torch", "Size"): tuple,
    ("torch", "UntypedStorage"): _StorageType(torch.uint8),
    ("torch.storage", "UntypedStorage"): _StorageType(torch.uint8),
    ("torch.storage", "TypedStorage"): _StorageType(None),
    **{("torch", name): _StorageType(dtype) for name, dtype in _STORAGE_DTYPES.items()},
    **{
        ("torch", name): getattr(torch, name)
        for name in _DTYPE_NAMES
        if isinstance(getattr(torch, name, None), torch.dtype)
    },
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles tensor descriptions only; any other global is refused by name."""

    def __init__(self, data: bytes, path: Path):
        super().__init__(io.BytesIO(data))
        self._path = path

    def find_class(self, module: str, name: str) -> object:
        # Protocol 0-2 pickles spell Python 2 names (`__builtin__.eval`); report and match
        # the Python 3 spelling, as the stock unpickler would resolve it.
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"{self._path} asks to load the global `{module}.{name}`, which is not needed to "
                "describe tensors; refusing to unpickle it (a checkpoint can run code this way)",
                path=str(self._path),
                hint="only load checkpoints you trust; if you do, convert this one to safetensors",
            ) from None

    def persistent_load(self, pid: object) -> _StorageRef:
        if (
            not isinstance(pid, tuple)
            or len(pid) < 3
            or pid[0] != "storage"
            or not isinstance(pid[1], _StorageType)
            or not isinstance(pid[2], str)
        ):
            raise TensorFileError(
                f"{self._path} has an unsupported persistent reference {pid!r} in data.pkl",
                path=str(self._path),
            )
        return _StorageRef(pid[2], pid[1].dtype)


def _unpickle(data: bytes, path: Path) -> object:
    try:
        return _RestrictedUnpickler(data, path).load()
    except MkError:
        raise
    except _NotATensor as error:
        raise TensorFileError(f"{path}: data.pkl describes a tensor oddly: {error}", path=str(path)) from None
    except Exception as error:  # any malformed pickle: UnpicklingError, EOFError, TypeError, ...
        raise TensorFileError(
            f"{path}: data.pkl cannot be read ({type(error).__name__}: {error})",
            path=str(path),
            hint=RESAVE_HINT,
        ) from None


def _select_state_dict(obj: object, path: Path) -> dict[str, PickledTensor]:
    """The dict of tensors: the top level, or its single dict-of-tensors value."""

    def is_state_dict(value: object) -> bool:
        return isinstance(value, Mapping) and all(
            isinstance(k, str) and isinstance(v, PickledTensor) for k, v in value.items()
        )

    if is_state_dict(obj):
        return dict(obj)
    if isinstance(obj, Mapping):
        nested = [v for v in obj.values() if isinstance(v, Mapping) and v and is_state_dict(v)]
        if len(nested) == 1:
            return dict(nested[0])
        what = f"a dict with keys {sorted(map(str, obj))[:8]}"
    else:
        what = f"a {type(obj).__name__}"
    raise TensorFileError(
        f"{path} holds {what}, not a state dict "
        "(a dict of name -> tensor, or a dict with exactly one such dict inside)",
        path=str(path),
        hint="save `model.state_dict()`, or convert the checkpoint to safetensors",
    )


def read_state_dict(data: bytes, path: Path) -> dict[str, PickledTensor]:
    """The tensor records of a data.pkl, or an error naming `path` (UnsafePickleError for
    any global beyond tensor rebuilding)."""
    return _select_state_dict(_unpickle(data, path), path)
