"""Merges with a tokenizer block, end to end: every embedding and LM-head row checked against docs/vocabulary.md.

The models: a 64-token llama base; `chat` and `chat2`, fine-tunes with two added tokens each
(one shared); `wide` (96 tokens) and `narrow` (40 tokens), independent models with other
vocabularies. The reference rows are computed here from the rules, token by token.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import transformers
from typer.testing import CliRunner

from mkmerge.cli import merge_app
from mkmerge.methods import METHODS
from mkmerge.recipe import parse_recipe
from mkmerge.run import run_merge
from mksuite.common.build import BuildOptions
from mksuite.common.errors import MergeError, RecipeError, ShapeMismatchError

from tiny_models import build_model, copy_model, load_causal_lm, logits, read_tensors, tiny_tokenizer
from vocab_models import with_added_tokens

EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"
NAMES = ("base", "chat", "chat2", "wide", "narrow")


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vocab_zoo")
    base = build_model("llama", root / "base", vocab=64, seed=0)
    ft1 = build_model("llama", root / "ft1", base=base, seed=1)
    ft2 = build_model("llama", root / "ft2", base=base, seed=2)
    return {
        "base": base,
        "chat": with_added_tokens(ft1, root / "chat", ["<|im_start|>", "<|im_end|>"], seed=5),
        "chat2": with_added_tokens(ft2, root / "chat2", ["<|im_start|>", "<tool>"], seed=6),
        "wide": build_model("llama", root / "wide", vocab=96, seed=3),
        "narrow": build_model("llama", root / "narrow", vocab=40, seed=4),
    }


@pytest.fixture(scope="module")
def wide_token() -> str:
    """A token the wide model has and the base does not."""
    return next(t for t in tiny_tokenizer(96).get_vocab() if t not in tiny_tokenizer(64).get_vocab())


def merge(text: str, out: Path, **kw) -> Path:
    run_merge(parse_recipe(text, known_methods=METHODS.keys()), out, BuildOptions(overwrite=True), **kw)
    return out  # run_merge keywords (tokenizer options) pass through, unlike run_helpers.merge_recipe


# --- the reference: docs/vocabulary.md written out plainly ---------------------------------------------------


@dataclass
class Model:
    vocab: dict[str, int]  # tokens with a row: id < min(config vocab_size, rows)
    limit: int
    tensors: dict[str, torch.Tensor]

    def matrix(self, name: str) -> torch.Tensor:
        return self.tensors.get(name, self.tensors[EMBED])  # tied: the LM head is the embedding


def load_reference(path: Path) -> Model:
    tensors = read_tensors(path)
    config = json.loads((path / "config.json").read_text())
    limit = min(config["vocab_size"], tensors[EMBED].shape[0])
    vocab = transformers.AutoTokenizer.from_pretrained(path).get_vocab()
    return Model({t: i for t, i in vocab.items() if i < limit}, limit, tensors)


def default_row(
    token: str, tensor: str, models: dict[str, Model], base: str | None, rule: dict
) -> tuple[torch.Tensor, bool]:
    """(row, exact): exact is False for means, compared with a float tolerance."""
    hidden = models[next(iter(models))].matrix(tensor).shape[1]
    kind = rule.get("kind")
    if kind == "zero":
        return torch.zeros(hidden), True
    if kind == "model":
        donor = models[rule["model"]]
        return donor.matrix(tensor)[donor.vocab[token]], True
    if kind == "model_token":
        donor = models[rule["model"]]
        row = rule["id"] if "id" in rule else donor.vocab[rule["token"]]
        return donor.matrix(tensor)[row], True
    holders = [name for name, m in models.items() if token in m.vocab]
    if not holders:
        return torch.zeros(hidden), True
    if len(holders) == 1:
        return models[holders[0]].matrix(tensor)[models[holders[0]].vocab[token]], True
    if base in holders:
        return models[base].matrix(tensor)[models[base].vocab[token]], True
    return torch.stack([models[h].matrix(tensor)[models[h].vocab[token]] for h in holders]).mean(0), False


def expected_matrix(name, tensor, models, base, rules, out_vocab, size) -> tuple[torch.Tensor, torch.Tensor]:
    """Model ``name``'s matrix rebuilt for the output vocabulary, and a mask of the exactly known rows."""
    own = models[name]
    source = own.matrix(tensor)
    rows, exact = [], []
    by_id = {i: t for t, i in out_vocab.items()}
    padding = []
    for index in range(size):
        token = by_id.get(index)
        if token is None:  # padding: filled below
            padding.append(index)
            rows.append(None)
            exact.append(False)
            continue
        rule = rules.get(token, {})
        if token in own.vocab and not rule.get("force"):
            rows.append(source[own.vocab[token]])
            exact.append(True)
        else:
            row, is_exact = default_row(token, tensor, models, base, rule)
            rows.append(row)
            exact.append(is_exact)
    # padding rows: the mean of the model's rebuilt rows (default embeddings included), as mergekit
    fill = torch.stack([row for row in rows if row is not None]).mean(0)
    rows = [fill if row is None else row for row in rows]
    return torch.stack(rows), torch.tensor(exact)


