"""`mkmerge plan RECIPE` and `mkmerge RECIPE OUT --dry-run`: the plan before any byte moves.

The plan must describe exactly what a run then writes (tensors, dtypes, shapes, files), read
no tensor data, create nothing, refuse bad recipes with the very error a run gives, and
predict the run's peak memory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

from mkmerge.cli import merge_app, plan_app
from mkmerge.methods import METHODS
from mkmerge.plan import plan_merge
from mkmerge.plan_json import report_json
from mkmerge.plan_report import plan_report
from mkmerge.recipe import parse_recipe
from mkmerge.run import run_merge
from mksuite.common.build import BuildOptions
from mksuite.common.errors import ArchitectureError, RecipeError, ShapeMismatchError

REPO_ROOT = Path(__file__).resolve().parents[2]


def ties_recipe(base: Path, ft1: Path, ft2: Path) -> str:
    return (
        f"merge_method: ties\nbase_model: {base}\nmodels:\n"
        f"  - model: {ft1}\n    parameters: {{weight: 0.6, density: 0.5}}\n"
        f"  - model: {ft2}\n    parameters: {{weight: 0.4, density: [0.3, 0.9]}}\n"
        "dtype: bfloat16\n"
    )


def write(tmp_path: Path, recipe: str) -> Path:
    path = tmp_path / "recipe.yml"
    path.write_text(recipe)
    return path


def plan_json(recipe_path: Path, *options: str) -> dict:
    result = CliRunner().invoke(plan_app, [str(recipe_path), "--json", *options])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def files_of(directory: Path) -> dict[str, tuple[int, int]]:
    """Each weight file in a model directory: (tensor count, size in bytes)."""
    found = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(file, framework="pt") as handle:
            found[file.name] = (len(list(handle.keys())), file.stat().st_size)
    return found


# --- what the plan says ---------------------------------------------------------------------


def test_plan_json_lists_exactly_the_tensors_and_files_a_run_writes(tmp_path, family):
    recipe_path = write(tmp_path, ties_recipe(*family))
    plan = plan_json(recipe_path, "--shard-size", "40kB")
    out = tmp_path / "merged"
    result = CliRunner().invoke(merge_app, [str(recipe_path), str(out), "--shard-size", "40kB", "--quiet"])
    assert result.exit_code == 0, result.output

    written = {}
    for file in out.glob("*.safetensors"):
        with safe_open(file, framework="pt") as handle:
            for name in handle.keys():
                tensor = handle.get_tensor(name)
                written[name] = (str(tensor.dtype).removeprefix("torch."), list(tensor.shape), file.name)
    planned = {t["name"]: (t["dtype"], t["shape"], t["shard"]) for t in plan["tensors"]}
    assert planned == written
    assert len(plan["shards"]) > 1, "control: the shard size splits the output"
    assert {s["file"]: (s["tensors"], s["bytes"]) for s in plan["shards"]} == files_of(out)
    assert plan["output"]["bytes"] == sum(t["bytes"] for t in plan["tensors"])
    assert plan["output"] == {
        **plan["output"],
        "architecture": "LlamaForCausalLM",
        "layers": 3,
        "tensors": len(written),
    }


def test_plan_json_names_inputs_methods_and_resolved_parameters(tmp_path, family):
    base, ft1, ft2 = family
    plan = plan_json(write(tmp_path, ties_recipe(base, ft1, ft2)))
    assert plan["schema"] == "mkmerge-plan/1"
    assert plan["method"] == "ties"
    assert [(i["label"], i["path"], i["is_base"], i["layers"]) for i in plan["inputs"]] == [
        ("base", str(base), True, 3),
        ("A", str(ft1), False, 3),
        ("B", str(ft2), False, 3),
    ]
    sizes = {i["label"]: i["bytes"] for i in plan["inputs"]}
    assert sizes["base"] == sum(f.stat().st_size for f in base.glob("*.safetensors")) - _header_bytes(base)

    q_proj = {t["name"]: t for t in plan["tensors"]}["model.layers.2.self_attn.q_proj.weight"]
    assert q_proj["computed_as"] == "ties(base, A, B)"
    by_model = {i["model"]: i for i in q_proj["inputs"]}
    assert by_model["base"]["is_base"] and by_model["base"]["tensor"] == "model.layers.2.self_attn.q_proj.weight"
    assert by_model["A"]["parameters"] == {"weight": 0.6, "density": 0.5}
    assert by_model["B"]["parameters"] == {"weight": 0.4, "density": 0.9}  # last layer of the gradient
    assert q_proj["parameters"]["normalize"] is True

    assert plan["layer_groups"] == [
        {"layers": [0, 2], "tensors_each": 9, "computed_as": [{"what": "ties(base, A, B)", "tensors": 9}]}
    ]
    assert [w["tensor"] for w in plan["pre_weights"]] == ["model.embed_tokens.weight"]
    assert [w["tensor"] for w in plan["post_weights"]] == ["model.norm.weight", "lm_head.weight"]


def _header_bytes(model: Path) -> int:
    total = 0
    for file in model.glob("*.safetensors"):
        with open(file, "rb") as handle:
            total += 8 + int.from_bytes(handle.read(8), "little")
    return total


def test_stacking_plan_groups_layers_by_source_range_and_scale(tmp_path, family):
    _, ft1, ft2 = family
    recipe = (
        "merge_method: passthrough\nslices:\n"
        f"  - sources:\n      - model: {ft1}\n        layer_range: [0, 2]\n"
        f"  - sources:\n      - model: {ft2}\n        layer_range: [1, 3]\n"
        "        parameters:\n          scale:\n            - filter: down_proj\n              value: 0.5\n"
        "            - value: 1\n"
    )
    plan = plan_json(write(tmp_path, recipe))
    assert plan["output"]["layers"] == 4
    assert plan["layer_groups"] == [
        {"layers": [0, 1], "tensors_each": 9, "computed_as": [{"what": "passthrough(A)", "tensors": 9}]},
        {
            "layers": [2, 3],
            "tensors_each": 9,
            "computed_as": [
                {"what": "passthrough(B layers 1–2)", "tensors": 8},
                {"what": "passthrough(B layers 1–2) ×0.5", "tensors": 1},
            ],
        },
    ]
    down = {t["name"]: t for t in plan["tensors"]}["model.layers.3.mlp.down_proj.weight"]
    assert down["inputs"][0]["tensor"] == "model.layers.2.mlp.down_proj.weight"
    assert down["inputs"][0]["parameters"] == {"scale": 0.5}


def test_plan_prints_inputs_tensor_groups_files_and_memory(tmp_path, family):
    base, ft1, ft2 = family
    result = CliRunner().invoke(plan_app, [str(write(tmp_path, ties_recipe(base, ft1, ft2)))], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    text = result.stdout
    for expected in (
        "ties -> LlamaForCausalLM, 3 layers",
        str(base),
        "layers 0–2",
        "ties(base, A, B)",
        "9 each",
        "model.embed_tokens.weight",
        "lm_head.weight",
        "model.safetensors",
        "predicted peak memory",
    ):
        assert expected in text, f"{expected!r} not in:\n{text}"


# --- nothing moves ----------------------------------------------------------------------------


def test_dry_run_reads_no_tensor_and_creates_nothing(tmp_path, family, tensor_reads):
    recipe_path = write(tmp_path, ties_recipe(*family))
    out = tmp_path / "deep" / "merged"
    for options in ([], ["--json"]):
        result = CliRunner().invoke(merge_app, [str(recipe_path), str(out), "--dry-run", *options])
        assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["method"] == "ties"
    assert tensor_reads == []
    assert not out.parent.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yml"]

    control = CliRunner().invoke(merge_app, [str(recipe_path), str(out), "--quiet"])
    assert control.exit_code == 0 and tensor_reads, "control: the run itself reads tensors and creates OUT"
    assert out.is_dir()


def test_dry_run_refuses_an_existing_output_as_the_run_would(tmp_path, family):
    recipe_path = write(tmp_path, ties_recipe(*family))
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("not a model")
    dry = CliRunner().invoke(merge_app, [str(recipe_path), str(out), "--dry-run"])
    real = CliRunner().invoke(merge_app, [str(recipe_path), str(out), "--quiet"])
    assert dry.exit_code == real.exit_code == 8
    assert dry.stderr == real.stderr
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_json_without_dry_run_is_refused(tmp_path, family):
    result = CliRunner().invoke(merge_app, [str(write(tmp_path, ties_recipe(*family))), str(tmp_path / "o"), "--json"])
    assert result.exit_code == RecipeError.exit_code
    assert "--json" in result.stderr and "--dry-run" in result.stderr
    assert not (tmp_path / "o").exists()


def two_stage_recipe(base: Path, ft1: Path, ft2: Path) -> str:
    return (
        f"name: soup\nmerge_method: linear\nmodels:\n  - model: {ft1}\n    parameters: {{weight: 0.5}}\n"
        f"  - model: {ft2}\n    parameters: {{weight: 0.5}}\n---\n"
        f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n  - model: soup\n    parameters: {{weight: 1.0}}\n"
    )


def test_dry_run_of_stages_plans_what_exists_and_says_what_waits(tmp_path, family, tensor_reads):
    recipe_path = write(tmp_path, two_stage_recipe(*family))
    out = tmp_path / "final"
    result = CliRunner().invoke(merge_app, [str(recipe_path), str(out), "--dry-run", "--json"])
    assert result.exit_code == 0, result.output
    stages = json.loads(result.stdout)["stages"]
    assert [(s["name"], s["status"], s["depends_on"]) for s in stages] == [
        ("soup", "planned", []),
        (None, "waits", ["soup"]),
    ]
    assert stages[0]["out"] == str(tmp_path / "final.stages" / "soup")
    assert stages[0]["plan"]["method"] == "linear" and stages[1]["plan"] is None
    assert tensor_reads == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yml"]

    assert CliRunner().invoke(merge_app, [str(recipe_path), str(out), "--quiet"]).exit_code == 0
    again = CliRunner().invoke(
        merge_app, [str(recipe_path), str(out), "--dry-run", "--json", "--no-lazy", "--overwrite"]
    )
    assert again.exit_code == 0, again.output
    assert [s["status"] for s in json.loads(again.stdout)["stages"]] == ["planned", "waits"]
    # the final output exists: the dry run refuses it as the run would, and with --overwrite
    # plans it again (what goes to OUT is never reused) while the intermediate stage is reused
    refused = CliRunner().invoke(merge_app, [str(recipe_path), str(out), "--dry-run", "--json"])
    assert refused.exit_code == 8, refused.output
    reused = CliRunner().invoke(merge_app, [str(recipe_path), str(out), "--dry-run", "--json", "--overwrite"])
    assert [s["status"] for s in json.loads(reused.stdout)["stages"]] == ["reused", "planned"]


def test_plan_command_sends_stage_files_to_the_dry_run(tmp_path, family):
    recipe_path = write(tmp_path, two_stage_recipe(*family))
    result = CliRunner().invoke(plan_app, [str(recipe_path)])
    assert result.exit_code == RecipeError.exit_code
    assert "2 stages" in result.stderr and "--dry-run" in result.stderr


# --- errors: the plan reports what the run would -----------------------------------------------


def _linear(*models: Path, weights: tuple = (1, 1)) -> str:
    lines = ["merge_method: linear", "models:"]
    for model, weight in zip(models, weights):
        lines.append(f"  - model: {model}")
        if weight is not None:
            lines += ["    parameters:", f"      weight: {weight}"]
    return "\n".join(lines) + "\n"


ERROR_CASES = {
    "unknown method": (
        lambda base, a, b, other: _linear(a, b).replace("linear", "lienar"),
        RecipeError,
        "recipe.yml:1, field `merge_method`",
    ),
    "missing parameter": (
        lambda base, a, b, other: _linear(a, b, weights=(1, None)),
        RecipeError,
        "recipe.yml:6, field `models[1].parameters.weight`",
    ),
    "layer range": (
        lambda base, a, b, other: (
            f"merge_method: passthrough\nslices:\n  - sources:\n      - model: {a}\n        layer_range: [1, 5]\n"
        ),
        RecipeError,
        "recipe.yml:5, field `slices[0].sources[0].layer_range`",
    ),
    "shape": (lambda base, a, b, other: _linear(a, other["wide"]), ShapeMismatchError, "[128, 64]"),
    "architecture": (lambda base, a, b, other: _linear(a, other["qwen2"]), ArchitectureError, "--allow-crimes"),
}


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_plan_and_dry_run_refuse_a_bad_recipe_with_the_error_of_the_real_run(
    tmp_path, family, tiny_model, tensor_reads, case
):
    base, ft1, ft2 = family
    other = {"wide": tiny_model("llama", hidden=64, seed=5), "qwen2": tiny_model("qwen2", seed=3)}
    make, error, culprit = ERROR_CASES[case]
    recipe_path = write(tmp_path, make(base, ft1, ft2, other))
    out = tmp_path / "merged"

    real = CliRunner().invoke(merge_app, [str(recipe_path), str(out), "--quiet"])
    planned = CliRunner().invoke(plan_app, [str(recipe_path)])
    as_json = CliRunner().invoke(plan_app, [str(recipe_path), "--json"])
    dry = CliRunner().invoke(merge_app, [str(recipe_path), str(out), "--dry-run", "--json"])

    assert real.exit_code == error.exit_code, real.output
    assert real.stderr.startswith(f"{error.title}: ") and culprit in real.stderr, real.stderr
    for result in (planned, as_json, dry):
        assert result.exit_code == real.exit_code
        assert result.stderr == real.stderr
        assert result.stdout == ""
    assert tensor_reads == []
    assert not out.exists()


def test_allow_crimes_lets_the_plan_through(tmp_path, family, tiny_model):
    _, ft1, _ = family
    other = tiny_model("mistral", seed=4)  # same tensor shapes as the tiny llama, another architecture
    recipe_path = write(tmp_path, _linear(ft1, other))
    refused = CliRunner().invoke(plan_app, [str(recipe_path), "--json"])
    assert refused.exit_code == ArchitectureError.exit_code
    plan = plan_json(recipe_path, "--allow-crimes")
    assert [i["architecture"] for i in plan["inputs"]] == ["LlamaForCausalLM", "MistralForCausalLM"]


# --- the memory prediction ----------------------------------------------------------------------

HIDDEN, INTERMEDIATE, LAYERS, HEADS, KV_HEADS, VOCAB = 512, 1408, 2, 8, 4, 32000


def write_random_llama(directory: Path, seed: int) -> Path:
    """A bf16 Llama-shaped checkpoint written straight with safetensors (no model is built)."""
    generator = torch.Generator().manual_seed(seed)
    kv = KV_HEADS * HIDDEN // HEADS
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (HIDDEN, HIDDEN),
            p + "self_attn.k_proj.weight": (kv, HIDDEN),
            p + "self_attn.v_proj.weight": (kv, HIDDEN),
            p + "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
            p + "mlp.gate_proj.weight": (INTERMEDIATE, HIDDEN),
            p + "mlp.up_proj.weight": (INTERMEDIATE, HIDDEN),
            p + "mlp.down_proj.weight": (HIDDEN, INTERMEDIATE),
            p + "input_layernorm.weight": (HIDDEN,),
            p + "post_attention_layernorm.weight": (HIDDEN,),
        }
    shapes |= {"model.norm.weight": (HIDDEN,), "lm_head.weight": (VOCAB, HIDDEN)}
    tensors = {
        name: torch.empty(shape, dtype=torch.bfloat16).normal_(0, 0.02, generator=generator)
        for name, shape in shapes.items()
    }
    directory.mkdir(parents=True)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS, "vocab_size": VOCAB, "tie_word_embeddings": False, "dtype": "bfloat16",
    }  # fmt: skip
    (directory / "config.json").write_text(json.dumps(config))
    return directory


CHILD = """
import contextlib, io, json, sys
from mkmerge.cli import main

