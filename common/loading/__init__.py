"""Model references -> lazy tensor sources.

A :class:`ModelReference` names a model; :func:`resolve_model_path` turns it into a
directory (local, or a Hugging Face Hub snapshot); :func:`open_model` reads that
directory's config.json and weight headers into a :class:`ModelFiles` whose
:class:`TensorSource` loads one tensor at a time; :func:`with_adapter` wraps a source so a
PEFT LoRA adapter is applied as each tensor loads. Nothing before `load()` reads tensor data.
"""

from mksuite.common.loading.hub import CONFIG_PATTERNS, hub_cache_dir, hub_offline, resolve_model_path
from mksuite.common.loading.lora import LoraSource, open_adapter, with_adapter
from mksuite.common.loading.model import ModelFiles, ShardedSource, open_model, open_tensor_file
from mksuite.common.loading.pickle_source import PickleCheckpoint
from mksuite.common.loading.reference import ModelReference
from mksuite.common.loading.safetensors_source import SafetensorsFile
from mksuite.common.loading.source import ByteRange, TensorInfo, TensorSource, byte_range, load_rows

__all__ = [
    "ByteRange",
    "CONFIG_PATTERNS",
    "LoraSource",
    "ModelFiles",
    "ModelReference",
    "PickleCheckpoint",
    "SafetensorsFile",
    "ShardedSource",
    "TensorInfo",
    "TensorSource",
    "byte_range",
    "hub_cache_dir",
    "load_rows",
    "hub_offline",
    "open_adapter",
    "open_model",
    "open_tensor_file",
    "resolve_model_path",
    "with_adapter",
]
