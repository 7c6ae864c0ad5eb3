"""mkmerge end to end on tiny real checkpoints: files in, a model transformers loads out."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from mkmerge.cli import merge_app

from run_helpers import invoke, merge_recipe
from tiny_models import read_tensors

ARCHS = ("llama", "mistral", "qwen2", "gemma2")


merge = merge_recipe
tensors_of = read_tensors


def cli(*args: str):
    return invoke(merge_app, *args)


def check_loads_and_runs(path: Path) -> torch.Tensor:
    from tiny_models import load_causal_lm, logits

    model = load_causal_lm(path)
    out = logits(model, [1, 5, 9, 14, 3, 7])
    assert torch.isfinite(out).all()
    return out


RECIPES = {
    "linear": "merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 0.7}}\n"
    "  - model: {b}\n    parameters: {{weight: 0.3}}\n",
    "slerp": "merge_method: slerp\nbase_model: {base}\nmodels:\n  - model: {a}\nparameters:\n  t: [0, 0.3, 1]\n",
    "task_arithmetic": "merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n  - model: {a}\n"
    "    parameters: {{weight: 0.6}}\n  - model: {b}\n    parameters: {{weight: 0.4}}\n",
    "ties": "merge_method: ties\nbase_model: {base}\nmodels:\n  - model: {a}\n    parameters: {{weight: 0.6, density: 0.5}}\n"
    "  - model: {b}\n    parameters: {{weight: 0.4, density: 0.7}}\n",
    "dare_linear": "merge_method: dare_linear\nbase_model: {base}\nmodels:\n  - model: {a}\n"
    "    parameters: {{weight: 0.5, density: 0.6}}\n  - model: {b}\n    parameters: {{weight: 0.5, density: 0.6}}\n",
    "dare_ties": "merge_method: dare_ties\nbase_model: {base}\nmodels:\n  - model: {a}\n"
    "    parameters: {{weight: 0.5, density: 0.6}}\n  - model: {b}\n    parameters: {{weight: 0.5, density: 0.6}}\n",
    "passthrough": "merge_method: passthrough\nmodels:\n  - model: {a}\n    parameters:\n      scale:\n"
    "        - filter: down_proj\n          value: 0.5\n        - value: 1\n",
    "breadcrumbs": "merge_method: breadcrumbs\nbase_model: {base}\nmodels:\n  - model: {a}\n"
    "    parameters: {{weight: 0.6, density: 0.8, gamma: 0.05}}\n  - model: {b}\n    parameters: {{weight: 0.4, density: 0.9}}\n",
    "breadcrumbs_ties": "merge_method: breadcrumbs_ties\nbase_model: {base}\nmodels:\n  - model: {a}\n"
    "    parameters: {{weight: 0.6, density: 0.8}}\n  - model: {b}\n    parameters: {{weight: 0.4, density: 0.9}}\n",
    "della": "merge_method: della\nbase_model: {base}\nmodels:\n  - model: {a}\n"
    "    parameters: {{weight: 0.5, density: 0.6}}\n  - model: {b}\n    parameters: {{weight: 0.5, density: 0.5, epsilon: 0.3}}\n",
    "della_linear": "merge_method: della_linear\nbase_model: {base}\nmodels:\n  - model: {a}\n"
    "    parameters: {{weight: 0.5, density: 0.6}}\n  - model: {b}\n    parameters: {{weight: 0.5, density: 0.6}}\n",
    "sce": "merge_method: sce\nbase_model: {base}\nmodels:\n  - model: {a}\n  - model: {b}\n"
    "parameters:\n  select_topk: 0.4\n",
    "ram": "merge_method: ram\nbase_model: {base}\nmodels:\n  - model: {a}\n  - model: {b}\n",
    "ramplus_tl": "merge_method: ramplus_tl\nbase_model: {base}\nmodels:\n  - model: {a}\n  - model: {b}\n"
    "parameters:\n  r: 0.2\n",
}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", sorted(RECIPES))
def test_every_method_output_loads_in_transformers_with_finite_logits(tiny_family, tmp_path, arch, method):
    base, (a, b) = tiny_family(arch)
    out = merge(RECIPES[method].format(base=base, a=a, b=b), tmp_path / "out")
    check_loads_and_runs(out)
    merged, reference = tensors_of(out), tensors_of(a)
    assert merged.keys() == reference.keys()
    assert all(merged[k].shape == reference[k].shape for k in merged)


@pytest.mark.parametrize("arch", ARCHS)
def test_linear_with_weights_one_and_zero_reproduces_model_a_bit_for_bit(tiny_family, tmp_path, arch):
    _, (a, b) = tiny_family(arch)
    recipe = (
        f"merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 1.0}}\n"
        f"  - model: {b}\n    parameters: {{weight: 0.0}}\n"
    )
    merged, original = tensors_of(merge(recipe, tmp_path / "out")), tensors_of(a)
    assert merged.keys() == original.keys()
    for name, tensor in original.items():
        assert merged[name].dtype == tensor.dtype
        assert torch.equal(merged[name], tensor), name


def test_task_arithmetic_equals_the_plain_formula_on_every_tensor(tiny_family, tmp_path):
    base, (a, b) = tiny_family("llama")
    recipe = RECIPES["task_arithmetic"].format(base=base, a=a, b=b)
    merged = tensors_of(merge(recipe, tmp_path / "out"))
    tb, ta, tbb = tensors_of(base), tensors_of(a), tensors_of(b)
    for name, w in tb.items():
        expected = w + ((ta[name] - w) * 0.6 + (tbb[name] - w) * 0.4)
        assert torch.equal(merged[name], expected), name


def test_ties_matches_an_independent_trim_elect_merge(tiny_family, tmp_path):
    base, (a, b) = tiny_family("qwen2")
    merged = tensors_of(merge(RECIPES["ties"].format(base=base, a=a, b=b), tmp_path / "out"))
    tb, models = tensors_of(base), [(tensors_of(a), 0.6, 0.5), (tensors_of(b), 0.4, 0.7)]
    for name, w in tb.items():
        trimmed = []
        for tensors, weight, density in models:
            delta = (tensors[name] - w).flatten()
            k = int(density * delta.numel())
            keep = torch.zeros_like(delta)
            keep[torch.argsort(delta.abs(), descending=True, stable=False)[:k]] = 1
            trimmed.append(weight * delta * keep)
        total = trimmed[0] + trimmed[1]
        sign = torch.where(total >= 0, 1.0, -1.0)
        agree = [(t.sign() == sign) for t in trimmed]
        summed = sum(t * m for t, m in zip(trimmed, agree))
        divisor = sum(weight * m for (_, weight, _), m in zip(models, agree))
        divisor = torch.where(divisor == 0, torch.ones_like(divisor), divisor)
        expected = w + (summed / divisor).reshape(w.shape)
        torch.testing.assert_close(merged[name], expected, rtol=0, atol=2e-7, msg=name)


def test_slerp_gradient_gives_the_base_at_t0_and_the_other_model_at_t1(tiny_family, tmp_path):
    base, (a, _) = tiny_family("llama", layers=3)
    merged = tensors_of(merge(RECIPES["slerp"].format(base=base, a=a), tmp_path / "out"))
    tb, ta = tensors_of(base), tensors_of(a)
    for name in tb:
        if ".layers.0." in name or "layers" not in name:  # layer 0 and pre/post weights evaluate at t = 0
            assert torch.equal(merged[name], tb[name]), name
        elif ".layers.2." in name:  # last layer of the only slice: t = 1
            assert torch.equal(merged[name], ta[name]), name
    # the middle layer sits at t = 0.3 on the arc between the two (float64 reference)
    name = "model.layers.1.mlp.up_proj.weight"
    x, y = tb[name].double().flatten(), ta[name].double().flatten()
    cosine = float((x / x.norm()) @ (y / y.norm()))
    if abs(cosine) > 0.9995:  # nearly parallel: slerp's linear fallback
        expected = 0.7 * x + 0.3 * y
    else:
        theta = math.acos(cosine)
        expected = (math.sin(0.7 * theta) * x + math.sin(0.3 * theta) * y) / math.sin(theta)
    torch.testing.assert_close(merged[name].double().flatten(), expected, rtol=1e-5, atol=1e-6)


def test_filtered_parameters_pick_values_by_tensor_name(tiny_family, tmp_path):
    base, (a, _) = tiny_family("llama")
    recipe = (
        f"merge_method: slerp\nbase_model: {base}\nmodels:\n  - model: {a}\n"
        "parameters:\n  t:\n    - filter: self_attn\n      value: 0\n    - value: 1\n"
    )
    merged, tb, ta = tensors_of(merge(recipe, tmp_path / "out")), tensors_of(base), tensors_of(a)
    for name in merged:
        expected = tb[name] if "self_attn" in name else ta[name]
        assert torch.equal(merged[name], expected), name


def test_slices_renumber_layers_and_set_the_output_depth(tiny_family, tmp_path):
    _, (a, b) = tiny_family("llama", layers=3)
    recipe = (
        "merge_method: passthrough\nslices:\n"
        f"  - sources:\n      - model: {a}\n        layer_range: [0, 2]\n"
        f"  - sources:\n      - model: {b}\n        layer_range: [1, 3]\n"
    )
    out = merge(recipe, tmp_path / "out")
    merged, ta, tbb = tensors_of(out), tensors_of(a), tensors_of(b)
    mapping = {0: (ta, 0), 1: (ta, 1), 2: (tbb, 1), 3: (tbb, 2)}
    for out_layer, (source, in_layer) in mapping.items():
        for name in (n for n in source if f".layers.{in_layer}." in n):
            assert torch.equal(merged[name.replace(f".layers.{in_layer}.", f".layers.{out_layer}.")], source[name])
    assert torch.equal(merged["model.embed_tokens.weight"], ta["model.embed_tokens.weight"])  # first slice
    assert torch.equal(merged["model.norm.weight"], tbb["model.norm.weight"])  # last slice
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 4
    check_loads_and_runs(out)


def test_sharded_single_file_and_bin_inputs_merge_identically(tiny_family, tmp_path):
    results = []
    for fmt in ("safetensors", "sharded", "bin", "sharded_bin"):
        base, (a, b) = tiny_family("llama", fmt=fmt)
        out = merge(RECIPES["ties"].format(base=base, a=a, b=b), tmp_path / fmt)
        results.append(tensors_of(out))
    for other in results[1:]:
        assert other.keys() == results[0].keys()
        assert all(torch.equal(other[k], results[0][k]) for k in other)


def test_tied_embedding_model_stays_tied(tiny_family, tmp_path):
    base, (a, b) = tiny_family("llama", tie=True)
    out = merge(RECIPES["ties"].format(base=base, a=a, b=b), tmp_path / "out")
    merged = tensors_of(out)
    assert "lm_head.weight" not in merged
    model_logits = check_loads_and_runs(out)
    from tiny_models import load_causal_lm

    model = load_causal_lm(out)
    assert torch.equal(model.lm_head.weight, merged["model.embed_tokens.weight"])
    assert model_logits.shape[-1] == merged["model.embed_tokens.weight"].shape[0]


def test_recipe_dtype_sets_the_compute_dtype_and_out_dtype_only_the_stored_one(tiny_family, tmp_path):
    base, (a, b) = tiny_family("llama")
    recipe = RECIPES["ties"].format(base=base, a=a, b=b)
    bf16 = tensors_of(merge(recipe + "dtype: bfloat16\n", tmp_path / "bf16"))
    f32_then_cast = tensors_of(merge(recipe + "dtype: float32\nout_dtype: bfloat16\n", tmp_path / "f32"))
    name = "model.layers.0.mlp.down_proj.weight"
    assert bf16[name].dtype == f32_then_cast[name].dtype == torch.bfloat16
    assert not torch.equal(bf16[name], f32_then_cast[name])  # different math, not just a different cast
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert config.get("torch_dtype", config.get("dtype")) == "bfloat16"


@pytest.mark.parametrize("method", ["dare_ties", "della"])
def test_random_masks_do_not_depend_on_threads_but_on_the_seed(tiny_family, tmp_path, method):
    base, (a, b) = tiny_family("llama")
    recipe = RECIPES[method].format(base=base, a=a, b=b)
    one = tensors_of(merge(recipe, tmp_path / "t1", threads=1, seed=7))
    two = tensors_of(merge(recipe, tmp_path / "t2", threads=2, seed=7))
    other_seed = tensors_of(merge(recipe, tmp_path / "s8", threads=2, seed=8))
    assert all(torch.equal(one[k], two[k]) for k in one)
    assert any(not torch.equal(one[k], other_seed[k]) for k in one)


def test_output_directory_holds_config_tokenizer_card_and_recipe(tiny_family, tmp_path):
    base, (a, b) = tiny_family("llama")
    text = RECIPES["ties"].format(base=base, a=a, b=b)
    recipe_file = tmp_path / "recipe.yml"
    recipe_file.write_text(text)
    out = tmp_path / "out"
    result = cli(recipe_file, out, "--shard-size", "20k")
    assert result.exit_code == 0, result.output
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "tokenizer.json", "tokenizer_config.json", "README.md", "mergekit_config.yml"} <= names
    assert "model.safetensors.index.json" in names and len([n for n in names if n.startswith("model-")]) > 1
    assert (out / "mergekit_config.yml").read_text() == text
    card = (out / "README.md").read_text()
    assert "TIES" in card and text.strip() in card and str(base) in card
    from transformers import AutoTokenizer

    assert (
        AutoTokenizer.from_pretrained(out)("hello world")["input_ids"]
        == AutoTokenizer.from_pretrained(base)("hello world")["input_ids"]
    )
    check_loads_and_runs(out)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def _cache_model(cache: Path, repo_id: str, model_dir: Path, commit: str) -> None:
    """Lay a local model out as a huggingface_hub cache snapshot (blobs + symlinks + refs)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    for file in model_dir.iterdir():
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / file.name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(f"../../blobs/{blob.name}")
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)


