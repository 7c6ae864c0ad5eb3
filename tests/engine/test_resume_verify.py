"""A killed run resumes where it stopped (byte-identical output); a stale partial is removed and
said so, one not provably ours is left alone; --verify re-reads the output and catches a
flipped byte (exit 9)."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from mkmerge.cli import merge_app
from mkmoe.cli import app as moe_app
from mkstack.cli import stack_app
from mksuite.common.errors import VerifyError
from mksuite.common.loading import TensorInfo
from mksuite.common.writing import ShardedWriter, plan_shards
from mksuite.common.writing.output_dir import MARKER_FILE
from mksuite.common.writing.verify import verify_output

from tiny_models import copy_model

REPO_ROOT = Path(__file__).resolve().parents[2]


def recipe_text(base, ft, weight=0.3) -> str:
    return (
        f"merge_method: ties\nbase_model: {base}\nmodels:\n  - model: {ft}\n"
        f"    parameters: {{weight: {weight}, density: 0.5}}\ndtype: float32\n"
    )


@pytest.fixture
def family(tiny_family):
    base, (ft, _) = tiny_family("llama")
    return base, ft


def mkmerge(*args):
    return CliRunner().invoke(merge_app, [*map(str, args), "--quiet"])


def killed_run(recipe: Path, out: Path, after: int, *extra: str) -> None:
    """Run mkmerge in a subprocess that SIGKILLs itself after ``after`` tensors are journaled."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MKSUITE_TEST_KILL_AFTER": str(after)}
    done = subprocess.run(
        [sys.executable, "-m", "mkmerge", str(recipe), str(out), "--quiet", *extra],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == -9, done.stderr


def weight_bytes(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.glob("*.safetensors*"))}


def partials(parent: Path) -> list[Path]:
    return [p for p in parent.iterdir() if ".partial-" in p.name]


@pytest.fixture
def reference(family, tmp_path_factory):
    """An uninterrupted run's weights, sharded so a kill can fall between files."""
    base, ft = family
    root = tmp_path_factory.mktemp("reference")
    recipe = root / "r.yml"
    recipe.write_text(recipe_text(base, ft))
    assert mkmerge(recipe, root / "out", "--shard-size", "40KB").exit_code == 0
    return recipe, weight_bytes(root / "out")


@pytest.mark.parametrize("after", [1, 13, 30])
def test_resume_after_kill_9_is_byte_identical(reference, tmp_path, after):
    recipe, expected = reference
    out = tmp_path / "out"
    killed_run(recipe, out, after, "--shard-size", "40KB")
    (partial,) = partials(tmp_path)
    assert (partial / MARKER_FILE).is_file() and not out.exists()
    result = mkmerge(recipe, out, "--shard-size", "40KB")
    assert result.exit_code == 0, result.output
    assert f"resuming an interrupted run: {after} of" in result.output
    assert weight_bytes(out) == expected
    assert partials(tmp_path) == []
    assert not [p for p in out.iterdir() if p.name.startswith(".mksuite")]


def test_resume_computes_only_what_the_journal_lacks(reference, tmp_path, monkeypatch):
    """The resumed run hands the executor exactly the unjournaled tensors; killed after the
    last tensor (embeddings and LM head included) was journaled, it computes nothing again."""
    import mksuite.common.build as build

    recipe, expected = reference
    asked: list[list[str]] = []

    class Recording(build.Executor):
        def run(self, outputs, sink, copier=None):
            asked.append([o.name for o in outputs])
            return super().run(outputs, sink, copier)

    monkeypatch.setattr(build, "Executor", Recording)
    total = len(json.loads(expected["model.safetensors.index.json"])["weight_map"])
    for after in (total - 3, total):
        out = tmp_path / f"out{after}"
        killed_run(recipe, out, after, "--shard-size", "40KB")
        (partial,) = partials(tmp_path)
        journaled = {json.loads(line)["tensor"] for line in (partial / ".mksuite-journal").read_text().splitlines()}
        assert len(journaled) == after
        asked.clear()
        result = mkmerge(recipe, out, "--shard-size", "40KB")
        assert result.exit_code == 0, result.output
        (computed,) = asked
        assert len(set(computed)) == total - after and not set(computed) & journaled
        assert weight_bytes(out) == expected
    assert {"model.embed_tokens.weight", "lm_head.weight"} <= journaled