def assert_rows(actual: torch.Tensor, expected: torch.Tensor, exact: torch.Tensor) -> None:
    assert actual.shape == expected.shape
    assert torch.equal(actual[exact], expected[exact])
    torch.testing.assert_close(actual[~exact], expected[~exact], rtol=0, atol=2e-7)


# --- union with every kind of rule --------------------------------------------------------------------


def union_recipe(zoo, wide_token, weights: dict[str, float]) -> str:
    models = "".join(f"  - model: {zoo[name]}\n    parameters: {{weight: {weights[name]}}}\n" for name in NAMES[1:])
    return (
        f"merge_method: linear\nbase_model: {zoo['base']}\nmodels:\n{models}"
        f"parameters: {{weight: {weights['base']}}}\n"
        "tokenizer:\n  source: union\n  pad_to_multiple_of: 32\n  tokens:\n"
        f"    <|im_end|>:\n      source: {{kind: model_token, model: {zoo['chat']}, token: </s>}}\n"
        "    <s>:\n      force: true\n"
        "    <pad>:\n      source: {kind: zero}\n      force: true\n"
        "    <new>:\n      source: {kind: zero}\n"
        "    <orphan>: {}\n"
        f"    <tool>:\n      source: {{kind: model_token, model: {zoo['narrow']}, token_id: 5}}\n"
        f"    {json.dumps(wide_token)}:\n      source: {zoo['wide']}\n      force: true\n"
        "chat_template: chatml\n"
    )


def union_rules(wide_token: str) -> dict[str, dict]:
    return {
        "<|im_end|>": {"kind": "model_token", "model": "chat", "token": "</s>"},
        "<s>": {"force": True},
        "<pad>": {"kind": "zero", "force": True},
        "<new>": {"kind": "zero"},
        "<tool>": {"kind": "model_token", "model": "narrow", "id": 5},
        wide_token: {"kind": "model", "model": "wide", "force": True},
    }


def expected_union_vocab(zoo, wide_token) -> list[str]:
    """Base tokens, then each model's missing tokens in id order, then the recipe's new keys."""
    order: list[str] = []
    for name in NAMES:
        model = load_reference(zoo[name])
        for token, _ in sorted(model.vocab.items(), key=lambda kv: kv[1]):
            if token not in order:
                order.append(token)
    return order + ["<new>", "<orphan>"]


