"""Run the same recipes through mergekit and mkmerge and compare the outputs bit for bit.

    python scripts/compare_mergekit.py --mergekit /path/to/venv/bin/mergekit-yaml [--root DIR] [-k ties]

Builds tiny Llama families (a base and three fine-tunes, float32 and bfloat16), writes one
recipe per method, dtype and option, runs both tools on each and prints a table: tensors
bitwise equal, the largest absolute difference, and dtype mismatches. mergekit is only run,
as a black box; nothing here imports it. Random methods (DARE, DELLA) draw different numbers in
the two tools, so they are left out.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

DTYPES = ("float32", "bfloat16")


def recipes(models: dict[str, Path]) -> dict[str, str]:
    """Recipe name -> YAML text, for one dtype's family (``base``, ``ft1``..``ft3``)."""
    base, ft1, ft2, ft3 = (models[k] for k in ("base", "ft1", "ft2", "ft3"))

    def listing(*entries: tuple[Path, str]) -> str:
        return "".join(f"  - model: {m}\n" + (f"    parameters: {{{p}}}\n" if p else "") for m, p in entries)

    three = ((ft1, "weight: 0.5, density: 0.6"), (ft2, "weight: 0.3, density: 0.4"), (ft3, "weight: 0.4, density: 0.8"))
    out = {
        "linear": "merge_method: linear\nmodels:\n"
        + listing((ft1, "weight: 0.6"), (ft2, "weight: 0.3"), (ft3, "weight: 0.1")),
        "linear_nonorm": "merge_method: linear\nparameters: {normalize: false}\nmodels:\n"
        + listing((ft1, "weight: 0.6"), (ft2, "weight: 0.7")),
        "slerp": f"merge_method: slerp\nbase_model: {base}\nparameters: {{t: 0.3}}\nmodels:\n"
        + listing((base, ""), (ft1, "")),
        "slerp_gradient": f"merge_method: slerp\nbase_model: {base}\nparameters:\n  t:\n    - filter: self_attn\n"
        "      value: [0, 0.5, 0.3, 0.7, 1]\n    - value: 0.5\nmodels:\n" + listing((base, ""), (ft2, "")),
        "nuslerp": "merge_method: nuslerp\nmodels:\n" + listing((ft1, "weight: 0.7"), (ft2, "weight: 0.3")),
        "nuslerp_base": f"merge_method: nuslerp\nbase_model: {base}\nmodels:\n"
        + listing((ft1, "weight: 0.5"), (ft2, "weight: 0.5")),
        "multislerp": "merge_method: multislerp\nmodels:\n"
        + listing((ft1, "weight: 0.5"), (ft2, "weight: 0.3"), (ft3, "weight: 0.2")),
        "multislerp_base": f"merge_method: multislerp\nbase_model: {base}\nparameters: {{normalize_weights: false}}\n"
        "models:\n" + listing((ft1, "weight: 0.5"), (ft2, "weight: 0.3"), (ft3, "weight: 0.2")),
        "karcher": "merge_method: karcher\nmodels:\n" + listing((ft1, ""), (ft2, ""), (ft3, "")),
        "karcher_iter": "merge_method: karcher\nparameters: {max_iter: 3, tol: 1e-3}\nmodels:\n"
        + listing((ft1, ""), (ft2, "")),
        "task_arithmetic": f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n" + listing(*three),
        "ties": f"merge_method: ties\nbase_model: {base}\nmodels:\n" + listing(*three),
        "ties_nonorm": f"merge_method: ties\nbase_model: {base}\nparameters: {{normalize: false}}\nmodels:\n"
        + listing(*three),
        "ties_rescale": f"merge_method: ties\nbase_model: {base}\nparameters: {{rescale: true}}\nmodels:\n"
        + listing(*three),
        "ties_int8": f"merge_method: ties\nbase_model: {base}\nparameters: {{int8_mask: true}}\nmodels:\n"
        + listing(*three),
        "breadcrumbs": f"merge_method: breadcrumbs\nbase_model: {base}\nmodels:\n" + listing(*three),
        "breadcrumbs_ties": f"merge_method: breadcrumbs_ties\nbase_model: {base}\nmodels:\n" + listing(*three),
        "sce": f"merge_method: sce\nbase_model: {base}\nparameters: {{select_topk: 0.5}}\nmodels:\n"
        + listing((ft1, "weight: 1.0"), (ft2, "weight: 1.0"), (ft3, "weight: 1.0")),
        "model_stock": f"merge_method: model_stock\nbase_model: {base}\nmodels:\n"
        + listing((ft1, ""), (ft2, ""), (ft3, "")),
        "arcee_fusion": f"merge_method: arcee_fusion\nbase_model: {base}\nmodels:\n" + listing((base, ""), (ft1, "")),
        "nearswap": f"merge_method: nearswap\nbase_model: {base}\nparameters: {{t: 0.001}}\nmodels:\n"
        + listing((base, ""), (ft1, "")),
        "passthrough": "merge_method: passthrough\nmodels:\n" + listing((ft2, "")),
        "stack": "merge_method: passthrough\nslices:\n"
        f"  - sources:\n      - model: {ft1}\n        layer_range: [0, 2]\n"
        f"  - sources:\n      - model: {ft2}\n        layer_range: [1, 2]\n",
    }
    return out


