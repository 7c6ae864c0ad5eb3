"""A recipe error that needs no tensor is reported without importing torch (so it comes in a blink).

Each case runs the real command line in a fresh interpreter, as a user's shell does, and
reports whether ``torch`` was in ``sys.modules`` when the process ended.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROBE = (
    "import atexit, sys\n"
    "atexit.register(lambda: sys.stderr.write('\\nTORCH=%s\\n' % ('torch' in sys.modules)))\n"
    "tool = sys.argv.pop(1)\n"
    "sys.argv = [tool, *sys.argv[1:]]\n"
    "from importlib import import_module\n"
    "import_module(tool + '.cli').main()\n"
)

# None of these models exists: each error must come before any model is looked up.
BAD_RECIPES = {
    "unknown method": ("merge_method: linaer\nmodels:\n  - model: ./a\n  - model: ./b\n", "linaer"),
    "bad field": (
        "merge_method: linear\nmodels:\n  - model: ./a\n    parameters: {weight: 1}\ndtype: float33\n",
        "dtype",
    ),
    "no models": ("merge_method: linear\nmodelz:\n  - model: ./a\n", "did you mean `models`"),
    "typo'd parameter": (
        "merge_method: ties\nbase_model: ./base\nmodels:\n  - model: ./a\n    parameters: {weight: 1, densty: 0.5}\n",
        "did you mean `density`",
    ),
    "negative density": (
        "merge_method: ties\nbase_model: ./base\nmodels:\n  - model: ./a\n    parameters: {weight: 1, density: -0.5}\n",
        "density -0.5 is negative",
    ),
    "gamma outside [0, 1] in a filter": (
        "merge_method: breadcrumbs\nbase_model: ./base\nmodels:\n  - model: ./a\n    parameters:\n"
        "      weight: 1\n      gamma:\n        - filter: mlp\n          value: [0.1, 1.5]\n        - value: 0.01\n",
        "gamma 1.5 is not a fraction between 0 and 1",
    ),
    "YAML syntax": ("merge_method: [linear\nmodels:\n", "not valid YAML"),
    "stage cycle": (
        "name: a\nmerge_method: linear\nmodels:\n  - model: b\n---\nname: b\nmerge_method: linear\nmodels:\n"
        "  - model: a\n",
        "cycle",
    ),
}


def _run(tmp_path, text: str, tool: str = "mkmerge", *options: str) -> subprocess.CompletedProcess:
    recipe = tmp_path / "bad.yml"
    recipe.write_text(text)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    command = [sys.executable, "-c", PROBE, tool, str(recipe), str(tmp_path / "out"), *options]
    return subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)


@pytest.mark.parametrize("case", sorted(BAD_RECIPES))
def test_a_recipe_error_does_not_import_torch(tmp_path, case):
    text, named = BAD_RECIPES[case]
    done = _run(tmp_path, text)
    assert done.returncode == 2, done.stderr
    assert named in done.stderr, done.stderr
    assert "TORCH=False" in done.stderr, done.stderr
    assert not (tmp_path / "out").exists()


BAD_MOE_CONFIGS = {
    "missing field": ("base_model: ./base\nexperts:\n  - source_modle: ./a\n", (), "source_model"),
    "unknown gate mode": ("base_model: ./base\ngate_mode: hiden\nexperts:\n  - source_model: ./a\n", (), "hiden"),
    "unknown layout": ("base_model: ./base\nexperts:\n  - source_model: ./a\n", ("--layout", "fuzed"), "fuzed"),
}


@pytest.mark.parametrize("case", sorted(BAD_MOE_CONFIGS))
def test_an_mkmoe_config_error_does_not_import_torch(tmp_path, case):
    text, options, named = BAD_MOE_CONFIGS[case]
    done = _run(tmp_path, text, "mkmoe", *options)
    assert done.returncode == 2, done.stderr
    assert named in done.stderr and "TORCH=False" in done.stderr, done.stderr


@pytest.mark.parametrize(
    ("text", "options", "named"),
    [
        ("merge_method: linear\nmodels:\n  - model: ./a\n    parameters: {weight: 1}\n", (), "passthrough"),
        ("merge_method: passthrough\nslices:\n  - sources:\n      - model: ./a\n", (), "layer_range"),
    ],
    ids=["not passthrough", "missing layer range"],
)
def test_an_mkstack_recipe_error_does_not_import_torch(tmp_path, text, options, named):
    done = _run(tmp_path, text, "mkstack", *options)
    assert done.returncode == 2, done.stderr
    assert named in done.stderr and "TORCH=False" in done.stderr, done.stderr


def test_a_valid_recipe_goes_on_to_the_models_which_may_need_torch(tmp_path):
    # the probe itself can see torch: a recipe that parses reaches the model lookup (exit 3 here)
    done = _run(tmp_path, "merge_method: linear\nmodels:\n  - model: ./a\n    parameters: {weight: 1}\n")
    assert done.returncode == 3, done.stderr
    assert "TORCH=True" in done.stderr, done.stderr


def test_the_registry_lists_methods_without_importing_their_math():
    code = (
        "import sys\n"
        "from mkmerge.methods import METHODS, method_parameters, parameter_names\n"
        "names = list(METHODS)\n"
        "assert 'ties' in names and 'density' in parameter_names()\n"
        "assert [s.name for s in method_parameters('slerp')] == ['t']\n"
        "print('torch' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "False", done.stderr


def test_the_catalogue_and_the_method_modules_agree():
    import importlib

    from mkmerge.methods import METHODS, catalogue

    for name in catalogue.BUILTIN:
        module = importlib.import_module(catalogue.declaring_module(name))
        declared = {method.name: method for method in module.MERGE_METHODS}
        assert name in declared, f"{module.__name__} does not declare {name}"
        assert declared[name].parameters == catalogue.parameters(name)
        assert METHODS[name] is declared[name]
