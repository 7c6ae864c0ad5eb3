"""Start-up cost of the command lines: how long help, --version and a recipe error take, and whether torch loads.

    python benchmarks/bench_startup.py            # a table, best of 5 runs each
    python benchmarks/bench_startup.py --runs 10

Each case runs in a fresh interpreter (as a user's shell does). Targets: help and --version
under 0.3 s, a recipe error that needs no tensor under 0.6 s; none of them should import torch.
"""

from __future__ import annotations

import argparse
import os
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
    bad = workdir / "bad.yml"
    bad.write_text("merge_method: linar\nmodels:\n  - model: nowhere/a\n")
    return [
        ("python (bare interpreter)", "", []),
        ("mkmerge --help", "mkmerge", ["--help"]),
        ("mkmerge --version", "mkmerge", ["--version"]),
        ("mkmerge plan --help", "mkmerge", ["plan", "--help"]),
        ("mkstack --help", "mkstack", ["--help"]),
        ("mkmoe --help", "mkmoe", ["--help"]),
        ("mkmerge (recipe error)", "mkmerge", [str(bad), str(workdir / "out")]),
    ]


def measure(tool: str, args: list[str], runs: int) -> tuple[float, bool | None]:
    code = PROBE.format(tool=tool, args=args) if tool else "pass"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    best, torch_loaded = float("inf"), None
    for _ in range(runs):
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
        best = min(best, time.perf_counter() - started)
        if tool:
            torch_loaded = "TORCH=True" in done.stderr
    return best, torch_loaded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="runs per case; the best is reported")
    runs = parser.parse_args().runs
    with tempfile.TemporaryDirectory() as tmp:
        rows = [(name, *measure(tool, args, runs)) for name, tool, args in cases(Path(tmp))]
    width = max(len(name) for name, *_ in rows)
    print(f"{'command':<{width}}  seconds  imports torch")
    for name, seconds, torch_loaded in rows:
        loaded = "-" if torch_loaded is None else "yes" if torch_loaded else "no"
        print(f"{name:<{width}}  {seconds:7.3f}  {loaded}")


if __name__ == "__main__":
    main()
