"""Cost of resuming a merge killed at ~90% against a full run (target: resume <= 25%).

    python benchmarks/bench_resume.py ROOT [--size 0.5b] [--method ties] [--at 0.9]

Uses the random Llama-shaped families of ``model_family.py`` (built once under ROOT). Runs
the merge once uninterrupted (timed), then again with the writer's test hook killing it with
SIGKILL after the given fraction of tensors is journaled, then the same command once more
(timed): that resume computes only the rest. The resumed weights are checked byte-identical
to the full run's. Each run is a child process; wall time includes interpreter start-up.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from model_family import build_llama_family


def recipe_text(method: str, base: Path, models: list[Path]) -> str:
    entries = "".join(f"  - model: {m}\n    parameters: {{weight: 0.5, density: 0.5}}\n" for m in models)
    return f"merge_method: {method}\nbase_model: {base}\nmodels:\n{entries}dtype: bfloat16\n"


def run(recipe: Path, out: Path, env_extra: dict[str, str] | None = None) -> tuple[float, int]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "mkmerge", str(recipe), str(out), "--quiet"], env=env)
    return time.perf_counter() - started, done.returncode


def digest(directory: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(directory.glob("*.safetensors*")):
        h.update(path.name.encode())
        with open(path, "rb") as handle:
            while chunk := handle.read(64 << 20):
                h.update(chunk)
    return h.hexdigest()


def tensor_count(directory: Path) -> int:
    index = directory / "model.safetensors.index.json"
    if index.exists():
        return len(json.loads(index.read_text())["weight_map"])
    from safetensors import safe_open

    with safe_open(str(directory / "model.safetensors"), "pt") as handle:
        return len(list(handle.keys()))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("--size", default="0.5b")
    parser.add_argument("--method", default="ties")
    parser.add_argument("--at", type=float, default=0.9, help="fraction of tensors done when killed")
    args = parser.parse_args()
    base, *models = build_llama_family(args.root, args.size, 3)
    recipe = args.root / f"resume-{args.method}.yml"
    recipe.write_text(recipe_text(args.method, base, models))
    full_out, resumed_out = args.root / "resume-full", args.root / "resume-resumed"
    for path in (full_out, resumed_out):
        shutil.rmtree(path, ignore_errors=True)
    full_seconds, code = run(recipe, full_out)
    assert code == 0, "the full run failed"
    kill_after = max(1, int(tensor_count(full_out) * args.at))
    _, code = run(recipe, resumed_out, {"MKSUITE_TEST_KILL_AFTER": str(kill_after)})
    assert code == -9, f"the run to be killed exited {code}"
    resume_seconds, code = run(recipe, resumed_out)
    assert code == 0, "the resumed run failed"
    identical = digest(full_out) == digest(resumed_out)
    print(
        f"{args.size} {args.method}: full {full_seconds:.1f} s; killed after {kill_after} tensors; "
        f"resume {resume_seconds:.1f} s = {100 * resume_seconds / full_seconds:.0f}% of full; "
        f"byte-identical: {identical}"
    )
    return 0 if identical else 1


if __name__ == "__main__":
    raise SystemExit(main())
