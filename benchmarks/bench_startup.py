"""Start-up cost of the command lines: how long help, --version and a recipe error take, and whether torch loads.

    python benchmarks/bench_startup.py            # a table, best of 5 runs each
    python benchmarks/bench_startup.py --runs 10

Each case runs in a fresh interpreter (as a user's shell does). Targets: help and --version
under 0.3 s, a recipe error that needs no tensor under 0.6 s; none of them should import torch.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROBE = (
    "import atexit, sys\n"
    "atexit.register(lambda: sys.stderr.write('\\nTORCH=%s\\n' % ('torch' in sys.modules)))\n"
    "sys.argv = [{tool!r}, *{args!r}]\n"
    "from {tool}.cli import main\n"
    "main()\n"
)


def cases(workdir: Path) -> list[tuple[str, str, list[str]]]:
    bad = {
        "unknown method": "merge_method: linar\nmodels:\n  - model: nowhere/a\n",
        "typo'd parameter": "merge_method: ties\nbase_model: b\nmodels:\n  - model: a\n    parameters: {densty: 0.5}\n",
        "negative density": "merge_method: ties\nbase_model: b\nmodels:\n  - model: a\n    parameters: {density: -1}\n",
        "bad field": "merge_method: linear\nmodels:\n  - model: a\ndtype: float33\n",
        "YAML syntax": "merge_method: [linear\nmodels:\n",
    }
    moe = workdir / "bad_moe.yml"
    moe.write_text("base_model: b\nexperts:\n  - source_modle: a\n")
    errors = []
    for index, (what, text) in enumerate(bad.items()):
        recipe = workdir / f"bad{index}.yml"
        recipe.write_text(text)
        errors.append((f"mkmerge (recipe error: {what})", "mkmerge", [str(recipe), str(workdir / "out")]))
    return [
        ("python (bare interpreter)", "", []),
        ("mkmerge --help", "mkmerge", ["--help"]),
        ("mkmerge --version", "mkmerge", ["--version"]),
        ("mkmerge plan --help", "mkmerge", ["plan", "--help"]),
        ("mkstack --help", "mkstack", ["--help"]),
        ("mkmoe --help", "mkmoe", ["--help"]),
        *errors,
        ("mkmoe (config error: misspelt field)", "mkmoe", [str(moe), str(workdir / "out")]),
        ("mkstack (recipe error: not passthrough)", "mkstack", [str(workdir / "bad0.yml"), str(workdir / "out")]),
    ]


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measure(tool: str, args: list[str], runs: int) -> tuple[float, float, bool | None]:
    """Best wall seconds, best CPU seconds (less sensitive to a busy machine), whether torch loaded."""
    code = PROBE.format(tool=tool, args=args) if tool else "pass"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    best, best_cpu, torch_loaded = float("inf"), float("inf"), None
    for _ in range(runs):
        started, cpu = time.perf_counter(), _children_cpu()
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
        best = min(best, time.perf_counter() - started)
        best_cpu = min(best_cpu, _children_cpu() - cpu)
        if tool:
            torch_loaded = "TORCH=True" in done.stderr
    return best, best_cpu, torch_loaded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="runs per case; the best is reported")
    runs = parser.parse_args().runs
    with tempfile.TemporaryDirectory() as tmp:
        rows = [(name, *measure(tool, args, runs)) for name, tool, args in cases(Path(tmp))]
    width = max(len(name) for name, *_ in rows)
    print(f"{'command':<{width}}  wall s   CPU s  imports torch")
    for name, seconds, cpu, torch_loaded in rows:
        loaded = "-" if torch_loaded is None else "yes" if torch_loaded else "no"
        print(f"{name:<{width}}  {seconds:6.3f}  {cpu:6.3f}  {loaded}")


if __name__ == "__main__":
    main()
