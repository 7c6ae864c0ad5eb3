#!/usr/bin/env bash
# Lint and format check (run by scripts/test.sh before the tests).
set -euo pipefail
cd "$(dirname "$0")/.."
ruff check .
ruff format --check .