recipe, out, threads = sys.argv[1:4]

def mkmerge(*args):
    sys.argv = ["mkmerge", *args]
    try:
        main()
    except SystemExit as exit:
        if exit.code:
            raise

printed = io.StringIO()
with contextlib.redirect_stdout(printed):
    mkmerge("plan", recipe, "--json", "--threads", threads)
predicted = json.loads(printed.getvalue())["memory"]
mkmerge(recipe, out, "--quiet", "--threads", threads)
# VmHWM, not ru_maxrss: Linux carries the parent's high-water mark over into ru_maxrss when
# the child execs python, so a big pytest process would count as this child's peak.
with open("/proc/self/status") as status:
    peak = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))
print(json.dumps({"memory": predicted, "measured": peak}))
"""


@pytest.fixture(scope="module")
def random_llamas(tmp_path_factory) -> list[Path]:
    """Three 78 MB models whose 33 MB embedding and LM head dominate, as in real checkpoints."""
    root = tmp_path_factory.mktemp("random_llamas")
    return [write_random_llama(root / name, seed) for seed, name in enumerate(("base", "a", "b"))]


def test_tensors_merged_in_row_blocks_are_planned_once_with_their_block_count(tmp_path, random_llamas):
    options = BuildOptions(chunk_bytes=8_000_000, shard_size=60_000_000)
    recipe = parse_recipe(_linear(*random_llamas, weights=(0.2, 0.3, 0.5)), known_methods=METHODS.keys())
    plan = plan_merge(recipe, chunk_bytes=options.chunk_bytes)
    assert len(plan.outputs) > len({o.name for o in plan.outputs}), "control: some tensors are cut into parts"
    report = report_json(plan_report(plan, options, baseline_bytes=0))
    tensors = {t["name"]: t for t in report["tensors"]}
    assert len(tensors) == len(report["tensors"]) == LAYERS * 9 + 3  # each layer's 9, embedding, norm, head: once
    assert tensors["model.embed_tokens.weight"]["row_blocks"] == 5  # 32.8 MB in blocks of at most 8 MB
    assert tensors["model.embed_tokens.weight"]["bytes"] == VOCAB * HIDDEN * 2

    run_merge(recipe, tmp_path / "merged", options, plan=plan)
    assert {s["file"]: (s["tensors"], s["bytes"]) for s in report["shards"]} == files_of(tmp_path / "merged")

    slerp = (
        f"merge_method: slerp\nbase_model: {random_llamas[0]}\nmodels:\n  - model: {random_llamas[1]}\n"
        "parameters: {t: 0.3}\n"
    )
    slerp_plan = plan_merge(parse_recipe(slerp, known_methods=METHODS.keys()), chunk_bytes=options.chunk_bytes)
    head = {t["name"]: t for t in report_json(plan_report(slerp_plan, options, baseline_bytes=0))["tensors"]}
    assert head["lm_head.weight"]["statistics_passes"] == 1  # the norms and the angle, before merging


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/status and glibc heaps: Linux")
@pytest.mark.parametrize("threads", [1, 2])
def test_predicted_peak_memory_is_within_25_percent_of_the_measured_peak(tmp_path, random_llamas, threads):
    """A fresh interpreter plans (`mkmerge plan --json`), then runs the merge; VmHWM is its peak."""
    recipe = _linear(*random_llamas, weights=(0.2, 0.3, 0.5))
    recipe_path = write(tmp_path, recipe)
    child = subprocess.run(
        [sys.executable, "-c", CHILD, str(recipe_path), str(tmp_path / "merged"), str(threads)],
        cwd=REPO_ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert child.returncode == 0, child.stderr
    report = json.loads(child.stdout.splitlines()[-1])
    memory, measured = report["memory"], report["measured"]
    predicted = memory["predicted_peak_bytes"]
    assert memory["read_bytes"] + memory["working_bytes"] > memory["baseline_bytes"] / 2, "the tensors matter"
    assert memory["compute_workers"] == threads
    assert abs(predicted - measured) <= 0.25 * measured, (predicted, measured, memory)
