#!/usr/bin/env bash
# Download, on a machine with a package index, the wheels device_check.sh installs on the GPU
# machine (which has none): mergekit 0.1.5 and what its merges import beyond torch and
# transformers, and our own dependencies that a bare torch image may lack. They land in
# benchmarks/wheels/ (gitignored); copy that folder along with the checkout.
#
#     bash benchmarks/download_wheels.sh [PYTHON_VERSION]   # e.g. 3.11, default: this python's
#
# torch and transformers are never downloaded: the GPU machine's own (CUDA) builds are used.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
wheels="$here/wheels"
mkdir -p "$wheels"
target=()
if [[ $# -ge 1 ]]; then
    target=(--python-version "$1" --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64
            --only-binary=:all:)
fi
# Without their dependencies: each of these would pull torch or transformers in.
pip download --no-deps -d "$wheels" "${target[@]}" mergekit==0.1.5 peft accelerate
# With their dependencies: small, and their versions must agree (pydantic and pydantic-core).
pip download -d "$wheels" "${target[@]}" immutables networkx psutil packaging pydantic numba \
    typer rich pyyaml tqdm click sentencepiece safetensors huggingface_hub
ls "$wheels"
