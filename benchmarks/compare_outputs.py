"""Compare two merged models tensor by tensor: are they the same bits?

    python benchmarks/compare_outputs.py OURS THEIRS

Reads one tensor at a time from each directory's safetensors files (sharded or not) and prints
one line per tensor that differs (elements that differ, largest absolute difference) and a
summary. Exit status 0 when every tensor is present in both with the same dtype, shape and bits.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors import safe_open


def tensor_index(directory: Path) -> dict[str, Path]:
    index = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), "pt") as handle:
            for name in handle.keys():
                index[name] = file
    return index


def read(file: Path, name: str) -> torch.Tensor:
    with safe_open(str(file), "pt") as handle:
        return handle.get_tensor(name)


def compare(ours: Path, theirs: Path, report=print) -> tuple[int, int]:
    """(tensors bit-identical, tensors that differ or are missing); ``report`` gets one line each."""
    a, b = tensor_index(ours), tensor_index(theirs)
    problems = 0
    for name in sorted(set(a) ^ set(b)):
        report(f"{name}: only in {ours if name in a else theirs}")
        problems += 1
    same = 0
    for name in sorted(set(a) & set(b)):
        x, y = read(a[name], name), read(b[name], name)
        if x.dtype != y.dtype or x.shape != y.shape:
            report(f"{name}: {x.dtype} {list(x.shape)} vs {y.dtype} {list(y.shape)}")
            problems += 1
            continue
        width = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()]
        differ = x.view(width) != y.view(width)
        count = int(differ.sum())
        if count:
            gap = (x.double() - y.double()).abs().max().item()
            report(f"{name}: {count} of {x.numel()} elements differ (largest difference {gap:.3g})")
            problems += 1
        else:
            same += 1
    return same, problems


def main() -> int:
    ours, theirs = (Path(arg) for arg in sys.argv[1:3])
    same, problems = compare(ours, theirs)
    print(f"{same} tensors bit-identical, {problems} differ or are missing")
    return 0 if problems == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