@pytest.mark.parametrize("selected", NAMES)
def test_each_models_rebuilt_rows_follow_the_rules_exactly(zoo, wide_token, tmp_path, selected):
    """Weight 1 on one model and 0 on the rest: the merged matrices are that model's rebuilt ones."""
    weights = {name: 1.0 if name == selected else 0.0 for name in NAMES}
    with pytest.warns(UserWarning, match=r"1 output tokens are in no merged model's vocabulary \('<orphan>'\)"):
        out = merge(union_recipe(zoo, wide_token, weights), tmp_path / "out")
    merged = read_tensors(out)
    out_vocab = transformers.AutoTokenizer.from_pretrained(out).get_vocab()
    models = {name: load_reference(zoo[name]) for name in NAMES}
    for tensor in (EMBED, HEAD):
        expected, exact = expected_matrix(selected, tensor, models, "base", union_rules(wide_token), out_vocab, 128)
        assert_rows(merged[tensor], expected, exact)


def test_union_merge_writes_a_consistent_loadable_model(zoo, wide_token, tmp_path):
    weights = {"base": 0.1, "chat": 0.2, "chat2": 0.3, "wide": 0.15, "narrow": 0.25}
    with pytest.warns(UserWarning, match="no merged model's vocabulary"):
        out = merge(union_recipe(zoo, wide_token, weights), tmp_path / "out")
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    out_vocab = tokenizer.get_vocab()
    assert [t for t, _ in sorted(out_vocab.items(), key=lambda kv: kv[1])] == expected_union_vocab(zoo, wide_token)
    size = 128  # 64 + 2 + 1 + 32 wide tokens + 2 recipe tokens = 101, padded to a multiple of 32
    assert json.loads((out / "config.json").read_text())["vocab_size"] == size
    merged = read_tensors(out)
    models = {name: load_reference(zoo[name]) for name in NAMES}
    for tensor in (EMBED, HEAD):
        total = sum(
            weights[name] * expected_matrix(name, tensor, models, "base", union_rules(wide_token), out_vocab, size)[0]
            for name in NAMES
        )
        torch.testing.assert_close(merged[tensor], total / sum(weights.values()), rtol=1e-6, atol=1e-6)
    # Rows of ordinary weights are merged as before: lm_head is permuted like embed_tokens, nothing else.
    assert merged["model.norm.weight"].shape == models["base"].tensors["model.norm.weight"].shape
    model = load_causal_lm(out)
    ids = tokenizer("<|im_start|>user\nthe quick fox<|im_end|>").input_ids
    assert ids[0] == out_vocab["<|im_start|>"] and out_vocab["<|im_end|>"] in ids
    assert logits(model, ids).shape == (len(ids), size)
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == (
        "<|im_start|>user\nhi<|im_end|>\n"
    )


def test_padding_rows_are_the_mean_of_each_models_real_rows(zoo, tmp_path):
    recipe = (
        f"merge_method: linear\nmodels:\n  - model: {zoo['narrow']}\n    parameters: {{weight: 1.0}}\n"
        "tokenizer:\n  source: base\n  pad_to_multiple_of: 48\n"
    )
    merged = read_tensors(merge(recipe, tmp_path / "out"))
    narrow = read_tensors(zoo["narrow"])
    for tensor in (EMBED, HEAD):
        assert merged[tensor].shape == (48, 32)
        assert torch.equal(merged[tensor][:40], narrow[tensor])
        torch.testing.assert_close(merged[tensor][40:], narrow[tensor].mean(0).expand(8, 32), rtol=0, atol=2e-7)


