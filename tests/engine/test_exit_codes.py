"""One table of exit codes: every error class is in it, and a catalogue of bad inputs exits by it."""

from __future__ import annotations

import json
import re
import struct
import zipfile
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import mksuite.common.errors as errors
from mkmerge.cli import merge_app
from mkmoe.cli import app as moe_app
from mkstack.cli import stack_app
from mksuite.common.errors import MkError

from tiny_models import copy_model


def documented_codes() -> dict[str, int]:
    """Class name -> exit code, read from the table in common/errors.py's docstring."""
    codes: dict[str, int] = {}
    code = None
    for line in errors.__doc__.splitlines():
        match = re.match(r"^(\d+)?\s{2,}(\S.*?)\s{2,}", line + "  ")
        if not match or line.startswith("="):
            continue
        if match.group(1):
            code = int(match.group(1))
        for name in re.findall(r"\b([A-Z]\w+Error)\b", match.group(2)):
            codes[name] = code
    return codes


def all_error_classes() -> list[type[MkError]]:
    found, pending = [], [MkError]
    while pending:
        cls = pending.pop()
        found.append(cls)
        pending += cls.__subclasses__()
    return found


def test_every_error_class_is_in_the_table_with_its_exit_code():
    table = documented_codes()
    assert table["MkError"] == 1 and table["RecipeError"] == 2  # the parser reads the table
    for cls in all_error_classes():
        assert table.get(cls.__name__) == cls.exit_code, (
            f"{cls.__name__} exits {cls.exit_code}; table says {table.get(cls.__name__)}"
        )


def test_the_table_codes_are_distinct_per_meaning():
    by_code: dict[int, set[str]] = {}
    for cls in all_error_classes():
        by_code.setdefault(cls.exit_code, set()).add(cls.__name__)
    assert by_code[4] >= {"ModelFileError", "TensorFileError", "UnsafePickleError", "AdapterError"}
    assert {0, 11, 70, 130}.isdisjoint(by_code)  # success, out of memory, bug, interrupted: no class


# --- a catalogue of bad inputs through the command lines ---------------------------------------------


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    from tiny_models import build_family

    return build_family("llama", tmp_path_factory.mktemp("exit_codes"), layers=2)


def linear(*models, params="weight: 1.0", extra=""):
    lines = ["merge_method: linear", "models:"]
    for model in models:
        lines += [f"  - model: {model}", f"    parameters: {{{params}}}"]
    return "\n".join(lines) + "\n" + extra


def ties(base, model, params):
    return f"merge_method: ties\nbase_model: {base}\nmodels:\n  - model: {model}\n    parameters: {{{params}}}\n"


def edited(tmp_path, source, edit) -> Path:
    """A copy of ``source`` changed by ``edit(directory)``."""
    model = copy_model(source, tmp_path / "edited")
    edit(model)
    return model


def rewrite_weights(model: Path, change) -> None:
    tensors = load_file(str(model / "model.safetensors"))
    change(tensors)
    save_file(tensors, str(model / "model.safetensors"))


def raw_header(model: Path, header: dict, body: bytes) -> None:
    data = json.dumps(header).encode()
    (model / "model.safetensors").write_bytes(struct.pack("<Q", len(data)) + data + body)


def evil_pickle(model: Path) -> None:
    (model / "model.safetensors").unlink()
    with zipfile.ZipFile(model / "pytorch_model.bin", "w") as archive:
        archive.writestr("archive/data.pkl", b"cos\nsystem\n(S'echo pwned'\ntR.")
        archive.writestr("archive/version", "3\n")


def set_config(**changes):
    def edit(model: Path) -> None:
        config = json.loads((model / "config.json").read_text())
        config.update(changes)
        (model / "config.json").write_text(json.dumps(config))

    return edit


def write(name: str, data: bytes):
    return lambda model: (model / name).write_bytes(data)


def symlink_out(name: str):
    def edit(model: Path) -> None:
        outside = model.parent / "outside.json"
        outside.write_text("{}")
        (model / name).unlink(missing_ok=True)
        (model / name).symlink_to(outside)

    return edit


