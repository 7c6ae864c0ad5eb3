"""Tokenizer, generation and processor files must parse before any work; custom code travels with the config."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from mkmerge.cli import merge_app
from mksuite.common.errors import ModelFileError
from mksuite.common.loading import open_model

from tiny_models import copy_model, load_causal_lm, logits


@pytest.fixture
def model(tiny_model, tmp_path):
    return copy_model(tiny_model("llama", layers=2), tmp_path / "m")


def merge(tmp_path: Path, model: Path, *options: str):
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(f"merge_method: linear\nmodels:\n  - model: {model}\n    parameters: {{weight: 1.0}}\n")
    out = tmp_path / "out"
    return CliRunner().invoke(merge_app, [str(recipe), str(out), "--quiet", *options]), out


GARBAGE = {
    "tokenizer.json": (b"\x00\x01 not json", "not valid JSON"),
    "tokenizer.json ": (b'{"version": "1.0", "model": {"type": "Nonsense"}}', "`tokenizers` library"),
    "tokenizer.json  ": (b"[1, 2, 3]", "not an object"),
    "tokenizer.json   ": (b"", "not valid JSON"),
    "tokenizer_config.json": (b"{'single': 'quotes'}", "not valid JSON"),
    "special_tokens_map.json": (b'{"bos_token": "<s>",}', "not valid JSON"),
    "generation_config.json": (b"\xff\xfe{}", "not UTF-8"),
    "added_tokens.json": (b"null", "not an object"),
    "preprocessor_config.json": (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    "chat_template.jinja": (b"{% for x in %}{{ x }", "not a valid Jinja chat template"),
    "tokenizer.model": (b"this is not a protobuf", "not a sentencepiece model"),
    "merges.txt": (b"\xc3\x28 invalid utf-8", "not UTF-8"),
}


@pytest.mark.parametrize("case", list(GARBAGE))
def test_a_garbage_companion_file_is_refused_before_any_tensor_is_read(model, tmp_path, case, no_tensor_reads):
    name = case.strip()
    data, fragment = GARBAGE[case]
    (model / name).write_bytes(data)
    with pytest.raises(ModelFileError) as caught:
        open_model(model)
    assert str(model / name) in caught.value.message and fragment in caught.value.message
    result, out = merge(tmp_path, model)
    assert result.exit_code == 4, result.output
    assert name in result.output and "Traceback" not in result.output and not out.exists()


def test_a_directory_where_a_tokenizer_file_should_be_is_refused(model):
    (model / "tokenizer.json").unlink()
    (model / "tokenizer.json").mkdir()
    with pytest.raises(ModelFileError, match="not a regular file"):
        open_model(model)


def test_the_garbage_is_refused_even_with_no_copy_tokenizer(model, tmp_path):
    (model / "tokenizer.json").write_text("{oops")
    result, _ = merge(tmp_path, model, "--no-copy-tokenizer")
    assert result.exit_code == 4, result.output


def test_a_well_formed_model_still_opens_and_its_tokenizer_files_copy_byte_for_byte(model, tmp_path):
    (model / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    result, out = merge(tmp_path, model)
    assert result.exit_code == 0, result.output
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (out / name).read_bytes() == (model / name).read_bytes()


# --- custom code (auto_map) ----------------------------------------------------------------------

CONFIGURATION = """
from transformers import LlamaConfig


class TinyCustomConfig(LlamaConfig):
    model_type = "tiny_custom"
"""
MODELING = """
from transformers import LlamaForCausalLM

from .configuration_tiny_custom import TinyCustomConfig
from .helpers_tiny_custom import MARKER


class TinyCustomForCausalLM(LlamaForCausalLM):
    config_class = TinyCustomConfig
    marker = MARKER
