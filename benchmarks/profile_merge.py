"""Where a merge's time goes: reads, merge compute, writes, the final fsync, start-up.

    python benchmarks/profile_merge.py RECIPE [--device cuda] [--threads N]

Runs the recipe in-process with timers around the three kinds of work (reads and writes run
on their own threads, so their sums can exceed the wall time) and prints one table.
"""

from __future__ import annotations

import argparse
import os
import resource
import threading
import time
from collections import defaultdict
from pathlib import Path

started = time.perf_counter()

import torch  # noqa: E402

import mksuite.common.writing.safetensors_writer as writer_module  # noqa: E402
from mkmerge import tasks as merge_tasks  # noqa: E402
from mkmerge.run import load_recipe, run_merge  # noqa: E402
from mksuite.common.build import BuildOptions  # noqa: E402
from mksuite.common.graph import LoadTensor  # noqa: E402

totals: dict[str, float] = defaultdict(float)
counts: dict[str, int] = defaultdict(int)
lock = threading.Lock()


def timed(kind: str, function):
    def wrapper(*args, **kwargs):
        begin = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            with lock:
                totals[kind] += time.perf_counter() - begin
                counts[kind] += 1

    return wrapper


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("recipe")
    parser.add_argument("--out", default="/tmp/mk-profile-out")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--chunk-mib", type=float, default=None, help="row-block size (default: the engine's)")
    args = parser.parse_args()
    imported = time.perf_counter()
    LoadTensor.execute = timed("read", LoadTensor.execute)
    for name in ("MergeTensor", "ChunkStats", "CombineStats"):
        cls = getattr(merge_tasks, name)
        cls.execute = timed("merge", cls.execute)
    writer_module.ShardedWriter.write = timed("write", writer_module.ShardedWriter.write)
    writer_module.ShardedWriter.finish = timed("fsync+index", writer_module.ShardedWriter.finish)
    recipe = load_recipe(Path(args.recipe))
    options = BuildOptions(device=torch.device(args.device), threads=args.threads, overwrite=True)
    if args.chunk_mib is not None:
        options.chunk_bytes = int(args.chunk_mib * 1024**2)
    begin = time.perf_counter()
    run_merge(recipe, Path(args.out), options, write_card=False)
    end = time.perf_counter()
    print(f"{'imports':14s} {imported - started:8.2f} s")
    print(f"{'run_merge':14s} {end - begin:8.2f} s   (wall of planning + merging + writing)")
    for kind in ("read", "merge", "write", "fsync+index"):
        print(f"{kind:14s} {totals[kind]:8.2f} s   over {counts[kind]} calls")
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(f"{'page faults':14s} {usage.ru_minflt:8d}     peak RSS {usage.ru_maxrss / 1024:.0f} MB")
    print(f"{'cpu':14s} {usage.ru_utime:8.2f} s user {usage.ru_stime:.2f} s system (imports included)")
    print(f"THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE')} threads={torch.get_num_threads()}")


if __name__ == "__main__":
    main()