def test_padding_rows_are_the_mean_of_the_merged_rows_when_vocabularies_differ(zoo, tmp_path):
    # chat and narrow lack tokens the union takes from the others; their rebuilt rows hold those
    # tokens' default embeddings, and the padding rows average the rebuilt rows, defaults included
    # (mergekit's rule), so a linear merge's padding rows are the mean of its merged rows.
    recipe = (
        f"merge_method: linear\nmodels:\n  - model: {zoo['chat']}\n    parameters: {{weight: 0.7}}\n"
        f"  - model: {zoo['narrow']}\n    parameters: {{weight: 0.3}}\n"
        "tokenizer:\n  source: union\n  pad_to_multiple_of: 48\n"
    )
    out = merge(recipe, tmp_path / "out")
    real = len(transformers.AutoTokenizer.from_pretrained(out).get_vocab())
    merged = read_tensors(out)
    for tensor in (EMBED, HEAD):
        size = merged[tensor].shape[0]
        assert size % 48 == 0 and real < size
        mean = merged[tensor][:real].mean(0)
        torch.testing.assert_close(merged[tensor][real:], mean.expand(size - real, -1), rtol=0, atol=1e-6)


# --- tokenizer sources -----------------------------------------------------------------------------


def test_base_source_strips_tokens_past_the_base_vocab_size(zoo, tmp_path):
    """A base whose tokenizer has 64 entries but whose config and embedding have 60 rows."""
    base = build_model("llama", tmp_path / "base60", vocab=60, seed=7)
    tiny_tokenizer(64).save_pretrained(base)
    other = with_added_tokens(zoo["chat"], tmp_path / "other", ["<x>"], seed=8)
    recipe = (
        f"merge_method: linear\nbase_model: {base}\nmodels:\n  - model: {other}\n    parameters: {{weight: 0.5}}\n"
        "parameters: {weight: 0.5}\ntokenizer_source: base\n"
    )
    out = merge(recipe, tmp_path / "out")
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert tokenizer.get_vocab() == {t: i for t, i in tiny_tokenizer(64).get_vocab().items() if i < 60}
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 60
    merged, b, o = read_tensors(out), read_tensors(base), read_tensors(other)
    o_vocab = load_reference(other).vocab
    for token, index in tokenizer.get_vocab().items():
        expected = 0.5 * b[EMBED][index] + 0.5 * o[EMBED][o_vocab[token]] if token in o_vocab else b[EMBED][index]
        torch.testing.assert_close(merged[EMBED][index], expected, rtol=0, atol=1e-7)
    check = load_causal_lm(out)
    assert logits(check, tokenizer("the fox").input_ids).shape[-1] == 60


def test_model_source_takes_that_tokenizer_as_it_is(zoo, tmp_path):
    recipe = (
        f"merge_method: linear\nmodels:\n  - model: {zoo['base']}\n    parameters: {{weight: 1.0}}\n"
        f"  - model: {zoo['chat']}\n    parameters: {{weight: 0.0}}\ntokenizer_source: {zoo['chat']}\n"
    )
    out = merge(recipe, tmp_path / "out")
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert tokenizer.get_vocab() == transformers.AutoTokenizer.from_pretrained(zoo["chat"]).get_vocab()
    merged, base, chat = read_tensors(out), read_tensors(zoo["base"]), read_tensors(zoo["chat"])
    assert torch.equal(merged[EMBED][:64], base[EMBED])
    # The two chat tokens exist only in chat: the base gets chat's rows for them.
    assert torch.equal(merged[EMBED][64:], chat[EMBED][64:])
    assert torch.equal(merged[HEAD][64:], chat[HEAD][64:])


def test_a_tokens_source_outside_the_merge_donates_its_rows(zoo, tmp_path):
    recipe = (
        f"merge_method: linear\nmodels:\n  - model: {zoo['base']}\n    parameters: {{weight: 1.0}}\n"
        "tokenizer:\n  source: base\n  tokens:\n"
        f"    <|im_start|>:\n      source: {zoo['chat']}\n"
    )
    out = merge(recipe, tmp_path / "out")
    merged, base, chat = read_tensors(out), read_tensors(zoo["base"]), read_tensors(zoo["chat"])
    chat_id = load_reference(zoo["chat"]).vocab["<|im_start|>"]
    assert torch.equal(merged[EMBED], torch.cat([base[EMBED], chat[EMBED][chat_id : chat_id + 1]]))
    assert torch.equal(merged[HEAD], torch.cat([base[HEAD], chat[HEAD][chat_id : chat_id + 1]]))