def test_hub_repo_ids_resolve_through_the_local_cache_offline(tiny_family, tmp_path):
    base, (a, b) = tiny_family("llama")
    cache = tmp_path / "hub"
    _cache_model(cache, "org/base", base, "a" * 40)
    _cache_model(cache, "org/ft-a", a, "b" * 40)
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(
        "merge_method: task_arithmetic\nbase_model: org/base\nmodels:\n"
        f"  - model: org/ft-a@{'b' * 40}\n    parameters: {{weight: 1.0}}\n"
    )
    result = cli(recipe, tmp_path / "out", "--cache-dir", cache)
    assert result.exit_code == 0, result.output
    assert torch.equal(tensors_of(tmp_path / "out")["model.norm.weight"], tensors_of(a)["model.norm.weight"])
    assert "org/base" in (tmp_path / "out" / "README.md").read_text()


def test_interrupted_run_leaves_no_output(tiny_family, tmp_path, monkeypatch):
    base, (a, b) = tiny_family("llama")
    from mksuite.common.writing import safetensors_writer

    calls = []
    original = safetensors_writer.ShardedWriter.write

    def failing_write(self, name, tensor, rows=None):
        calls.append(name)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return original(self, name, tensor, rows)

    monkeypatch.setattr(safetensors_writer.ShardedWriter, "write", failing_write)
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(RECIPES["linear"].format(a=a, b=b))
    result = cli(recipe, tmp_path / "out")
    assert result.exit_code == 130
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yml"]


