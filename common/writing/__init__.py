"""Sharded safetensors output, config.json, tokenizer files, model card, atomic finalize.

Names are imported on first use (PEP 562): checking an output directory
(:class:`OutputDirectory`) does not import torch, so a command can refuse a bad output
location or recipe before loading the engine.
"""

from __future__ import annotations

from mksuite.common.lazy_exports import lazy_exports

_HOME = {
    "copy_tokenizer_files": "model_files",
    "write_config": "model_files",
    "write_model_card": "model_files",
    "OutputDirectory": "output_dir",
    "INDEX_FILE": "safetensors_writer",
    "SINGLE_FILE": "safetensors_writer",
    "ShardedWriter": "safetensors_writer",
    "ShardPlan": "safetensors_writer",
    "plan_shards": "safetensors_writer",
}

__all__ = sorted(_HOME)

__getattr__, __dir__ = lazy_exports(__name__, _HOME)