def test_tokens_past_a_models_embedding_are_treated_as_missing(zoo, tmp_path):
    """A tokenizer entry at an id ≥ the matrix's rows has no row; the other model supplies it."""
    short = copy_model(zoo["base"], tmp_path / "short")
    tokenizer = transformers.AutoTokenizer.from_pretrained(short)
    tokenizer.add_tokens(["<|im_start|>"], special_tokens=True)  # id 64, but the model has 64 rows
    tokenizer.save_pretrained(short)
    recipe = (
        f"merge_method: linear\nmodels:\n  - model: {short}\n    parameters: {{weight: 1.0}}\n"
        f"  - model: {zoo['chat']}\n    parameters: {{weight: 0.0}}\ntokenizer_source: union\n"
    )
    merged = read_tensors(merge(recipe, tmp_path / "out"))
    chat = read_tensors(zoo["chat"])
    chat_id = load_reference(zoo["chat"]).vocab["<|im_start|>"]
    assert torch.equal(merged[EMBED][64], chat[EMBED][chat_id])


# --- tied embeddings -------------------------------------------------------------------------------


def test_tied_models_supply_their_embedding_as_lm_head(tmp_path):
    tied = build_model("llama", tmp_path / "tied", vocab=64, tie=True, seed=0)
    untied = with_added_tokens(
        build_model("llama", tmp_path / "untied0", vocab=64, tie=False, seed=9), tmp_path / "untied", ["<t>"], seed=3
    )
    recipe = (
        f"merge_method: linear\nmodels:\n  - model: {untied}\n    parameters: {{weight: 0.25}}\n"
        f"  - model: {tied}\n    parameters: {{weight: 0.75}}\ntokenizer_source: union\n"
    )
    out = merge(recipe, tmp_path / "out")
    merged, t, u = read_tensors(out), read_tensors(tied), read_tensors(untied)
    for tensor in (EMBED, HEAD):
        # <t> (id 64) is only the untied model's: the tied one gets its row (of the same tensor).
        own = torch.cat([t[EMBED], u[tensor][64:65]])
        torch.testing.assert_close(merged[tensor], 0.25 * u[tensor] + 0.75 * own, rtol=0, atol=1e-7)
    assert logits(load_causal_lm(out), [1, 64, 5]).shape == (3, 65)


def test_all_tied_models_stay_tied_after_alignment(tmp_path):
    a = build_model("llama", tmp_path / "a", vocab=64, tie=True, seed=0)
    b = with_added_tokens(build_model("llama", tmp_path / "b0", base=a, seed=1), tmp_path / "b", ["<t>"], seed=2)
    recipe = (
        f"merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 0.5}}\n"
        f"  - model: {b}\n    parameters: {{weight: 0.5}}\ntokenizer:\n  source: union\n  pad_to_multiple_of: 8\n"
    )
    out = merge(recipe, tmp_path / "out")
    merged = read_tensors(out)
    assert HEAD not in merged and merged[EMBED].shape == (72, 32)
    model = load_causal_lm(out)
    assert torch.equal(model.lm_head.weight, merged[EMBED])
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 72


# --- without a tokenizer block -----------------------------------------------------------------------


def test_without_a_tokenizer_the_config_states_the_rows_of_a_cut_embedding(zoo, tmp_path):
    recipe = (
        f"merge_method: linear\nmodels:\n  - model: {zoo['chat']}\n    parameters: {{weight: 0.5}}\n"
        f"  - model: {zoo['base']}\n    parameters: {{weight: 0.5}}\n"
    )
    with pytest.warns(UserWarning) as caught:
        out = merge(recipe, tmp_path / "out", unsafe_truncate_embeddings=True)
    messages = [str(w.message) for w in caught]
    expected = "config.json gets vocab_size 64. Its tokenizer, copied to the output, has 2 tokens past"
    assert any(expected in m for m in messages)
    merged = read_tensors(out)
    assert merged[EMBED].shape[0] == merged[HEAD].shape[0] == 64
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 64
    assert logits(load_causal_lm(out), [1, 2, 63]).shape == (3, 64)


