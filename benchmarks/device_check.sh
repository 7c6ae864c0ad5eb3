#!/usr/bin/env bash
# The GPU machine's check, in under 8 minutes on one H200 with 16 cores: the CUDA tests, then
# the 1.1B bf16 family built and merged by us on the CPU, by us on CUDA and by mergekit 0.1.5
# with --cuda, the table printed cell by cell as each run ends (a run cut short still shows
# what it did).
#
# That machine has no package index. What it needs beyond torch and transformers (mergekit
# 0.1.5, pydantic, peft, accelerate, immutables, numba, ...) is installed from wheels placed
# beside this script in benchmarks/wheels/: fetch them first, where an index is reachable, with
#     bash benchmarks/download_wheels.sh
# Only wheels of distributions not installed already are installed, into a venv over the system
# packages (/tmp/mk-device-venv), so the machine's own CUDA torch stays in use.
#
#     bash benchmarks/device_check.sh [--tiny] [--cpu-only] [--size 1.1b] [--skip-tests]
# --tiny --cpu-only: the same steps on a toy family, our CPU column only (no GPU needed).
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(dirname "$here")"
cd "$repo"
tiny=() cpu_only=() size=(--size 1.1b) skip_tests=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        --tiny) tiny=(--tiny) ;;
        --cpu-only) cpu_only=(--cpu-only) ;;
        --size) size=(--size "$2"); shift ;;
        --skip-tests) skip_tests=1 ;;
        *) echo "unknown option $1" >&2; exit 2 ;;
    esac
    shift
done
started=$SECONDS
say() { echo "[device_check $((SECONDS - started))s] $*"; }

venv=/tmp/mk-device-venv
say "venv $venv over the system packages"
python3 -m venv --system-site-packages "$venv" || exit 1
py="$venv/bin/python"
if [[ -d "$here/wheels" ]]; then
    missing=$("$py" - "$here/wheels" <<'PY'
import importlib.metadata as md, pathlib, re, sys
for wheel in sorted(pathlib.Path(sys.argv[1]).glob("*.whl")):
    name = re.sub(r"[-_.]+", "-", wheel.name.split("-")[0]).lower()
    try:
        md.version(name)
    except md.PackageNotFoundError:
        print(wheel)
PY
)
    if [[ -n "$missing" ]]; then
        say "installing from benchmarks/wheels: $(echo "$missing" | xargs -n1 basename | tr '\n' ' ')"
        # shellcheck disable=SC2086
        "$py" -m pip install -q --no-index --no-deps $missing || say "some wheels did not install"
    fi
else
    say "no benchmarks/wheels/ (run benchmarks/download_wheels.sh where an index is reachable)"
fi
"$py" -m pip install -q --no-deps --no-build-isolation -e . || exit 1
"$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"

if [[ $skip_tests -eq 0 && ${#cpu_only[@]} -eq 0 ]]; then
    say "CUDA tests"
    HF_HUB_OFFLINE=1 timeout 200 "$py" -m pytest tests/engine/test_cuda.py tests/engine/test_device_reads.py \
        tests/merge/test_linear_device_form.py -p no:cacheprovider -q || say "CUDA tests failed (see above)"
fi

mergekit=()
if [[ ${#cpu_only[@]} -eq 0 ]]; then
    if [[ -x "$venv/bin/mergekit-yaml" ]] && "$venv/bin/mergekit-yaml" --help >/dev/null 2>&1; then
        mergekit=(--mergekit "$venv/bin/mergekit-yaml")
    else
        say "mergekit-yaml does not run here: its column is left out"
    fi
fi
say "table"
HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 "$py" benchmarks/device_table.py "${size[@]}" "${tiny[@]}" "${cpu_only[@]}" \
    "${mergekit[@]}" --root /tmp/mk-bench
say "done"