"""
HELPERS = 'MARKER = "custom code carried along"\n'


def add_custom_code(model: Path, *, helpers: bool = True) -> None:
    (model / "configuration_tiny_custom.py").write_text(CONFIGURATION)
    (model / "modeling_tiny_custom.py").write_text(MODELING)
    if helpers:
        (model / "helpers_tiny_custom.py").write_text(HELPERS)
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {
        "AutoConfig": "configuration_tiny_custom.TinyCustomConfig",
        "AutoModelForCausalLM": "modeling_tiny_custom.TinyCustomForCausalLM",
    }
    (model / "config.json").write_text(json.dumps(config))


def test_custom_code_named_by_auto_map_is_copied_and_the_output_loads_with_trust_remote_code(
    model, tmp_path, monkeypatch
):
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    add_custom_code(model)
    (model / "unrelated_script.py").write_text("raise SystemExit('never run, never copied')\n")
    result, out = merge(tmp_path, model)
    assert result.exit_code == 0, result.output
    for name in ("configuration_tiny_custom.py", "modeling_tiny_custom.py", "helpers_tiny_custom.py"):
        assert (out / name).read_bytes() == (model / name).read_bytes()
    assert not (out / "unrelated_script.py").exists()
    assert json.loads((out / "config.json").read_text())["auto_map"]["AutoModelForCausalLM"].startswith("modeling_")
    import transformers

    loaded = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32)
    assert type(loaded).__name__ == "TinyCustomForCausalLM" and loaded.marker == "custom code carried along"
    expected = load_causal_lm(model)  # the built-in class: same weights, so same logits
    ids = [1, 7, 3, 9]
    assert torch.allclose(logits(loaded.eval(), ids), logits(expected, ids), atol=1e-5)


@pytest.mark.parametrize(
    "change, fragment",
    [
        ("missing module", "does not exist"),
        ("missing relative import", "helpers_tiny_custom"),
        ("not a module name", "not `module.ClassName`"),
        ("code outside the model", "outside the model's folder"),
    ],
)
def test_custom_code_that_cannot_be_carried_is_refused_naming_it(model, tmp_path, change, fragment, no_tensor_reads):
    add_custom_code(model, helpers=change != "missing relative import")
    config = json.loads((model / "config.json").read_text())
    if change == "missing module":
        (model / "modeling_tiny_custom.py").unlink()
    elif change == "not a module name":
        config["auto_map"]["AutoModelForCausalLM"] = "../../etc/passwd.X"
    elif change == "code outside the model":
        outside = tmp_path / "elsewhere.py"
        outside.write_text(MODELING)
        (model / "modeling_tiny_custom.py").unlink()
        os.symlink(outside, model / "modeling_tiny_custom.py")
    (model / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFileError) as caught:
        open_model(model)
    assert fragment in caught.value.message
    result, _ = merge(tmp_path, model)
    assert result.exit_code == 4, result.output


def test_auto_map_pointing_at_another_repository_needs_no_local_files(model, tmp_path):
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "org/code-repo--modeling_x.XForCausalLM"}
    (model / "config.json").write_text(json.dumps(config))
    result, out = merge(tmp_path, model)
    assert result.exit_code == 0, result.output
    assert json.loads((out / "config.json").read_text())["auto_map"] == config["auto_map"]


def test_custom_tokenizer_code_travels_with_tokenizer_config(model, tmp_path):
    (model / "tokenization_tiny.py").write_text("from transformers import PreTrainedTokenizerFast as TinyTokenizer\n")
    tokenizer_config = json.loads((model / "tokenizer_config.json").read_text())
    tokenizer_config["auto_map"] = {"AutoTokenizer": [None, "tokenization_tiny.TinyTokenizer"]}
    (model / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    result, out = merge(tmp_path, model)
    assert result.exit_code == 0, result.output
    assert (out / "tokenization_tiny.py").read_bytes() == (model / "tokenization_tiny.py").read_bytes()


@pytest.mark.parametrize("name", ["config.json", "model.safetensors.index.json"])
def test_absurdly_nested_config_or_index_json_is_a_bad_file_not_a_crash(model, tmp_path, name):
    (model / name).write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ModelFileError, match="nested too deeply"):
        open_model(model)
    result, _ = merge(tmp_path, model)
    assert result.exit_code == 4 and "Traceback" not in result.output, result.output