def test_without_a_tokenizer_embeddings_of_equal_size_leave_the_config_alone(zoo, tmp_path):
    recipe = f"merge_method: passthrough\nmodels:\n  - model: {zoo['chat']}\n"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = merge(recipe, tmp_path / "out")
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 66


def test_slices_ending_on_a_model_of_another_vocabulary_size_are_refused(zoo, tmp_path):
    recipe = (
        "merge_method: passthrough\nslices:\n"
        f"  - sources:\n      - model: {zoo['base']}\n        layer_range: [0, 2]\n"
        f"  - sources:\n      - model: {zoo['chat']}\n        layer_range: [2, 3]\n"
    )
    with pytest.raises(ShapeMismatchError, match=r"model.embed_tokens.weight: 64, lm_head.weight: 66"):
        merge(recipe, tmp_path / "out")
    # A tokenizer block aligns both ends to one vocabulary instead; the embedding comes from the
    # base alone, which has no row for chat's two tokens.
    with pytest.warns(UserWarning, match=r"model.embed_tokens.weight: 2 output tokens are in no merged model"):
        out = merge(recipe + "tokenizer_source: union\n", tmp_path / "aligned")
    merged = read_tensors(out)
    assert merged[EMBED].shape[0] == merged[HEAD].shape[0] == 66
    assert logits(load_causal_lm(out), [1, 64, 65]).shape == (3, 66)


# --- chat templates on the output --------------------------------------------------------------------


def test_a_chat_template_without_a_tokenizer_block_reserialises_the_donor(zoo, tmp_path):
    recipe = f"merge_method: passthrough\nmodels:\n  - model: {zoo['chat']}\nchat_template: llama3\n"
    out = merge(recipe, tmp_path / "out")
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert tokenizer.get_vocab() == transformers.AutoTokenizer.from_pretrained(zoo["chat"]).get_vocab()
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == (
        "<s><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
    )
    assert (out / "generation_config.json").is_file()


