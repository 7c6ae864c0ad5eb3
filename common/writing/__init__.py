"""Sharded safetensors output, config.json, tokenizer files, model card, atomic finalize."""

from mksuite.common.writing.model_files import copy_tokenizer_files, write_config, write_model_card
from mksuite.common.writing.output_dir import OutputDirectory
from mksuite.common.writing.safetensors_writer import (
    INDEX_FILE,
    SINGLE_FILE,
    ShardedWriter,
    ShardPlan,
    plan_shards,
)

__all__ = [
    "INDEX_FILE",
    "SINGLE_FILE",
    "OutputDirectory",
    "ShardPlan",
    "ShardedWriter",
    "copy_tokenizer_files",
    "plan_shards",
    "write_config",
    "write_model_card",
]
