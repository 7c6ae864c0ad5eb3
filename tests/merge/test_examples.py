"""Every recipe in examples/ runs unchanged on the tiny models the demo builds."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from mkmerge.methods import METHODS
from mkmerge.recipe import parse_recipe
from mkmerge.run import run_merge
from mksuite.common.build import BuildOptions

EXAMPLES = sorted((Path(__file__).resolve().parent.parent.parent / "examples").glob("*.yml"))


@pytest.fixture(scope="module")
def demo_models(tmp_path_factory):
    """models/base, models/ft-a, models/ft-b, models/ft-chat as examples/demo.py lays them out (4-layer llama)."""
    from tiny_models import build_model
    from vocab_models import with_added_tokens

    root = tmp_path_factory.mktemp("demo")
    base = build_model("llama", root / "models" / "base", layers=4, hidden=64, seed=0)
    build_model("llama", root / "models" / "ft-a", base=base, seed=1)
    build_model("llama", root / "models" / "ft-b", base=base, seed=2)
    chat = build_model("llama", root / "ft-c", base=base, seed=3)
    with_added_tokens(chat, root / "models" / "ft-chat", ["<|im_start|>", "<|im_end|>"], seed=4)
    return root


def test_there_is_an_example_for_every_method():
    methods = {parse_recipe(p.read_text(), known_methods=METHODS.keys()).merge_method for p in EXAMPLES}
    assert set(METHODS) <= methods


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_example_recipe_merges_into_a_loadable_model(example, demo_models, monkeypatch):
    from transformers import AutoTokenizer

    from tiny_models import load_causal_lm, logits, read_tensors

    monkeypatch.chdir(demo_models)
    recipe = parse_recipe(example.read_text(), known_methods=METHODS.keys(), source_name=str(example))
    out = demo_models / f"out-{example.stem}"
    run_merge(recipe, out, BuildOptions(overwrite=True))
    assert torch.isfinite(logits(load_causal_lm(out), [1, 4, 9, 2])).all()
    assert os.path.exists(out / "mergekit_config.yml")
    # Tokenizer, embedding rows and config agree (vocabulary-changing recipes included).
    vocab_size = json.loads((out / "config.json").read_text())["vocab_size"]
    assert read_tensors(out)["model.embed_tokens.weight"].shape[0] == vocab_size
    assert max(AutoTokenizer.from_pretrained(out).get_vocab().values()) < vocab_size