def drop_tensor(name: str):
    return lambda model: rewrite_weights(model, lambda t: t.pop(name))


def widen(name: str):
    import torch

    return lambda model: rewrite_weights(
        model, lambda t: t.__setitem__(name, torch.zeros(t[name].shape[0] + 1, *t[name].shape[1:]))
    )


# Each case: (tool, recipe text built from (base, ft1, ft2, tmp_path), expected error class name).
CATALOGUE = {
    "yaml syntax": ("merge", lambda b, a, c, t: "merge_method: [linear\n", "RecipeError"),
    "yaml not a mapping": ("merge", lambda b, a, c, t: "- 1\n- 2\n", "RecipeError"),
    "unknown method": ("merge", lambda b, a, c, t: "merge_method: lineer\nmodels:\n  - model: x\n", "RecipeError"),
    "models not a list": ("merge", lambda b, a, c, t: f"merge_method: linear\nmodels: {a}\n", "RecipeError"),
    "weight not a number": ("merge", lambda b, a, c, t: linear(a, params="weight: heavy"), "RecipeError"),
    "negative density": ("merge", lambda b, a, c, t: ties(b, a, "weight: 1, density: -0.5"), "RecipeError"),
    "gamma above one": (
        "merge",
        lambda b, a, c, t: ties(b, a, "weight: 1, density: 0.5, gamma: 2").replace("ties", "breadcrumbs_ties", 1),
        "RecipeError",
    ),
    "della window": (
        "merge",
        lambda b, a, c, t: ties(b, a, "weight: 1, density: 0.9, epsilon: 0.3").replace("ties", "della", 1),
        "RecipeError",
    ),
    "empty recipe": ("merge", lambda b, a, c, t: "", "RecipeError"),
    "missing model": ("merge", lambda b, a, c, t: linear(t / "no-such-model"), "ModelNotFoundError"),
    "no config.json": (
        "merge",
        lambda b, a, c, t: linear(edited(t, a, lambda m: (m / "config.json").unlink())),
        "ModelNotFoundError",
    ),
    "no weights": (
        "merge",
        lambda b, a, c, t: linear(edited(t, a, lambda m: (m / "model.safetensors").unlink())),
        "ModelNotFoundError",
    ),
    "config not JSON": (
        "merge",
        lambda b, a, c, t: linear(edited(t, a, write("config.json", b"{oops"))),
        "TensorFileError",
    ),
    "truncated weights": (
        "merge",
        lambda b, a, c, t: linear(
            edited(
                t,
                a,
                lambda m: m.joinpath("model.safetensors").write_bytes(
                    m.joinpath("model.safetensors").read_bytes()[:-7]
                ),
            )
        ),
        "TensorFileError",
    ),
    "overlapping tensors": (
        "merge",
        lambda b, a, c, t: linear(
            edited(
                t,
                a,
                lambda m: raw_header(
                    m,
                    {
                        "x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                        "y": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
                    },
                    bytes(12),
                ),
            )
        ),
        "TensorFileError",
    ),
    "unsafe pickle": ("merge", lambda b, a, c, t: linear(edited(t, a, evil_pickle)), "UnsafePickleError"),
    "garbage tokenizer": (
        "merge",
        lambda b, a, c, t: linear(edited(t, a, write("tokenizer.json", b"garbage"))),
        "ModelFileError",
    ),
    "tokenizer symlinked out": (
        "merge",
        lambda b, a, c, t: linear(edited(t, a, symlink_out("tokenizer.json"))),
        "ModelFileError",
    ),
    "gptq model": (
        "merge",
        lambda b, a, c, t: linear(edited(t, a, set_config(quantization_config={"quant_method": "gptq"}))),
        "ModelFileError",
    ),
    "auto_map without code": (
        "merge",
        lambda b, a, c, t: linear(edited(t, a, set_config(auto_map={"AutoModelForCausalLM": "modeling_x.X"}))),
        "ModelFileError",
    ),
    "lora adapter missing": ("merge", lambda b, a, c, t: linear(f"{a}+{t / 'no-adapter'}"), "ModelNotFoundError"),
    "missing tensor": (
        "merge",
        lambda b, a, c, t: linear(edited(t, a, drop_tensor("model.layers.0.mlp.up_proj.weight")), c),
        "MissingTensorError",
    ),
    "shape mismatch": (
        "merge",
        lambda b, a, c, t: linear(edited(t, a, widen("model.layers.0.mlp.up_proj.weight")), c),
        "ShapeMismatchError",
    ),
    "weights sum to zero": (
        "merge",
        lambda b, a, c, t: (
            f"merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 1}}\n"
            f"  - model: {c}\n    parameters: {{weight: -1}}\n"
        ),
        "MergeError",
    ),
    "stack: missing model": (
        "stack",
        lambda b, a, c, t: (
            f"merge_method: passthrough\nslices:\n  - sources:\n      - model: {t / 'nope'}\n        layer_range: [0, 2]\n"
        ),
        "ModelNotFoundError",
    ),
    "stack: garbage tokenizer": (
        "stack",
        lambda b, a, c, t: (
            "merge_method: passthrough\nslices:\n  - sources:\n      - model: "
            f"{edited(t, a, write('tokenizer_config.json', b'[[['))}\n        layer_range: [0, 2]\n"
        ),
        "ModelFileError",
    ),
    "moe: quantized base": (
        "moe",
        lambda b, a, c, t: (
            f"base_model: {edited(t, b, set_config(quantization_config={'quant_method': 'awq'}))}\n"
            f"gate_mode: random\nexperts:\n  - source_model: {a}\n  - source_model: {c}\n"
        ),
        "ModelFileError",
    ),
}