def test_no_copy_tokenizer_drops_the_chat_template_with_a_warning(zoo, tmp_path):
    result = CliRunner().invoke(
        merge_app,
        [str(_write(tmp_path, f"merge_method: passthrough\nmodels:\n  - model: {zoo['chat']}\nchat_template: chatml\n")),
         str(tmp_path / "out"), "--no-copy-tokenizer", "--quiet"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "chat template is dropped" in result.output
    assert not (tmp_path / "out" / "tokenizer.json").exists()
    assert not (tmp_path / "out" / "chat_template.jinja").exists()


def test_auto_takes_the_template_most_inputs_carry(zoo, tmp_path):
    paths = []
    for name, template in (("a", "{{ 'one' }}"), ("b", "{{ 'two' }}"), ("c", "{{ 'two' }}")):
        path = copy_model(zoo["base"], tmp_path / name)
        tokenizer = transformers.AutoTokenizer.from_pretrained(path)
        tokenizer.chat_template = template
        tokenizer.save_pretrained(path)
        paths.append(path)
    models = "".join(f"  - model: {p}\n    parameters: {{weight: 1.0}}\n" for p in paths)
    out = merge(f"merge_method: linear\nmodels:\n{models}chat_template: auto\n", tmp_path / "out")
    assert transformers.AutoTokenizer.from_pretrained(out).chat_template == "{{ 'two' }}"


def test_a_literal_template_is_set_verbatim(zoo, tmp_path):
    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    recipe = f"merge_method: passthrough\nmodels:\n  - model: {zoo['base']}\nchat_template: {json.dumps(template)}\n"
    out = merge(recipe, tmp_path / "out")
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "[user] hi\n"


# --- refusals at plan time ---------------------------------------------------------------------------


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yml"
    path.write_text(text)
    return path


def test_a_tokens_source_model_without_the_token_is_a_recipe_error(zoo, tmp_path):
    recipe = (
        f"merge_method: linear\nmodels:\n  - model: {zoo['base']}\n    parameters: {{weight: 1.0}}\n"
        f"tokenizer:\n  tokens:\n    <tool>:\n      source: {zoo['chat']}\n"
    )
    with pytest.raises(
        RecipeError, match=r"line 8, field `tokenizer.tokens.<tool>.source`: .*chat has no token '<tool>'"
    ):
        merge(recipe, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_model_token_id_past_the_matrix_is_a_recipe_error(zoo, tmp_path):
    recipe = (
        f"merge_method: linear\nmodels:\n  - model: {zoo['base']}\n    parameters: {{weight: 1.0}}\n"
        f"tokenizer:\n  tokens:\n    <x>:\n      source: {{kind: model_token, model: {zoo['narrow']}, token_id: 40}}\n"
    )
    with pytest.raises(
        RecipeError, match=r"tokenizer.tokens.<x>.source.token_id`: token_id 40 is out of range.*40 rows"
    ):
        merge(recipe, tmp_path / "out")


def test_stripping_a_tokenizer_that_is_not_bpe_is_refused_before_any_tensor_is_read(zoo, tmp_path, tensor_reads):
    import tokenizers

    base = copy_model(zoo["narrow"], tmp_path / "wordlevel")
    vocab = {f"w{i}": i for i in range(45)}
    word_level = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="w0"))
    transformers.PreTrainedTokenizerFast(tokenizer_object=word_level, unk_token="w0").save_pretrained(base)
    recipe = f"merge_method: passthrough\nmodels:\n  - model: {base}\ntokenizer_source: base\n"
    with pytest.raises(MergeError, match="only fast BPE tokenizers can be stripped"):
        merge(recipe, tmp_path / "out")
    assert tensor_reads == []


@pytest.mark.parametrize("arch", ["qwen2", "gemma2", "gpt2", "gpt_neox"])
def test_union_aligns_every_vocabulary_tensor_of_other_architectures(tmp_path, arch):
    """Weight 1 on the base: its rows are kept, the chat model's new tokens take the chat rows."""
    base = build_model(arch, tmp_path / "base", vocab=80, seed=0)
    ft = build_model(arch, tmp_path / "ft", base=base, seed=1)
    chat = with_added_tokens(ft, tmp_path / "chat", ["<|im_start|>", "<|im_end|>"], seed=2)
    recipe = (
        f"merge_method: linear\nmodels:\n  - model: {base}\n    parameters: {{weight: 1.0}}\n"
        f"  - model: {chat}\n    parameters: {{weight: 0.0}}\ntokenizer:\n  source: union\n  pad_to_multiple_of: 4\n"
    )
    out = merge(recipe, tmp_path / "out")
    merged, b, c = read_tensors(out), read_tensors(base), read_tensors(chat)
    vocab_tensors = [name for name, t in b.items() if t.ndim == 2 and t.shape[0] == 80]
    assert vocab_tensors and all(merged[name].shape[0] == 84 for name in vocab_tensors)
    for name in vocab_tensors:
        assert torch.equal(merged[name][:80], b[name]), name
        assert torch.equal(merged[name][80:82], c[name][80:82]), name
        # padding: the mean of the rebuilt rows, the chat model's two tokens included
        padding = torch.cat([b[name], c[name][80:82]]).mean(0).expand(2, -1)
        torch.testing.assert_close(merged[name][82:], padding, rtol=0, atol=2e-7)
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == 84
    assert logits(load_causal_lm(out), [1, 80, 81]).shape == (3, 84)
