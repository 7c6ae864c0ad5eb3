#!/usr/bin/env bash
# Install mksuite, build three tiny local Llama models (a base and two fine-tunes), merge them
# with TIES and SLERP, and load the results with transformers. Nothing is downloaded but pip packages.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet "torch==2.13.0"
python -m pip install --quiet -e ".[test]"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
python examples/demo.py "${1:-demo-out}"
