"""The command-line surface of the three tools: shared options, pasted mergekit flags, help, exit codes."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import typer
from typer.testing import CliRunner

from mkmerge.cli import merge_app
from mkmoe.cli import app as moe_app
from mkstack.cli import stack_app

TOOLS = {"mkmerge": merge_app, "mkstack": stack_app, "mkmoe": moe_app}
LINEAR = "merge_method: linear\ndtype: float32\nmodels:\n  - model: {a}\n    parameters: {{weight: 0.7}}\n"
LINEAR += "  - model: {b}\n    parameters: {{weight: 0.3}}\n"

# Every option mergekit 0.1.5's mergekit-yaml takes, as a user pastes it (values included).
MERGEKIT_YAML_FLAGS = [
    "--lazy-unpickle", "--low-cpu-memory", "--read-to-gpu", "--multi-gpu", "--async-write",
    "--write-threads", "4", "--clone-tensors", "--safe-serialization", "-v", "-v", "--trust-remote-code",
    "--no-allow-crimes", "--copy-tokenizer", "--write-model-card", "--no-quiet", "--no-cuda",
    "--random-seed", "3", "-j", "1", "--out-shard-size", "5B", "--device", "auto",
    "--lora-merge-dtype", "float32", "--lora-merge-cache", "unused-cache",
]  # fmt: skip


def run(app, *args, **kw):
    return CliRunner().invoke(app, [str(a) for a in args], **kw)


def weights(path: Path) -> dict[str, torch.Tensor]:
    from tiny_models import read_tensors

    return read_tensors(path)


@pytest.fixture
def recipe(tiny_family, tmp_path) -> Path:
    _, (a, b) = tiny_family("llama")
    path = tmp_path / "recipe.yml"
    path.write_text(LINEAR.format(a=a, b=b))
    return path


def test_a_pasted_mergekit_yaml_command_line_merges_the_same_bytes(recipe, tmp_path):
    plain = run(merge_app, recipe, tmp_path / "plain", "--quiet")
    assert plain.exit_code == 0, plain.output
    # mergekit-yaml puts its options anywhere; a flag's value must never be read as RECIPE or OUT.
    pasted = run(merge_app, *MERGEKIT_YAML_FLAGS[:8], recipe, tmp_path / "pasted", *MERGEKIT_YAML_FLAGS[8:])
    assert pasted.exit_code == 0, pasted.output
    expected, got = weights(tmp_path / "plain"), weights(tmp_path / "pasted")
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[name], got[name]) for name in expected)


@pytest.mark.parametrize(
    "flag, why",
    [
        ("--lazy-unpickle", "restricted unpickler"),
        ("--low-cpu-memory", "memory stays bounded"),
        ("--multi-gpu", "one --device"),
        ("--async-write", "writer thread"),
        ("--clone-tensors", "own bytes"),
        ("--trust-remote-code", "no code from a model repository"),
    ],
)
def test_v_explains_each_flag_that_changes_nothing_in_one_line(recipe, tmp_path, flag, why):
    loud = run(merge_app, recipe, tmp_path / "out", flag, "-v", "--dry-run")
    assert loud.exit_code == 0, loud.output
    notes = [line for line in loud.stderr.splitlines() if line.startswith("note: ")]
    assert len(notes) == 1 and flag in notes[0] and why in notes[0]
    silent = run(merge_app, recipe, tmp_path / "out", flag, "--dry-run")
    assert "note:" not in silent.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["--write-threads", "2"],
        ["--transformers-cache", "somewhere"],
        ["--random-seed", "9"],
        ["--num-threads", "1"],
        ["--out-shard-size", "1B"],
        ["--lora-merge-cache", "elsewhere"],
    ],
)
def test_options_with_a_value_consume_it_wherever_they_stand(recipe, tmp_path, args):
    for order in ([*args, recipe, tmp_path / "out"], [recipe, *args, tmp_path / "out"]):
        result = run(merge_app, *order, "--dry-run", "--json")
        assert result.exit_code == 0, result.output
        assert '"schema"' in result.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("tool", TOOLS)
@pytest.mark.parametrize("flags", [["--cuda"], ["--device", "cuda"], ["--gpu-rich"], ["--device", "cuda:3"]])
def test_cuda_without_a_cuda_device_exits_with_the_documented_code(tiny_family, recipe, tmp_path, tool, flags):
    from mkmoe_helpers import moe_yaml

    base, (a, b) = tiny_family("llama")
    (tmp_path / "moe.yml").write_text(moe_yaml(base, [a, b], gate_mode="random"))
    good = {
        "mkmerge": [recipe, tmp_path / "out"],
        "mkstack": [tmp_path / "out", "--upscale", a, "--overlap", "1"],
        "mkmoe": [tmp_path / "moe.yml", tmp_path / "out"],
    }
    result = run(TOOLS[tool], *good[tool], *flags, "--quiet")
    assert result.exit_code == 10, result.output
    assert "device unavailable" in result.output and "--device cpu" in result.output
    assert not (tmp_path / "out").exists()


def test_an_unknown_device_is_a_command_line_error(recipe, tmp_path):
    result = run(merge_app, recipe, tmp_path / "out", "--device", "gpu", "--quiet")
    assert result.exit_code == 2 and "--device" in result.output


def test_merge_plan_and_methods_are_listed_commands_and_recipe_out_still_merges(recipe, tmp_path):
    listing = run(merge_app, "--help")
    assert listing.exit_code == 0
    commands = listing.stdout.split("Commands:")[1]
    assert re.search(r"^\s+merge \(default\)", commands, re.M)
    assert re.search(r"^\s+plan\s", commands, re.M) and re.search(r"^\s+methods\s", commands, re.M)
    assert run(merge_app, "plan", recipe).exit_code == 0
    assert "ties" in run(merge_app, "methods", terminal_width=200).stdout
    explicit = run(merge_app, "merge", recipe, tmp_path / "explicit", "--quiet")
    implicit = run(merge_app, "--quiet", recipe, tmp_path / "implicit")  # options may come first
    assert explicit.exit_code == 0 and implicit.exit_code == 0, implicit.output
    assert (tmp_path / "explicit" / "model.safetensors").read_bytes() == (
        tmp_path / "implicit" / "model.safetensors"
    ).read_bytes()


def _help_pages():
    for tool, app in TOOLS.items():
        yield tool, app, []
        for name in app.registered_commands:
            yield tool, app, [name.name]


@pytest.mark.parametrize("tool, app, command", list(_help_pages()), ids=lambda v: v if isinstance(v, str) else None)
def test_help_at_80_columns_names_every_option_in_full_with_examples(tool, app, command):
    result = run(app, *command, "-h", env={"COLUMNS": "80"}, terminal_width=80)
    assert result.exit_code == 0, result.output
    page = result.stdout
    assert "Examples:" in page and "<bool>" not in page and "…" not in page
    assert all(len(line) <= 80 for line in page.splitlines())
    group = typer.main.get_command(app)
    target = group.commands[command[0]] if command else group
    options = [param for param in target.params if param.param_type_name == "option"]
    declared = ["-h", "--help", *(name for param in options for name in (*param.opts, *param.secondary_opts))]
    shown = set(re.findall(r"(?<![\w-])--?[a-zA-Z0-9][a-zA-Z0-9-]*", page))
    assert all(name in shown for name in declared), set(declared) - shown
    # every option's description starts with a capital letter (one capitalisation style)
    starts = re.findall(r"^  -.*?(?:\s{2,}|\n\s{30,})(\S)", page, re.M)
    assert starts and all(s.isupper() for s in starts), starts


@pytest.mark.parametrize("tool", TOOLS)
def test_version_and_short_help(tool):
    version = run(TOOLS[tool], "--version")
    assert version.exit_code == 0 and re.match(rf"{tool} \(mksuite\) \d", version.stdout)
    assert run(TOOLS[tool], "-h").stdout == run(TOOLS[tool], "--help").stdout


def _imports_torch(tool: str, *args: str, cwd: Path) -> tuple[bool, str]:
    code = (
        "import atexit, sys\n"
        "atexit.register(lambda: print('TORCH', 'torch' in sys.modules, file=sys.stderr))\n"
        f"sys.argv = [{tool!r}, *{list(args)!r}]\n"
        f"from {tool}.cli import main\n"
        "main()\n"
    )
    env = {**os.environ, "COLUMNS": "80"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, env=env, timeout=120)
    return "TORCH True" in done.stderr, done.stdout + done.stderr


@pytest.mark.parametrize("tool", TOOLS)
@pytest.mark.parametrize("args", [["--help"], ["--version"], ["-h"]])
def test_help_and_version_do_not_import_torch(tool, args, tmp_path):
    imported, output = _imports_torch(tool, *args, cwd=tmp_path)
    assert "TORCH False" in output and not imported, output


def test_the_output_directory_follows_the_umask(recipe, tmp_path):
    previous = os.umask(0o022)
    try:
        assert run(merge_app, recipe, tmp_path / "open", "--quiet").exit_code == 0
        os.umask(0o077)
        assert run(merge_app, recipe, tmp_path / "private", "--quiet").exit_code == 0
    finally:
        os.umask(previous)
    assert (tmp_path / "open").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "private").stat().st_mode & 0o777 == 0o700


def test_mkstack_dry_run_prints_the_layer_map_and_creates_nothing(tiny_family, tmp_path):
    _, (a, _) = tiny_family("llama")
    result = run(stack_app, tmp_path / "out", "--upscale", a, "--overlap", "1", "--dry-run", terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "layer map" in result.stdout and not (tmp_path / "out").exists()


def test_mkmoe_dry_run_plans_from_headers_and_creates_nothing(tiny_family, tmp_path, no_tensor_reads):
    from mkmoe_helpers import moe_yaml

    base, (a, b) = tiny_family("llama")
    config = tmp_path / "moe.yml"
    config.write_text(moe_yaml(base, [a, b], gate_mode="random"))
    result = run(moe_app, config, tmp_path / "out", "--dry-run")
    assert result.exit_code == 0, result.output
    assert "2 experts" in result.stdout and "model.safetensors" in result.stdout
    assert not (tmp_path / "out").exists()
