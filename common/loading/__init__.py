"""Model references -> lazy tensor sources.

A :class:`ModelReference` names a model; :func:`resolve_model_path` turns it into a
directory (local, or a Hugging Face Hub snapshot); :func:`open_model` reads that
directory's config.json and weight headers into a :class:`ModelFiles` whose
:class:`TensorSource` loads one tensor at a time; :func:`with_adapter` wraps a source so a
PEFT LoRA adapter is applied as each tensor loads. Nothing before `load()` reads tensor data.

Names are imported on first use (PEP 562): a caller that needs only :class:`ModelReference`
(recipe parsing) does not import torch.
"""

from __future__ import annotations

from mksuite.common.lazy_exports import lazy_exports

_HOME = {
    "CONFIG_PATTERNS": "hub",
    "hub_cache_dir": "hub",
    "hub_offline": "hub",
    "resolve_model_path": "hub",
    "LoraSource": "lora",
    "open_adapter": "lora",
    "with_adapter": "lora",
    "ModelFiles": "model",
    "ShardedSource": "model",
    "open_model": "model",
    "open_tensor_file": "model",
    "PickleCheckpoint": "pickle_source",
    "ModelReference": "reference",
    "SafetensorsFile": "safetensors_source",
    "ByteRange": "source",
    "TensorInfo": "source",
    "TensorSource": "source",
    "byte_range": "source",
    "load_rows": "source",
}

__all__ = sorted(_HOME)

__getattr__, __dir__ = lazy_exports(__name__, _HOME)
