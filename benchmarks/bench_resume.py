"""Cost of resuming a merge killed at ~90% against a full run (target: resume <= 25%).

    python benchmarks/bench_resume.py ROOT [--size 0.5b] [--method ties] [--at 0.9] [--by bytes]

Uses the random Llama-shaped families of ``model_family.py`` (built once under ROOT). Runs
the merge once uninterrupted (timed), then again with the writer's test hook killing it with
SIGKILL once the given fraction of the work is journaled, then the same command once more
(timed): that resume computes only the rest. ``--by bytes`` (default) measures the fraction
in output bytes, as the progress bar's percentage does; ``--by tensors`` in tensors (the
last 10% of a Llama's tensors hold ~17% of its bytes: the LM head comes last). Last, a run
killed after every tensor was journaled is resumed: it computes nothing, so its time is the
fixed cost every run pays (start-up, imports, planning, the output's side files).

The resumed weights are checked byte-identical to the full run's. Each run is a child
process; wall time includes interpreter start-up. CPU seconds (user + system, all threads)
are printed too: on a shared machine they move less with other processes' load than wall
time does.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from model_family import build_llama_family


def recipe_text(method: str, base: Path, models: list[Path]) -> str:
    if method == "linear":  # no base model: all three are averaged
        entries = "".join(f"  - model: {m}\n    parameters: {{weight: 1.0}}\n" for m in (base, *models))
        return f"merge_method: linear\nmodels:\n{entries}dtype: bfloat16\n"
    entries = "".join(f"  - model: {m}\n    parameters: {{weight: 0.5, density: 0.5}}\n" for m in models)
    return f"merge_method: {method}\nbase_model: {base}\nmodels:\n{entries}dtype: bfloat16\n"


@dataclass(frozen=True)
class Timed:
    wall: float
    cpu: float  # user + system seconds of the child, all its threads
    code: int


def run(recipe: Path, out: Path, env_extra: dict[str, str] | None = None) -> Timed:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "mkmerge", str(recipe), str(out), "--quiet"], env=env)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return Timed(wall, cpu, done.returncode)


def planned_bytes(recipe: Path) -> list[int]:
    """Each output tensor's bytes, in the order the run computes and journals them (plan
    order, tensors merged in many row blocks first: mksuite.common.build.compute_order)."""
    from mksuite.common.build import front_loaded

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    shown = subprocess.run(
        [sys.executable, "-m", "mkmerge", "plan", str(recipe), "--json"], env=env, capture_output=True, text=True
    )
    assert shown.returncode == 0, shown.stderr
    tensors = json.loads(shown.stdout)["tensors"]
    first = front_loaded({t["name"]: t.get("row_blocks") or 1 for t in tensors})
    tensors.sort(key=lambda t: t["name"] not in first)
    return [tensor["bytes"] for tensor in tensors]


def kill_point(sizes: list[int], at: float, by: str) -> int:
    """How many tensors are journaled when ``at`` of the work (in tensors or bytes) is done."""
    if by == "tensors":
        return max(1, int(len(sizes) * at))
    total, done = sum(sizes), 0
    for count, size in enumerate(sizes, start=1):
        done += size
        if done >= at * total:
            return count
    return len(sizes)


def killed_then_resumed(recipe: Path, out: Path, after: int) -> Timed:
    shutil.rmtree(out, ignore_errors=True)
    killed = run(recipe, out, {"MKSUITE_TEST_KILL_AFTER": str(after)})
    assert killed.code == -9, f"the run to be killed exited {killed.code}"
    resumed = run(recipe, out)
    assert resumed.code == 0, "the resumed run failed"
    return resumed


def digest(directory: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(directory.glob("*.safetensors*")):
        h.update(path.name.encode())
        with open(path, "rb") as handle:
            while chunk := handle.read(64 << 20):
                h.update(chunk)
    return h.hexdigest()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("--size", default="0.5b")
    parser.add_argument("--method", default="ties")
    parser.add_argument("--at", type=float, default=0.9, help="fraction of the work done when killed")
    parser.add_argument("--by", choices=("bytes", "tensors"), default="bytes", help="what --at counts")
    args = parser.parse_args()
    base, *models = build_llama_family(args.root, args.size, 3)
    recipe = args.root / f"resume-{args.method}.yml"
    recipe.write_text(recipe_text(args.method, base, models))
    full_out, resumed_out = args.root / "resume-full", args.root / "resume-resumed"
    shutil.rmtree(full_out, ignore_errors=True)
    full = run(recipe, full_out)
    assert full.code == 0, "the full run failed"
    sizes = planned_bytes(recipe)
    after = kill_point(sizes, args.at, args.by)
    resumed = killed_then_resumed(recipe, resumed_out, after)
    identical = digest(full_out) == digest(resumed_out)
    fixed = killed_then_resumed(recipe, resumed_out, len(sizes))
    identical = identical and digest(full_out) == digest(resumed_out)
    left = 1 - sum(sizes[:after]) / sum(sizes)
    print(
        f"{args.size} {args.method}: killed after {after} of {len(sizes)} tensors ({args.at:.0%} of the {args.by}), "
        f"{left:.1%} of the bytes left\n"
        f"  full    {full.wall:6.1f} s wall {full.cpu:6.1f} s CPU\n"
        f"  resume  {resumed.wall:6.1f} s wall {resumed.cpu:6.1f} s CPU = "
        f"{resumed.wall / full.wall:.0%} / {resumed.cpu / full.cpu:.0%} of full\n"
        f"  fixed   {fixed.wall:6.1f} s wall {fixed.cpu:6.1f} s CPU (resume with nothing left)\n"
        f"  byte-identical: {identical}"
    )
    return 0 if identical else 1


if __name__ == "__main__":
    raise SystemExit(main())
