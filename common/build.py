"""Execute a plan into an output model directory: the shared back half of all three tools."""

from __future__ import annotations

import json
import warnings
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mksuite.common.faults import check_free_space, writing_to
from mksuite.common.graph import ExecutionContext, Executor, OutputTensor, ProgressListener, RunStats
from mksuite.common.loading import TensorInfo
from mksuite.common.loading.remote import Prefetcher, RemoteFile, remote_file_of
from mksuite.common.writing import OutputDirectory, ShardedWriter, plan_shards, test_hooks
from mksuite.common.writing.journal import Journal, partial_matches_plan, run_fingerprint
from mksuite.common.writing.output_dir import OutputNotice, output_directory
from mksuite.common.writing.output_guard import RunInput
from mksuite.common.writing.safetensors_writer import index_json
from mksuite.common.writing.verify import verify_output

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
    # Re-read the output before it is moved into place (common/writing/verify.py); the
    # one-line result goes to ``notify``.
    verify: bool = False
    notify: Callable[[str], None] | None = None
    # mkmerge: cut embeddings of different vocabulary sizes to the smallest instead of refusing.
    unsafe_truncate_embeddings: bool = False
    # The more accurate arithmetic where mergekit rounds to the merge dtype (mkmerge's L1
    # rescale factor and arcee_fusion, mkmoe's gate forward pass in float32).
    precise: bool = False


def front_loaded(parts: Mapping[str, int]) -> set[str]:
    """The tensors computed first: those merged in the most row blocks (when more than one).

    Those (the vocabulary matrices, in practice) cost several times a layer tensor per byte:
    computed first, they leave cheap work for the end of the run, so a run killed late
    resumes quickly and the remaining-time estimate errs early rather than late.
    """
    most = max(parts.values(), default=1)
    return {name for name, count in parts.items() if count == most} if most > 1 else set()


def compute_order(outputs: Sequence[OutputTensor]) -> list[OutputTensor]:
    """``outputs`` in the order they are computed: :func:`front_loaded` tensors first, then
    plan order. The writer puts every tensor at its planned offset, so the order changes no
    byte of the output."""
    first = front_loaded(Counter(o.name for o in outputs))
    return sorted(outputs, key=lambda o: o.name not in first)  # stable


def output_layout(outputs: Sequence[OutputTensor], shard_size: int):
    """The shard files, headers and offsets the outputs will be written to."""
    whole = {o.name: TensorInfo(o.name, o.dtype, o.shape) for o in outputs}  # parts share a name
    return plan_shards(list(whole.values()), shard_size)


def build_model(
    outputs: Sequence[OutputTensor],
    sources: Mapping[str, object],
    out: Path | OutputDirectory,
    options: BuildOptions,
    *,
    finalize: Callable[[Path], None],
    listener: ProgressListener | None = None,
    inputs: Sequence[RunInput] = (),
) -> RunStats:
    """Compute every output tensor, write weights and side files, then move OUT into place.

    ``finalize(staging_dir)`` writes config, tokenizer and card files next to the weights.
    Nothing appears at ``out`` unless everything succeeded. ``inputs``: every path the run
    reads; OUT may not be, contain or lie inside any of them. A partial output left by a
    killed run of the same plan is resumed: its journaled tensors are not computed again.
    """
    layout = output_layout(outputs, options.shard_size)
    fingerprint = run_fingerprint(layout, outputs, sources, seed=options.seed, device=options.device)
    with output_directory(out, overwrite=options.overwrite, inputs=inputs, fingerprint=fingerprint) as staging:
        out = staging.final
        journal = Journal(staging.path)
        done = journal.read() if staging.resumed else {}
        if staging.resumed and not (partial_matches_plan(staging.path, layout) and set(done) <= _names(layout)):
            staging.discard_progress("its weight files do not match the plan")
            done = {}
        if options.verify and any(not crc for crc in done.values()):
            staging.discard_progress("it was written without the checksums --verify needs")
            done = {}
        with writing_to(out):
            check_free_space(staging.path, _bytes_to_write(staging.path, layout, bool(done)), out)
        if done:
            warnings.warn(
                OutputNotice(
                    f"resuming an interrupted run: {len(done)} of {len(_names(layout))} tensors already written"
                ),
                stacklevel=2,
            )
        writer = ShardedWriter(staging.path, layout, journal=journal, checksums=options.verify)
        with writing_to(out):
            writer.open(done)
        try:
            ctx = ExecutionContext(sources=sources, device=options.device, seed=options.seed, scratch_dir=staging.path)
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

            def sink(output, tensor):
                with writing_to(out):
                    writer.write(output.name, tensor, output.rows)

            def copier(output, where):
                with writing_to(out):
                    writer.copy(output.name, output.rows, output.part_shape, output.dtype, where)

            todo = compute_order([o for o in outputs if o.name not in done])
            with Prefetcher(hub_downloads(todo, sources)):
                stats = executor.run(todo, sink, copier)
            with writing_to(out):
                writer.finish()
        finally:
            writer.close()
        with writing_to(out):
            finalize(staging.path)
        if options.verify:
            test_hooks.before_verify(staging.path)
            line = verify_output(staging.path, layout, writer.checksums or {}, [i.name for i in inputs if i.name])
            if options.notify is not None:
                options.notify(line)
        staging.commit()
    return stats


def hub_downloads(outputs: Sequence[OutputTensor], sources: Mapping[str, object]) -> list[RemoteFile]:
    """The Hub files the outputs read, in the order the run first reads them.

    Only files holding a tensor some output needs are listed: stacking a few layers or
    merging a subset fetches only the shards that hold them.
    """
    files: dict[RemoteFile, None] = {}
    seen: set[object] = set()
    for output in outputs:
        stack = [output.task]
        while stack:
            task = stack.pop()
            if task in seen:
                continue
            seen.add(task)
            if task.is_io and isinstance(getattr(task, "model", None), str) and hasattr(task, "name"):
                file = remote_file_of(sources.get(task.model), task.name)
                if file is not None:
                    files.setdefault(file)
            stack.extend(reversed(task.dependencies()))
    return list(files)


def _names(layout) -> set[str]:
    return {tensor.name for plan in layout for tensor in plan.tensors}


def _bytes_to_write(directory: Path, layout, resumed: bool) -> int:
    """Bytes the weights and index still need on disk (a resumed partial already holds some).

    Side files (config, tokenizer, card) are not counted: they are small, and should they not
    fit, the write fails with the same clear error.
    """
    needed = sum(plan.file_bytes for plan in layout)
    if len(layout) > 1:
        needed += len(json.dumps(index_json(layout), indent=2)) + 1
    if resumed:
        for plan in layout:
            try:
                needed -= (directory / plan.filename).stat().st_blocks * 512
            except OSError:
                pass
    return max(needed, 0)
