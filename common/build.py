"""Execute a plan into an output model directory: the shared back half of all three tools."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mksuite.common.graph import ExecutionContext, Executor, OutputTensor, ProgressListener, RunStats
from mksuite.common.writing import OutputDirectory, PlannedTensor, ShardedWriter, plan_shards

DEFAULT_SHARD_SIZE = 5_000_000_000
# Tensors above this many bytes (in the compute dtype) are merged in row blocks where the
# method allows it, so peak memory stays flat as models grow (mkmerge/methods/chunked.py).
# Small enough that a block's float32 temporaries stay below glibc's 32 MiB mmap ceiling and
# come from the heap, reused, instead of being page-faulted in afresh (common/graph/memory.py).
DEFAULT_CHUNK_BYTES = 8 * 1024**2


@dataclass
class BuildOptions:
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    threads: int | None = None
    shard_size: int = DEFAULT_SHARD_SIZE
    seed: int = 0
    overwrite: bool = False
    readers: int = 2
    prefetch_bytes: int | None = None
    chunk_bytes: int | None = DEFAULT_CHUNK_BYTES  # None: never split a tensor
    # Read GPU-bound inputs straight to the device through pinned pieces (None: on CUDA).
    device_reads: bool | None = None
    # mkmerge: cut embeddings of different vocabulary sizes to the smallest instead of refusing.
    unsafe_truncate_embeddings: bool = False


def output_layout(outputs: Sequence[OutputTensor], shard_size: int):
    """The shard files, headers and offsets the outputs will be written to."""
    whole = {o.name: PlannedTensor(o.name, o.dtype, o.shape) for o in outputs}  # parts share a name
    return plan_shards(list(whole.values()), shard_size)


def build_model(
    outputs: Sequence[OutputTensor],
    sources: Mapping[str, object],
    out: Path,
    options: BuildOptions,
    *,
    finalize: Callable[[Path], None],
    listener: ProgressListener | None = None,
) -> RunStats:
    """Compute every output tensor, write weights and side files, then move OUT into place.

    ``finalize(staging_dir)`` writes config, tokenizer and card files next to the weights.
    Nothing appears at ``out`` unless everything succeeded.
    """
    with OutputDirectory(out, overwrite=options.overwrite) as staging:
        writer = ShardedWriter(staging.path, output_layout(outputs, options.shard_size))
        writer.open()
        try:
            ctx = ExecutionContext(sources=sources, device=options.device, seed=options.seed)
            kwargs = {}
            if options.prefetch_bytes is not None:
                kwargs["prefetch_bytes"] = options.prefetch_bytes
            executor = Executor(
                ctx,
                threads=options.threads,
                readers=options.readers,
                listener=listener,
                device_reads=options.device_reads,
                **kwargs,
            )
            stats = executor.run(
                outputs,
                lambda output, tensor: writer.write(output.name, tensor, output.rows),
                lambda output, where: writer.copy(output.name, output.rows, output.part_shape, output.dtype, where),
            )
            writer.finish()
        finally:
            writer.close()
        finalize(staging.path)
        staging.commit()
    return stats