@pytest.mark.parametrize("case", list(CATALOGUE))
def test_a_bad_input_exits_with_the_code_the_table_gives_its_class(family, tmp_path, case):
    base, (ft1, ft2) = family
    tool, recipe, expected = CATALOGUE[case]
    recipe_path = tmp_path / "recipe.yml"
    recipe_path.write_text(recipe(base, ft1, ft2, tmp_path))
    app = {"merge": merge_app, "stack": stack_app, "moe": moe_app}[tool]
    out = tmp_path / "out"
    result = CliRunner().invoke(app, [str(recipe_path), str(out), "--quiet"])
    code = documented_codes()[expected]
    assert result.exit_code == code, (
        f"{case}: exit {result.exit_code}, table says {code} for {expected}\n{result.output}"
    )
    assert "Traceback" not in result.output and "a bug in mksuite" not in result.output
    assert not out.exists()


@pytest.mark.parametrize(
    "argv, code",
    [
        (["RECIPE_MISSING", "OUT"], 2),
        (["RECIPE", "OUT", "--dtype", "float7"], 2),
        (["RECIPE", "OUT", "--shard-size", "lots"], 2),
        (["RECIPE", "EXISTING"], 8),
        (["RECIPE", "OUT", "--private"], 2),
        (["RECIPE", "OUT", "--push-to-hub", "not a/valid/repo id"], 2),
    ],
)
def test_bad_command_lines_exit_by_the_table(family, tmp_path, argv, code):
    _, (ft1, _) = family
    recipe = tmp_path / "r.yml"
    recipe.write_text(linear(ft1))
    (tmp_path / "existing").mkdir()
    (tmp_path / "existing" / "keep.txt").write_text("mine")
    names = {"RECIPE": str(recipe), "RECIPE_MISSING": str(tmp_path / "absent.yml"), "OUT": str(tmp_path / "o")}
    names["EXISTING"] = str(tmp_path / "existing")
    result = CliRunner().invoke(merge_app, [names.get(a, a) for a in argv] + ["--quiet"])
    assert result.exit_code == code, result.output
    assert (tmp_path / "existing" / "keep.txt").read_text() == "mine"
