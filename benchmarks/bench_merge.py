"""Speed and memory of mkmerge next to an I/O floor, on random Llama-shaped bf16 models.

    python benchmarks/bench_merge.py [--sizes 0.5b,1.1b] [--repeat 3] [--root /tmp/mk-bench]
                                     [--methods linear,ties,slerp] [--mergekit /path/to/venv/bin/mergekit-yaml]

For each size it builds (once, cached under --root) a base and two fine-tunes, warms the
page cache, then measures, alternating runs and reporting medians:

* floor: read every input tensor file once and write one model's worth of bytes
  (what any merge must at least do);
* each merge through the `mkmerge` command line, in a child process whose peak RSS comes
  from the kernel (wait4 rusage), so the number includes Python, torch and everything else.

With --mergekit, the same recipes also run through mergekit as a black box for comparison, and
the last run's two outputs are compared tensor by tensor (`same bits`: tensors bit-identical).
Prints one table; tests never assert on these numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from model_family import build_llama_family

RECIPES = {
    "linear": """merge_method: linear
models:
  - model: {m0}
    parameters: {{weight: 0.4}}
  - model: {m1}
    parameters: {{weight: 0.3}}
  - model: {m2}
    parameters: {{weight: 0.3}}
dtype: {dtype}
""",
    "slerp": """merge_method: slerp
base_model: {m0}
models:
  - model: {m0}
  - model: {m1}
parameters:
  t: 0.4
dtype: {dtype}
""",
    "ties": """merge_method: ties
base_model: {m0}
models:
  - model: {m1}
    parameters: {{weight: 0.5, density: 0.5}}
  - model: {m2}
    parameters: {{weight: 0.5, density: 0.5}}
dtype: {dtype}
""",
    "dare_ties": """merge_method: dare_ties
base_model: {m0}
models:
  - model: {m1}
    parameters: {{weight: 0.5, density: 0.5}}
  - model: {m2}
    parameters: {{weight: 0.5, density: 0.5}}
dtype: {dtype}
""",
    # Goliath-style: all of m0's layers, then the upper half of m1's (n layers -> 1.5 n)
    "passthrough": """merge_method: passthrough
slices:
  - sources: [{{model: {m0}, layer_range: [0, {layers}]}}]
  - sources: [{{model: {m1}, layer_range: [{half}, {layers}]}}]
dtype: {dtype}
""",
}


def run_child(command: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of a child process, from the kernel's accounting."""
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    if status != 0:
        err = process.stderr.read().decode() if process.stderr else ""
        raise RuntimeError(f"{' '.join(command)} failed ({status}):\n{err[-2000:]}")
    return wall, usage.ru_maxrss / 1024


def same_bits(ours: Path, theirs: Path) -> str:
    """ "identical/total" tensors, from compare_outputs.py in a child (reading both outputs here
    would raise this process's RSS, which every later child's ru_maxrss starts from)."""
    done = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("compare_outputs.py")), str(ours), str(theirs)],
        capture_output=True,
        text=True,
    )
    words = done.stdout.strip().splitlines()[-1].split() if done.stdout.strip() else []
    if len(words) < 5 or not words[0].isdigit() or not words[3].isdigit():
        return "?"
    same, differ = int(words[0]), int(words[3])
    return f"{same}/{same + differ}"


def weight_files(model: Path) -> list[Path]:
    return sorted(model.glob("*.safetensors"))


def floor_command(models: list[Path], out: Path) -> list[str]:
    """A child that reads all input weights once and writes one model's worth of bytes."""
    # Writes start their writeback as they go, as our writer's do (sync_file_range, through
    # ctypes so the floor imports nothing heavy): left to pile up, dirty pages get the writer
    # throttled and the floor would flatter every ratio against it.
    code = f"""
import ctypes, os
sync_range = ctypes.CDLL(None, use_errno=True).sync_file_range
sync_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
chunk = bytearray(64 << 20)
view = memoryview(chunk)
models = {[[str(f) for f in weight_files(m)] for m in models]!r}
with open({str(out)!r}, "wb") as sink:
    written = 0
    for i, files in enumerate(models):
        for name in files:
            with open(name, "rb", buffering=0) as source:
                while True:
                    n = source.readinto(chunk)
                    if not n:
                        break
                    if i == 0:
                        sink.write(view[:n])
                        sync_range(sink.fileno(), written, n, 2)
                        written += n
    os.fsync(sink.fileno())
"""
    return [sys.executable, "-c", code]


