#!/usr/bin/env bash
# Install mksuite with its test extras (CPU torch first, from the local wheel) and run the suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet "torch==2.13.0"
python -m pip install --quiet -e ".[test]"
bash scripts/lint.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
python -m pytest tests -p no:cacheprovider "$@"
