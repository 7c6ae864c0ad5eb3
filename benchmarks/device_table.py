"""The GPU machine's table: ours on the CPU, ours on CUDA, mergekit --cuda, printed cell by cell.

    python benchmarks/device_table.py [--size 1.1b] [--methods linear,slerp,dare_ties,ties]
                                      [--mergekit PATH/mergekit-yaml] [--threads N] [--timeout S]
    python benchmarks/device_table.py --tiny --cpu-only      # the same code on a toy family

Builds (or reuses) the family of bench_merge.py, warms the page cache, times the I/O floor,
then per method: our merge on the CPU (all cores), on CUDA, and mergekit's with --cuda, one run
each. Every cell is printed as soon as its run ends, so a run cut short still shows what it
did. A cell reads ``wall s (x floor, peak host RSS)``; `cuda = cpu` says whether our two
outputs are bit-identical (tensors identical / compared). Run by device_check.sh.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from bench_merge import RECIPES, floor_command, same_bits, warm
from model_family import SIZES, LlamaShape, build_llama_family

# A family that merges in about a second: for checking this script, not for timing.
TOY = LlamaShape(hidden=64, intermediate=96, layers=2, heads=4, kv_heads=2, vocab=128)
COLUMNS = ("ours cpu", "ours cuda", "mergekit --cuda")


def timed(command: list[str], timeout: float) -> tuple[str, float | None]:
    """Run a child; (cell text, wall seconds or None when it failed or ran out of time)."""
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    timer = threading.Timer(timeout, process.kill)
    timer.start()
    try:
        _, status, usage = os.wait4(process.pid, 0)
    finally:
        timer.cancel()
    wall = time.perf_counter() - started
    error = process.stderr.read().decode(errors="replace").strip() if process.stderr else ""
    if status != 0:
        if wall >= timeout:
            return f"timeout {timeout:.0f}s", None
        last = error.splitlines()[-1] if error else f"exit status {status}"
        print(f"\n  [{' '.join(command[:4])} ...] failed: {last[:200]}", flush=True)
        return "failed", None
    return f"{wall:.1f}s ({{ratio}}, {usage.ru_maxrss / 1024**2:.2f}G)", wall


def cell(text: str, wall: float | None, floor: float) -> str:
    return text.format(ratio=f"{wall / floor:.1f}x") if wall is not None else text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="1.1b")
    parser.add_argument("--tiny", action="store_true", help="a toy family instead of --size")
    parser.add_argument("--cpu-only", action="store_true", help="only the `ours cpu` column")
    parser.add_argument("--methods", default="linear,slerp,dare_ties,ties")
    parser.add_argument("--mergekit", default=None, help="mergekit-yaml to compare with (0.1.5)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--timeout", type=float, default=150.0, help="seconds one run may take")
    parser.add_argument("--root", default="/tmp/mk-bench")
    args = parser.parse_args()

    size = "toy" if args.tiny else args.size
    SIZES.setdefault("toy", TOY)
    root = Path(args.root)
    started = time.perf_counter()
    models = build_llama_family(root / size, size, 3, dtype=torch.bfloat16)
    print(f"family {size} ready in {time.perf_counter() - started:.1f}s: {models[0].parent}", flush=True)
    warm(models)
    text, floor = timed(floor_command(models, root / "floor.bin"), args.timeout)
    (root / "floor.bin").unlink(missing_ok=True)
    if floor is None:
        raise SystemExit(f"the I/O floor did not run: {text}")
    print(f"floor (read inputs + write one model): {floor:.2f}s, {args.threads} CPU threads", flush=True)

    columns = COLUMNS[:1] if args.cpu_only else COLUMNS if args.mergekit else COLUMNS[:2]
    print(f"\n| merge | {' | '.join(columns)} |{' cuda = cpu |' if 'ours cuda' in columns else ''}")
    print(f"|---|{'---:|' * len(columns)}{'---:|' if 'ours cuda' in columns else ''}", flush=True)
    layers = SIZES[size].layers
    for method in args.methods.split(","):
        recipe = root / f"{method}.yml"
        recipe.write_text(
            RECIPES[method].format(
                m0=models[0], m1=models[1], m2=models[2], layers=layers, half=layers // 2, dtype="bfloat16"
            )
        )
        outs = {column: root / f"out-{name}" for column, name in zip(COLUMNS, ("cpu", "cuda", "mergekit"))}
        commands = {
            "ours cpu": [sys.executable, "-m", "mkmerge", str(recipe), str(outs["ours cpu"]), "--overwrite", "--quiet",
                         "--threads", str(args.threads)],
            "ours cuda": [sys.executable, "-m", "mkmerge", str(recipe), str(outs["ours cuda"]), "--overwrite",
                          "--quiet", "--device", "cuda"],
            "mergekit --cuda": [str(args.mergekit), str(recipe), str(outs["mergekit --cuda"]), "--cuda"],
        }  # fmt: skip
        print(f"| {method} |", end="", flush=True)
        for column in columns:
            shutil.rmtree(outs[column], ignore_errors=True)
            text, wall = timed(commands[column], args.timeout)
            print(f" {cell(text, wall, floor)} |", end="", flush=True)
            if column == "mergekit --cuda":
                shutil.rmtree(outs[column], ignore_errors=True)
        if "ours cuda" in columns:
            print(f" {same_bits(outs['ours cpu'], outs['ours cuda'])} |", end="", flush=True)
        print(flush=True)
        for out in outs.values():
            shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
