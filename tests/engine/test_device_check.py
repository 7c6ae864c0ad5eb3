"""benchmarks/device_check.sh: it parses, and its Python part runs on the CPU with a toy family."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.mark.parametrize("script", ["device_check.sh", "download_wheels.sh"])
def test_the_scripts_parse(script):
    done = subprocess.run(["bash", "-n", str(BENCHMARKS / script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_the_table_runs_on_a_toy_family_on_the_cpu(tmp_path):
    command = [sys.executable, str(BENCHMARKS / "device_table.py"), "--tiny", "--cpu-only", "--methods", "linear,ties",
               "--threads", "2", "--root", str(tmp_path)]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert "| merge | ours cpu |" in lines
    rows = [line for line in lines if line.startswith(("| linear |", "| ties |"))]
    assert len(rows) == 2
    assert all("x, " in row and "failed" not in row for row in rows)  # "wall s (x floor, RSS)"
    assert not list(tmp_path.glob("out-*"))  # outputs are removed after each row