def build_families(root: Path) -> dict[str, dict[str, Path]]:
    from tiny_models import build_family

    families = {}
    for name in DTYPES:
        folder = root / "models" / name
        if not (folder / "ft3" / "config.json").exists():
            shutil.rmtree(folder, ignore_errors=True)
            build_family("llama", folder, n_finetunes=3, dtype=getattr(torch, name), hidden=64, layers=2, perturb=0.05)
        families[name] = {p.name: p for p in folder.iterdir()}
    return families


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    found: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        found.update(load_file(file))
    return found


def compare(theirs: Path, ours: Path) -> tuple[str, str, str]:
    a, b = tensors(theirs), tensors(ours)
    equal, worst, dtypes = 0, 0.0, set()
    for key, x in a.items():
        y = b.get(key)
        if y is None or x.shape != y.shape:
            continue
        if x.dtype != y.dtype:
            dtypes.add(f"{x.dtype}/{y.dtype}".replace("torch.", ""))
        if x.dtype == y.dtype and torch.equal(x, y):
            equal += 1
        else:
            worst = max(worst, float((x.float() - y.float()).abs().max()))
    missing = len(set(a) ^ set(b))
    note = ", ".join(sorted(dtypes)) + (f"{missing} names differ" if missing else "")
    return f"{equal}/{len(a)}", f"{worst:.3g}", note


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mergekit", required=True, help="path to mergekit-yaml")
    parser.add_argument("--root", default="/tmp/compare-mergekit", help="where models and outputs go")
    parser.add_argument("-k", default="", help="only recipes whose name contains this")
    parser.add_argument("--precise", action="store_true", help="run mkmerge with --precise")
    args = parser.parse_args()
    root = Path(args.root)
    families = build_families(root)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    print("| recipe | dtype | equal tensors | max abs diff | note |\n|---|---|---|---|---|")
    for dtype, models in families.items():
        for name, body in recipes(models).items():
            if args.k not in name:
                continue
            work = root / "runs" / f"{name}-{dtype}"
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
            recipe = work / "recipe.yml"
            recipe.write_text(body + f"dtype: {dtype}\n")
            theirs = subprocess.run(
                [args.mergekit, str(recipe), str(work / "mk"), "--allow-crimes"],
                capture_output=True,
                text=True,
                env=env,
            )
            ours_cmd = ["mkmerge", str(recipe), str(work / "ours"), "--quiet", "--allow-crimes"]
            ours = subprocess.run(
                ours_cmd + (["--precise"] if args.precise else []), capture_output=True, text=True, env=env
            )
            if theirs.returncode or ours.returncode:
                failed = "mergekit" if theirs.returncode else "mkmerge"
                detail = (theirs if theirs.returncode else ours).stderr.strip().splitlines()[-1:] or [""]
                print(f"| {name} | {dtype} | - | - | {failed} failed: {detail[0][:80]} |")
                continue
            equal, worst, note = compare(work / "mk", work / "ours")
            print(f"| {name} | {dtype} | {equal} | {worst} | {note} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
