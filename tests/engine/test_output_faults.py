"""Faults from the environment while writing: full disks, long names, read-only places, signals.

Each is one clear error (exit 8 for the output location, 128+signal for a signal), no
traceback, and nothing left behind: no OUT, no hidden partial directory.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mkmerge.cli import merge_app

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def recipe(tiny_family, tmp_path) -> Path:
    base, (ft, _) = tiny_family("llama")
    path = tmp_path / "r.yml"
    path.write_text(
        f"merge_method: linear\nmodels:\n  - model: {base}\n    parameters: {{weight: 0.3}}\n"
        f"  - model: {ft}\n    parameters: {{weight: 0.7}}\ndtype: float32\n"
    )
    return path


def mkmerge(*args):
    return CliRunner().invoke(merge_app, [*map(str, args), "--quiet"])


def assert_clean_failure(result, code: int, *fragments: str, parent: Path) -> None:
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output and "a bug in mksuite" not in result.output
    for fragment in fragments:
        assert fragment in result.output, result.output
    assert not [p.name for p in parent.iterdir() if "partial" in p.name or p.name == "merged"]


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MB tmpfs (skipped where mounting is not permitted)."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip() or done.returncode}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.fixture
def big_recipe(tiny_family, tmp_path) -> Path:
    """A merge whose output (about 6 MB) does not fit the small disk."""
    base, (ft,) = tiny_family("llama", n_finetunes=1, hidden=256, layers=2)
    path = tmp_path / "big.yml"
    path.write_text(f"merge_method: linear\nmodels:\n  - model: {base}\n  - model: {ft}\nparameters: {{weight: 0.5}}\n")
    return path


def test_output_that_cannot_fit_is_refused_before_writing(big_recipe, small_disk, no_tensor_reads):
    result = mkmerge(big_recipe, small_disk / "merged")
    assert_clean_failure(result, 8, "needs", "free", parent=small_disk)


def test_disk_filling_up_midway_is_one_clear_error(big_recipe, small_disk, monkeypatch):
    import mksuite.common.build as build

    monkeypatch.setattr(build, "check_free_space", lambda *args: None)  # let the real ENOSPC happen
    result = mkmerge(big_recipe, small_disk / "merged")
    assert_clean_failure(result, 8, "no space left on the device", parent=small_disk)
    assert list(small_disk.iterdir()) == []


def test_enospc_from_the_writer_midway_removes_the_partial(recipe, tmp_path, monkeypatch):
    import mksuite.common.writing.safetensors_writer as writer

    real, calls = writer._pwrite_all, []

    def fill_up(fd, data, offset):
        calls.append(offset)
        if len(calls) == 6:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd, data, offset)

    monkeypatch.setattr(writer, "_pwrite_all", fill_up)
    result = mkmerge(recipe, tmp_path / "merged")
    assert_clean_failure(result, 8, "no space left on the device", parent=tmp_path)


def test_read_only_file_system(recipe, tmp_path):
    mount = tmp_path / "ro"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        result = mkmerge(recipe, mount / "merged")
        assert_clean_failure(result, 8, "read-only file system", parent=mount)
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.parametrize("length", [300, 250])
def test_name_too_long_for_the_file_system(recipe, tmp_path, length, no_tensor_reads):
    # 250 fits the file system, but the partial directory's longer name would not.
    result = mkmerge(recipe, tmp_path / ("m" * length))
    assert_clean_failure(result, 8, "too long", parent=tmp_path)


def test_output_under_a_file(recipe, tmp_path):
    (tmp_path / "file").write_text("x")
    result = mkmerge(recipe, tmp_path / "file" / "merged")
    assert_clean_failure(result, 8, "not a directory", parent=tmp_path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_permission_denied(recipe, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    result = mkmerge(recipe, locked / "merged")
    assert_clean_failure(result, 8, "permission denied", parent=locked)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_termination_signals_clean_up_like_ctrl_c(recipe, tmp_path, signum):
    ready = tmp_path / "midway"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MKSUITE_TEST_PAUSE_AFTER": f"3:{ready}"}
    process = subprocess.Popen(
        [sys.executable, "-m", "mkmerge", str(recipe), str(tmp_path / "merged"), "--quiet"],
        cwd=REPO_ROOT,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not ready.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ready.exists(), process.communicate()[1]
    assert [p for p in tmp_path.iterdir() if ".partial-" in p.name]  # midway: the partial exists now
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signum, stderr
    assert f"terminated by {signal.Signals(signum).name}" in stderr
    assert "Traceback" not in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["midway", "r.yml"]