def test_summary_line_and_quiet(tiny_family, tmp_path):
    _, (a, b) = tiny_family("llama")
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(RECIPES["linear"].format(a=a, b=b))
    loud = CliRunner().invoke(merge_app, [str(recipe), str(tmp_path / "loud")])
    assert loud.exit_code == 0 and "merged 2 models with linear" in loud.output
    quiet = cli(recipe, tmp_path / "quiet")
    assert quiet.exit_code == 0 and quiet.output == ""
    shutil.rmtree(tmp_path / "loud")


def test_unknown_architecture_is_inferred_from_tensor_names_with_a_warning(tiny_family, tmp_path):
    from tiny_models import copy_model

    _, (a, b) = tiny_family("llama")
    renamed = []
    for source in (a, b):
        model = copy_model(source, tmp_path / source.name)
        config = json.loads((model / "config.json").read_text())
        config.update(architectures=["HomebrewForCausalLM"], model_type="homebrew")
        (model / "config.json").write_text(json.dumps(config))
        renamed.append(model)
    recipe = RECIPES["linear"].format(a=renamed[0], b=renamed[1])
    with pytest.warns(UserWarning, match="inferred one from tensor names"):
        merged = tensors_of(merge(recipe, tmp_path / "out"))
    ta, tbb = tensors_of(a), tensors_of(b)
    assert merged.keys() == ta.keys()
    name = "model.layers.2.self_attn.q_proj.weight"
    # float32 weights, a float32 product, then a fused multiply-add (exact in float64 here)
    w = torch.tensor([0.7, 0.3])
    first = (ta[name].double() * w[0].item()).float()
    assert w.sum().item() == 1.0
    assert torch.equal(merged[name], (tbb[name].double() * w[1].item() + first.double()).float())


@pytest.mark.parametrize("method", ["breadcrumbs_ties", "della_linear"])
def test_new_task_vector_members_cut_a_larger_vocabulary_to_the_base(tiny_family, tiny_model, tmp_path, method):
    base, (a, _) = tiny_family("llama")
    bigger = tiny_model("llama", vocab=160, seed=6)
    recipe = RECIPES[method].format(base=base, a=a, b=bigger)
    with pytest.warns(UserWarning, match=r"different vocabulary sizes \(\[128, 160\] rows\); UNSAFE: cutting to 128"):
        merged = tensors_of(merge(recipe, tmp_path / "out", unsafe_truncate_embeddings=True))
    assert merged["model.embed_tokens.weight"].shape == (128, 32)
    check_loads_and_runs(tmp_path / "out")
