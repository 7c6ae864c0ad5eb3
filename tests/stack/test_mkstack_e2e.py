"""mkstack end to end on tiny checkpoints: exact layer maps, identity expansion, loadable configs, clean refusals."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from mkmerge.methods import METHODS
from mkmerge.plan import plan_merge
from mkmerge.recipe import parse_recipe
from mkstack.cli import stack_app

from run_helpers import invoke
from tiny_models import read_tensors

TOKENS = [1, 5, 9, 14, 3, 7, 22, 40]
LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
OUTPUT_PROJECTIONS = ("o_proj.", "down_proj.", "c_proj.", "attention.dense.", "dense_4h_to_h.")
NUMBERED = re.compile(r"^(.*?\.)(\d+)(\..*)$")  # the first .N. segment is the layer index


tensors_of = read_tensors


def cli(*args, quiet: bool = True):
    return invoke(stack_app, *args, quiet=quiet)


def expected_stack(layer_map, first, last) -> dict[str, torch.Tensor]:
    """What a passthrough stack must hold: layer j of the output is layer_map[j] = (tensors, layer)."""
    expected = {}
    for name, tensor in first.items():
        if "embed_tokens" in name:
            expected[name] = tensor
    for name, tensor in last.items():
        if not name.startswith("model.layers.") and "embed_tokens" not in name:
            expected[name] = tensor
    for j, (tensors, layer) in enumerate(layer_map):
        for name, tensor in tensors.items():
            match = LAYER.match(name)
            if match and int(match[1]) == layer:
                expected[f"model.layers.{j}.{match[2]}"] = tensor
    return expected


# --- layer maps ---------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "gemma2"])
def test_slice_mode_copies_each_layer_bit_for_bit_in_the_requested_order(tiny_family, tmp_path, arch):
    _, (a, b) = tiny_family(arch)
    out = tmp_path / "out"
    result = cli(out, "--model", f"a={a}", "--slice", "a:0-2", "--slice", f"{b}:1-3", "--slice", "a:2-3")
    assert result.exit_code == 0, result.output
    ta, tb = tensors_of(a), tensors_of(b)
    expected = expected_stack([(ta, 0), (ta, 1), (tb, 1), (tb, 2), (ta, 2)], first=ta, last=ta)
    got = tensors_of(out)
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 5


def test_recipe_mode_applies_per_source_scale_filters_exactly(tiny_family, tmp_path):
    _, (a, b) = tiny_family("llama")
    recipe = tmp_path / "stack.yml"
    recipe.write_text(
        "merge_method: passthrough\nslices:\n"
        f"  - sources:\n      - model: {a}\n        layer_range: [0, 2]\n"
        f"  - sources:\n      - model: {b}\n        layer_range: [2, 3]\n"
        "        parameters:\n          scale:\n            - filter: down_proj\n              value: 0.5\n"
        "            - value: 1.0\n"
    )
    out = tmp_path / "out"
    result = cli(recipe, out)
    assert result.exit_code == 0, result.output
    ta, tb = tensors_of(a), tensors_of(b)
    got = tensors_of(out)
    expected = expected_stack([(ta, 0), (ta, 1), (tb, 2)], first=ta, last=tb)
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        want = tensor * 0.5 if name.startswith("model.layers.2.") and "down_proj" in name else tensor
        assert torch.equal(got[name], want), name
    assert (out / "mergekit_config.yml").read_text() == recipe.read_text()


def test_repeated_source_layers_are_read_for_each_use_and_written_as_copies(tiny_model, tmp_path, tensor_reads):
    a = tiny_model("llama", layers=4)
    out = tmp_path / "out"
    assert cli(out, "--upscale", a, "--overlap", 1).exit_code == 0  # [0,3) + [1,4): layers 1, 2 twice
    # A repeated layer is read again where it is used again rather than held in memory from
    # its first use to its last (which, in a SOLAR-style stack, is half the model later).
    assert set(tensor_reads) == set(tensors_of(a))
    assert len(tensor_reads) == len(tensors_of(out))
    got, ta = tensors_of(out), tensors_of(a)
    for j, layer in enumerate([0, 1, 2, 1, 2, 3]):
        assert torch.equal(got[f"model.layers.{j}.mlp.up_proj.weight"], ta[f"model.layers.{layer}.mlp.up_proj.weight"])


def test_a_stack_copies_stored_bytes_file_to_file_without_loading_any_tensor(tiny_model, tmp_path, monkeypatch):
    from mksuite.common.loading import SafetensorsFile

    a, b = tiny_model("llama", layers=4), tiny_model("llama", layers=4, seed=1)
    for method in ("load", "load_rows"):
        monkeypatch.setattr(SafetensorsFile, method, lambda self, name, *rows: pytest.fail(f"{name} was loaded"))
    out = tmp_path / "out"
    assert cli(out, "--slice", f"{a}:0-3", "--slice", f"{b}:1-4").exit_code == 0
    monkeypatch.undo()
    got, ta, tb = tensors_of(out), tensors_of(a), tensors_of(b)
    assert len(got) == len(ta) + 2 * 9  # 6 layers of 9 tensors from 4
    for j, (source, layer) in enumerate([(ta, 0), (ta, 1), (ta, 2), (tb, 1), (tb, 2), (tb, 3)]):
        for name in ("self_attn.q_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight"):
            assert torch.equal(got[f"model.layers.{j}.{name}"], source[f"model.layers.{layer}.{name}"])
    assert torch.equal(got["model.embed_tokens.weight"], ta["model.embed_tokens.weight"])


# --- block expansion ----------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2", "gpt2", "gpt_neox"])
def test_block_expansion_computes_exactly_what_the_original_model_computes(tiny_model, tmp_path, arch):
    from tiny_models import load_causal_lm, logits

    a = tiny_model(arch, layers=4)
    out = tmp_path / "out"
    result = cli(out, "--expand", a, "--every", 2)  # layers 0 1 1' 2 3 3'
    assert result.exit_code == 0, result.output
    expanded = load_causal_lm(out)
    assert expanded.config.num_hidden_layers == 6
    torch.testing.assert_close(logits(expanded, TOKENS), logits(load_causal_lm(a), TOKENS), rtol=0, atol=1e-5)
    source_layer, inserted = [0, 1, 1, 2, 3, 3], {2, 5}
    original, zeroed = tensors_of(a), 0
    for name, tensor in tensors_of(out).items():
        match = NUMBERED.match(name)
        if match is None:
            assert torch.equal(tensor, original[name]), name
            continue
        j = int(match[2])
        source = original[f"{match[1]}{source_layer[j]}{match[3]}"]
        if j in inserted and any(f in name for f in OUTPUT_PROJECTIONS):
            assert tensor.shape == source.shape and not tensor.any(), name
            zeroed += 1
        else:
            assert torch.equal(tensor, source), name
    assert zeroed >= 4  # attention and MLP output projections of both inserted layers


# --- config.json ----------------------------------------------------------------------------


def test_gemma2_layer_types_follow_the_source_layers_and_the_stack_loads(tiny_model, tmp_path):
    from tiny_models import load_causal_lm, logits

    g = tiny_model("gemma2", layers=4)  # sliding, full, sliding, full
    out = tmp_path / "out"
    assert cli(out, "--slice", f"{g}:1-4", "--slice", f"{g}:0-2").exit_code == 0
    expected = ["full_attention", "sliding_attention", "full_attention", "sliding_attention", "full_attention"]
    assert json.loads((out / "config.json").read_text())["layer_types"] == expected
    model = load_causal_lm(out)
    assert model.config.layer_types == expected
    windows = [layer.self_attn.sliding_window for layer in model.model.layers]
    assert windows == [None, 16, None, 16, None]
    assert torch.isfinite(logits(model, TOKENS)).all()


def test_layer_types_implied_by_a_config_without_them_are_written_out(tiny_model, tmp_path):
    from tiny_models import copy_model, load_causal_lm

    g = copy_model(tiny_model("gemma2", layers=4), tmp_path / "g")
    config = json.loads((g / "config.json").read_text())
    del config["layer_types"]  # as in configs saved before transformers wrote the list
    (g / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    assert cli(out, "--upscale", g, "--overlap", 1).exit_code == 0  # layers 0,1,2,1,2,3
    s, f = "sliding_attention", "full_attention"
    assert load_causal_lm(out).config.layer_types == [s, f, s, f, s, f]


# --- --print-recipe -------------------------------------------------------------------------


def test_printed_recipe_is_the_recipe_that_runs(tiny_family, tmp_path):
    _, (a, b) = tiny_family("llama", layers=4)
    mode = ["--interleave", a, b, "--window", 2, "--overlap", 1, "--out-dtype", "bfloat16"]
    printed = cli("--print-recipe", *mode)
    assert printed.exit_code == 0, printed.output
    recipe = parse_recipe(printed.stdout, known_methods=METHODS.keys())
    assert [(str(s.sources[0].model), *s.sources[0].layer_range) for s in recipe.slices] == [
        (str(a), 0, 2), (str(b), 1, 3), (str(a), 3, 4)
    ]  # fmt: skip
    out = tmp_path / "out"
    assert cli(out, *mode).exit_code == 0
    assert (out / "mergekit_config.yml").read_text() == printed.stdout
    plan = plan_merge(recipe)
    got = tensors_of(out)
    assert sorted(got) == sorted(o.name for o in plan.outputs)
    assert all(got[o.name].dtype == o.dtype == torch.bfloat16 for o in plan.outputs)
    assert not (tmp_path / "never").exists()


def test_interleave_print_recipe_on_80_layer_models_gives_goliaths_137_layers(tiny_model):
    a = tiny_model("llama", layers=80, hidden=8, vocab=16, tokenizer=False)
    b = tiny_model("llama", layers=80, hidden=8, vocab=16, tokenizer=False, seed=1)
    printed = cli("--print-recipe", "--interleave", a, b, "--window", 16, "--overlap", 8)
    assert printed.exit_code == 0, printed.output
    recipe = parse_recipe(printed.stdout, known_methods=METHODS.keys())
    assert sum(s.num_layers for s in recipe.slices) == 137
    assert [tuple(s.sources[0].layer_range) for s in recipe.slices][:3] == [(0, 16), (8, 24), (17, 32)]


def test_the_plan_table_is_shown_before_running(tiny_model, tmp_path):
    a = tiny_model("llama", layers=4)
    result = cli(tmp_path / "out", "--expand", a, "--every", 4, quiet=False)
    assert result.exit_code == 0, result.output
    assert "layer map: 5 output layers" in result.stderr and "[3, 4)" in result.stderr


# --- refusals -------------------------------------------------------------------------------


def refused(result, exit_code: int, *fragments: str, out: Path, reads: list) -> None:
    text = " ".join(result.output.split())
    assert result.exit_code == exit_code, result.output
    for fragment in fragments:
        assert fragment in text, text
    assert not out.exists()
    assert reads == []


def test_a_good_run_does_read_tensors_through_the_watched_loader(tiny_model, tmp_path, tensor_reads):
    assert cli(tmp_path / "out", "--slice", f"{tiny_model('llama')}:0-1").exit_code == 0
    assert tensor_reads  # so the empty lists in the refusal tests mean something


@pytest.mark.parametrize("bad, message", [("0-4", "has 3 layers"), ("2-2", "selects no layers")])
def test_slice_out_of_bounds_or_empty_is_refused_before_any_tensor_is_read(
    tiny_model, tmp_path, tensor_reads, bad, message
):
    a = tiny_model("llama")
    out = tmp_path / "out"
    result = cli(out, "--model", f"a={a}", "--slice", "a:0-1", "--slice", f"a:{bad}")
    refused(result, 2, message, f"--slice a:{bad}", out=out, reads=tensor_reads)


def test_recipe_range_out_of_bounds_is_refused_with_its_line(tiny_model, tmp_path, tensor_reads):
    a = tiny_model("llama")
    recipe = tmp_path / "r.yml"
    recipe.write_text(
        f"merge_method: passthrough\nslices:\n  - sources:\n      - model: {a}\n        layer_range: [1, 9]\n"
    )
    out = tmp_path / "out"
    refused(cli(recipe, out), 2, "r.yml:5", "out of bounds", out=out, reads=tensor_reads)


def test_models_of_different_hidden_size_are_refused_naming_both_and_the_field(tiny_model, tmp_path, tensor_reads):
    small, large = tiny_model("llama", hidden=32), tiny_model("llama", hidden=64)
    out = tmp_path / "out"
    result = cli(out, "--slice", f"{small}:0-2", "--slice", f"{large}:2-3")
    refused(result, 6, "hidden_size = 32", "hidden_size = 64", out=out, reads=tensor_reads)
    assert str(small) in result.output.replace("\n", "") and str(large) in result.output.replace("\n", "")


def test_mixed_architectures_need_allow_crimes(tiny_model, tmp_path, tensor_reads):
    llama, mistral = tiny_model("llama"), tiny_model("mistral")
    out = tmp_path / "out"
    args = [out, "--slice", f"{llama}:0-2", "--slice", f"{mistral}:2-3", "--slice", f"{llama}:2-3"]
    refused(cli(*args), 5, "different architectures", "--allow-crimes", out=out, reads=tensor_reads)
    assert cli(*args, "--allow-crimes").exit_code == 0
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 4


def test_an_architecture_without_a_definition_is_refused(tiny_model, tmp_path, tensor_reads):
    from tiny_models import copy_model

    odd = copy_model(tiny_model("llama"), tmp_path / "odd")
    config = json.loads((odd / "config.json").read_text())
    config.update(architectures=["OddForCausalLM"], model_type="odd")
    (odd / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    result = cli(out, "--upscale", odd, "--overlap", 1)
    fragments = ("OddForCausalLM", "no architecture definition", "architectures/odd.json")
    refused(result, 5, *fragments, out=out, reads=tensor_reads)
    assert "inferred" not in result.output  # the engine's inference warning is not shown for a refused input


def test_a_non_passthrough_recipe_is_sent_to_mkmerge(tiny_model, tmp_path, tensor_reads):
    recipe = tmp_path / "linear.yml"
    model = tiny_model("llama")
    recipe.write_text(f"merge_method: linear\nmodels:\n  - model: {model}\n    parameters: {{weight: 1}}\n")
    out = tmp_path / "out"
    refused(cli(recipe, out), 2, "`linear`", "mkmerge", out=out, reads=tensor_reads)


def test_interleaving_models_of_different_depth_is_refused(tiny_model, tmp_path, tensor_reads):
    out = tmp_path / "out"
    three, four = tiny_model("llama", layers=3), tiny_model("llama", layers=4)
    result = cli(out, "--interleave", three, four, "--window", 2, "--overlap", 1)
    refused(result, 2, "equal depth", out=out, reads=tensor_reads)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--upscale", "A", "--every", "2"], "--every applies to --expand"),
        (["--upscale", "A", "--slice", "A:0-1"], "cannot be combined"),
        (["--expand", "A"], "--expand needs --every"),
        (["recipe.yml"], "missing OUT"),
        (["x", "y", "--upscale", "A", "--overlap", "1"], "only positional argument is OUT"),
    ],
)
def test_inconsistent_command_lines_are_refused_before_opening_models(tmp_path, args, message):
    result = cli(*args)
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())
