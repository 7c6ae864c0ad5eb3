"""Run every example recipe and record, or compare, what each run writes: a refactor's safety net.

    python scripts/check_outputs.py record manifest.json [--work DIR]
    python scripts/check_outputs.py compare manifest.json [--work DIR]

Builds the demo's tiny models (examples/demo.py) under DIR/models once, runs each recipe in
examples/ the way the demo does (mkmerge, mkstack for stack_*, mkmoe for examples/moe/, the
multi-stage recipes), and hashes every output tensor (dtype, shape, bytes) and every other
output file. ``compare`` prints each difference and exits 1 when any tensor, config.json or
tokenizer file differs; other files (the model card, the recipe copy) are reported, not failed
on, since their text may change on purpose.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
WEIGHTS_MUST_MATCH = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def runs() -> list[tuple[str, Path]]:
    found = [("mkstack" if r.stem.startswith("stack_") else "mkmerge", r) for r in sorted(EXAMPLES.glob("*.yml"))]
    found += [("mkmoe", r) for r in sorted((EXAMPLES / "moe").glob("*.yml"))]
    found += [("mkmerge", r) for r in sorted((EXAMPLES / "multistage").glob("*.yml"))]
    return found


def tensor_hashes(file: Path) -> dict[str, str]:
    """sha256 of each tensor's bytes, with its dtype and shape, read straight from the file."""
    data = file.read_bytes()
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + header_len])
    base = 8 + header_len
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        digest = hashlib.sha256(data[base + start : base + end]).hexdigest()
        out[name] = f"{info['dtype']} {info['shape']} {digest}"
    return out


def hash_output(out: Path) -> dict[str, dict[str, str]]:
    tensors: dict[str, str] = {}
    files: dict[str, str] = {}
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        rel = str(path.relative_to(out))
        if path.suffix == ".safetensors":
            tensors.update(tensor_hashes(path))
        elif rel.endswith(".index.json"):
            continue  # shard layout, not content; the tensors are compared by name
        else:
            files[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return {"tensors": tensors, "files": files}


def build(work: Path) -> dict[str, dict]:
    if not (work / "models" / "ft-chat" / "config.json").exists():
        sys.path.insert(0, str(EXAMPLES))
        from demo import build_models

        build_models(work / "models")
    results = {}
    for tool, recipe in runs():
        out = work / f"merged-{recipe.stem}"
        cmd = [sys.executable, "-m", tool, str(recipe), str(out), "--overwrite", "--quiet"]
        done = subprocess.run(cmd, cwd=work, capture_output=True, text=True)
        key = f"{tool} {recipe.relative_to(EXAMPLES)}"
        if done.returncode != 0:
            results[key] = {"exit": done.returncode, "stderr": done.stderr[-2000:]}
        else:
            results[key] = {"exit": 0, **hash_output(out)}
        print(f"{key}: exit {done.returncode}", flush=True)
    return results


def compare(old: dict, new: dict) -> int:
    failures = 0
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if a is None or b is None:
            print(f"{key}: only in {'the manifest' if b is None else 'this run'}")
            failures += 1
            continue
        if a["exit"] != b["exit"]:
            print(f"{key}: exit {a['exit']} before, {b['exit']} now {b.get('stderr', '')}")
            failures += 1
            continue
        if a["exit"]:
            continue
        for name in sorted(set(a["tensors"]) | set(b["tensors"])):
            if a["tensors"].get(name) != b["tensors"].get(name):
                print(f"{key}: tensor {name}: {a['tensors'].get(name)} -> {b['tensors'].get(name)}")
                failures += 1
        for name in sorted(set(a["files"]) | set(b["files"])):
            if a["files"].get(name) != b["files"].get(name):
                strict = name in WEIGHTS_MUST_MATCH
                print(f"{key}: file {name} {'DIFFERS' if strict else 'differs (not checked)'}")
                failures += strict
    print(f"{len(new)} runs compared, {failures} differences that matter")
    return 1 if failures else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["record", "compare"])
    parser.add_argument("manifest", type=Path)
    parser.add_argument("--work", type=Path, default=Path("/tmp/mksuite-check-outputs"))
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    results = build(args.work.absolute())
    if args.action == "record":
        args.manifest.write_text(json.dumps(results, indent=1, sort_keys=True))
        return 0
    return compare(json.loads(args.manifest.read_text()), results)


if __name__ == "__main__":
    sys.exit(main())