def warm(models: list[Path]) -> None:
    for model in models:
        for name in weight_files(model):
            with open(name, "rb", buffering=0) as handle:
                while handle.read(64 << 20):
                    pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="0.5b,1.1b")
    parser.add_argument("--methods", default="linear,ties,slerp")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--root", default="/tmp/mk-bench")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--mergekit", default=None, help="path to mergekit-yaml in its own venv")
    parser.add_argument("--device", default=None, help="run our merges on this device (e.g. cuda)")
    parser.add_argument(
        "--dtype",
        default="bfloat16",
        choices=["bfloat16", "float16", "float32"],
        help="the models' dtype and the recipes' (float32 families live under ROOT/SIZE-float32)",
    )
    args = parser.parse_args()

    root = Path(args.root)
    rows = []
    for size in args.sizes.split(","):
        family = root / (size if args.dtype == "bfloat16" else f"{size}-{args.dtype}")
        models = build_llama_family(family, size, 3, dtype=getattr(torch, args.dtype))
        warm(models)
        out = root / "out"
        runs: dict[str, list[tuple[float, float]]] = {}
        commands: dict[str, list[str]] = {"floor": floor_command(models, root / "floor.bin")}
        for method in args.methods.split(","):
            recipe = root / f"{method}.yml"
            layers = json.loads((models[0] / "config.json").read_text())["num_hidden_layers"]
            recipe.write_text(
                RECIPES[method].format(
                    m0=models[0], m1=models[1], m2=models[2], layers=layers, half=layers // 2, dtype=args.dtype
                )
            )
            command = [sys.executable, "-m", "mkmerge", str(recipe), str(out), "--overwrite", "--quiet"]
            if args.threads:
                command += ["--threads", str(args.threads)]
            if args.device:
                command += ["--device", args.device]
            commands[method] = command
            if args.mergekit:
                commands[f"{method} (mergekit)"] = [args.mergekit, str(recipe), str(out) + "-mk", "--lazy-unpickle"]
        identical: dict[str, str] = {}
        for repeat in range(args.repeat):
            for label, command in commands.items():
                mergekit = label.endswith(" (mergekit)")
                # No run pays for freeing an earlier output; ours stays until mergekit's is compared.
                shutil.rmtree(Path(str(out) + "-mk") if mergekit else out, ignore_errors=True)
                (root / "floor.bin").unlink(missing_ok=True)
                runs.setdefault(label, []).append(run_child(command))
                if mergekit and repeat == args.repeat - 1:
                    # ours ran just before: both outputs are on disk (compared outside the timing)
                    identical[label.removesuffix(" (mergekit)")] = same_bits(out, Path(str(out) + "-mk"))
                if mergekit:
                    shutil.rmtree(out, ignore_errors=True)
        floor = statistics.median(w for w, _ in runs["floor"])
        walls = {label: statistics.median(w for w, _ in samples) for label, samples in runs.items()}
        for label, samples in runs.items():
            rss = statistics.median(r for _, r in samples)
            theirs = walls.get(f"{label} (mergekit)")
            versus = f"{walls[label] / theirs:.2f}" if theirs else ""
            rows.append((size, label, walls[label], walls[label] / floor, rss, versus, identical.get(label, "")))
        (root / "floor.bin").unlink(missing_ok=True)

    print(
        f"\n{'size':6s} {'run':24s} {'wall s':>8s} {'x floor':>8s} {'peak RSS MB':>12s} {'x mergekit':>11s} {'same bits':>10s}"
    )
    for size, label, wall, ratio, rss, versus, same in rows:
        print(f"{size:6s} {label:24s} {wall:8.2f} {ratio:8.2f} {rss:12.0f} {versus:>11s} {same:>10s}")


if __name__ == "__main__":
    main()