def test_changed_input_file_discards_the_partial(family, tmp_path):
    """The journal trusts an input only while its size and modification time are unchanged."""
    base, ft = family
    ft = copy_model(ft, tmp_path / "ft")
    recipe = tmp_path / "r.yml"
    recipe.write_text(recipe_text(base, ft))
    killed_run(recipe, tmp_path / "out", 5)
    weights = ft / "model.safetensors"
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    result = mkmerge(recipe, tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert "resuming" not in result.output and "removed" in result.output


def test_changed_recipe_discards_the_partial_and_says_so(family, tmp_path):
    base, ft = family
    recipe = tmp_path / "r.yml"
    recipe.write_text(recipe_text(base, ft))
    killed_run(recipe, tmp_path / "out", 5)
    recipe.write_text(recipe_text(base, ft, weight=0.9))
    result = mkmerge(recipe, tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert "removed" in result.output and "interrupted run" in result.output
    assert partials(tmp_path) == []
    fresh = tmp_path / "fresh"
    assert mkmerge(recipe, fresh).exit_code == 0
    assert weight_bytes(tmp_path / "out") == weight_bytes(fresh)


def test_changed_seed_discards_the_partial(family, tmp_path):
    base, ft = family
    recipe = tmp_path / "r.yml"
    recipe.write_text(recipe_text(base, ft).replace("ties", "dare_ties"))
    killed_run(recipe, tmp_path / "out", 5)
    result = mkmerge(recipe, tmp_path / "out", "--seed", "7")
    assert result.exit_code == 0, result.output
    assert "resuming" not in result.output and "removed" in result.output


def test_partial_without_our_marker_or_held_by_a_live_run_is_left_alone(family, tmp_path):
    base, ft = family
    recipe = tmp_path / "r.yml"
    recipe.write_text(recipe_text(base, ft))
    foreign = tmp_path / ".out.partial-foreign1"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("not ours")
    live = tmp_path / ".out.partial-live0001"
    live.mkdir()
    (live / MARKER_FILE).write_text(json.dumps({"out": str(tmp_path / "out")}))
    with open(live / MARKER_FILE) as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # as the running process holds it
        result = mkmerge(recipe, tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert "no mksuite marker" in result.output and "still in progress" in result.output
    assert (foreign / "precious.txt").read_text() == "not ours" and (live / MARKER_FILE).exists()


def test_verify_passes_and_prints_one_line(family, tmp_path):
    base, ft = family
    recipe = tmp_path / "r.yml"
    recipe.write_text(recipe_text(base, ft))
    result = mkmerge(recipe, tmp_path / "out", "--verify", "--shard-size", "40KB")
    assert result.exit_code == 0, result.output
    (line,) = [line for line in result.output.splitlines() if line.startswith("verified:")]
    assert "config loads" in line and "tokenizer loads" in line and "the card names all 2 inputs" in line


def test_verify_catches_a_flipped_byte(family, tmp_path, monkeypatch):
    base, ft = family
    recipe = tmp_path / "r.yml"
    recipe.write_text(recipe_text(base, ft))
    monkeypatch.setenv("MKSUITE_TEST_FLIP_BYTE", "1")
    result = mkmerge(recipe, tmp_path / "out", "--verify")
    assert result.exit_code == 9, result.output
    assert "verification failed" in result.output and "crc32" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yml"]


def test_verify_in_mkstack_and_mkmoe(family, tmp_path):
    base, ft = family
    stacked = CliRunner().invoke(
        stack_app, [str(tmp_path / "stack"), "--expand", str(base), "--every", "1", "--verify", "--quiet"]
    )
    assert stacked.exit_code == 0 and "verified:" in stacked.output, stacked.output
    config = tmp_path / "moe.yml"
    config.write_text(
        f"base_model: {base}\ngate_mode: random\ndtype: float32\nexperts:\n"
        f"  - source_model: {base}\n  - source_model: {ft}\n"
    )
    moe = CliRunner().invoke(moe_app, [str(config), str(tmp_path / "moe"), "--verify", "--quiet"])
    assert moe.exit_code == 0 and "verified:" in moe.output, moe.output


def test_checksums_of_row_parts_written_out_of_order(tmp_path):
    planned = [TensorInfo("a", torch.float32, (6, 4)), TensorInfo("b", torch.float16, (3,))]
    layout = plan_shards(planned, 10**9)
    writer = ShardedWriter(tmp_path, layout, checksums=True)
    writer.open()
    a = torch.arange(24, dtype=torch.float32).reshape(6, 4)
    writer.write("a", a[4:], rows=(4, 6))
    writer.write("b", torch.ones(3, dtype=torch.float16))
    writer.write("a", a[:4], rows=(0, 4))
    writer.finish()
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert "2 tensors" in verify_output(tmp_path, layout, writer.checksums)
    data = bytearray((tmp_path / "model.safetensors").read_bytes())
    data[len(layout[0].header) + 4 * 4 * 2] ^= 0x80  # a byte of row 2 of `a`
    (tmp_path / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(VerifyError, match=r"tensor `a` rows \[0, 4\)"):
        verify_output(tmp_path, layout, writer.checksums)
