"""Building the output tokenizer (docs/vocabulary.md): stripping, union, appended tokens, chat templates."""

from __future__ import annotations

import pytest
import tokenizers
import transformers
from tokenizers import AddedToken

from mkmerge.vocab.build import TokenizerInput, add_missing_tokens, union_tokenizer
from mkmerge.vocab.chat_templates import BUILTIN_TEMPLATES, check_jinja, most_common_template
from mkmerge.vocab.strip import strip_tokenizer
from mksuite.common.errors import MergeError, RecipeError

from tiny_models import tiny_tokenizer

TEXT = "the quick brown fox jumps over the lazy dog"
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello"},
    {"role": "user", "content": "Bye"},
]


def test_stripping_removes_tokens_at_and_above_the_limit_and_keeps_the_rest():
    full = tiny_tokenizer(64)
    stripped = strip_tokenizer(tiny_tokenizer(64), 50, model="m")
    kept = {t: i for t, i in full.get_vocab().items() if i < 50}
    assert stripped.get_vocab() == kept
    assert max(stripped(TEXT).input_ids) < 50
    # Every merge whose parts and result survive is kept: text made of kept tokens splits the same.
    for word in TEXT.split():
        ids = full(word).input_ids
        if max(ids) < 50:
            assert stripped(word).input_ids == ids


def test_stripping_is_a_no_op_below_the_limit():
    tokenizer = tiny_tokenizer(40)
    assert strip_tokenizer(tokenizer, 40, model="m") is tokenizer
    assert strip_tokenizer(tokenizer, None, model="m") is tokenizer


def test_stripping_unsets_special_tokens_that_are_removed():
    tokenizer = tiny_tokenizer(40)
    tokenizer.add_tokens([AddedToken("<extra_pad>", special=True)], special_tokens=True)
    tokenizer.pad_token = "<extra_pad>"
    with pytest.warns(UserWarning, match="pad_token '<extra_pad>'"):
        stripped = strip_tokenizer(tokenizer, 40, model="m")
    assert stripped.pad_token is None
    assert "<extra_pad>" not in stripped.get_vocab() and len(stripped) == 40
    assert stripped.eos_token == "</s>"


def test_only_bpe_tokenizers_can_be_stripped():
    model = tokenizers.models.WordLevel({"<unk>": 0, "a": 1, "b": 2}, unk_token="<unk>")
    word_level = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizers.Tokenizer(model), unk_token="<unk>")
    with pytest.raises(MergeError, match="WordLevel tokenizer; only fast BPE"):
        strip_tokenizer(word_level, 2, model="m")
    assert strip_tokenizer(word_level, 3, model="m") is word_level  # nothing to strip: fine


def test_union_appends_missing_tokens_in_encounter_order_after_the_stripped_base():
    base = tiny_tokenizer(64)
    other = tiny_tokenizer(96)
    chat = tiny_tokenizer(64)
    chat.add_tokens([AddedToken("<|im_start|>", special=True, lstrip=True)], special_tokens=True)
    chat.add_tokens(["hello"])
    inputs = [
        TokenizerInput("base", base, 64),
        TokenizerInput("chat", chat, 66),
        TokenizerInput("other", other, 90),  # ids 90..95 are past its vocab_size: ignored
        TokenizerInput("broken", None, 10),
    ]
    union = union_tokenizer(tiny_tokenizer(64), 60, inputs, base_model="base")
    vocab = union.get_vocab()
    base_kept = {t: i for t, i in base.get_vocab().items() if i < 60}
    expected_new = [t for t, i in sorted(base.get_vocab().items(), key=lambda kv: kv[1]) if i >= 60]
    expected_new += ["<|im_start|>", "hello"]
    expected_new += [
        t
        for t, i in sorted(other.get_vocab().items(), key=lambda kv: kv[1])
        if i < 90 and t not in base_kept and t not in expected_new
    ]
    assert {t: i for t, i in vocab.items() if i < 60} == base_kept
    assert [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])][60:] == expected_new
    added = {t.content: t for t in union.added_tokens_decoder.values()}
    assert added["<|im_start|>"].special and added["<|im_start|>"].lstrip
    assert not added["hello"].special
    # base tokens 60..63 come back from the base's own walk, as ordinary added tokens.
    assert not added[expected_new[0]].special


def test_union_keeps_the_first_definition_of_an_added_token_and_warns_on_a_different_one():
    first, second = tiny_tokenizer(40), tiny_tokenizer(40)
    first.add_tokens([AddedToken("<tool>", special=True)], special_tokens=True)
    second.add_tokens([AddedToken("<tool>", special=True, rstrip=True)], special_tokens=True)
    inputs = [TokenizerInput("a", first, 41), TokenizerInput("b", second, 41)]
    with pytest.warns(UserWarning, match=r"b defines added token '<tool>' differently \(rstrip=True\)"):
        union = union_tokenizer(tiny_tokenizer(40), 40, inputs, base_model="a")
    (tool,) = [t for t in union.added_tokens_decoder.values() if t.content == "<tool>"]
    assert not tool.rstrip


def test_recipe_tokens_are_appended_once_as_ordinary_tokens():
    tokenizer = tiny_tokenizer(40)
    add_missing_tokens(tokenizer, ["<new>", "</s>", "<new>", "<other>"])
    vocab = tokenizer.get_vocab()
    assert (vocab["<new>"], vocab["<other>"], vocab["</s>"]) == (40, 41, 2)
    assert len(tokenizer) == 42


def _render(name: str, messages=CONVERSATION, generation=True) -> str:
    tokenizer = tiny_tokenizer(40)
    tokenizer.chat_template = BUILTIN_TEMPLATES[name]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)


def test_chatml_template():
    assert _render("chatml") == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n"
    )


def test_llama3_template():
    assert _render("llama3") == (
        "<s><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def test_mistral_template_folds_the_system_message_and_enforces_alternation():
    assert _render("mistral") == "<s>[INST] Be brief.\n\nHi [/INST] Hello</s>[INST] Bye [/INST]"
    assert _render("mistral", CONVERSATION[1:]) == "<s>[INST] Hi [/INST] Hello</s>[INST] Bye [/INST]"
    with pytest.raises(Exception, match="roles must alternate"):
        _render("mistral", [CONVERSATION[1], CONVERSATION[1]])


def test_alpaca_template():
    messages = [CONVERSATION[0], CONVERSATION[1], {"role": "input", "content": "x = 1"}, CONVERSATION[2]]
    assert _render("alpaca", messages) == (
        "Be brief.\n\n### Instruction:\nHi\n\n### Input:\nx = 1\n\n### Response:\nHello</s>\n\n### Response:\n"
    )


def test_exaone_template_adds_an_empty_system_turn():
    assert _render("exaone", CONVERSATION[1:3]) == (
        "[|system|][|endofturn|]\n[|user|]Hi[|endofturn|]\n[|assistant|]Hello[|endofturn|]\n[|assistant|]"
    )
    assert _render("exaone", CONVERSATION[:2], generation=False) == (
        "[|system|]Be brief.[|endofturn|]\n[|user|]Hi[|endofturn|]\n"
    )


def test_auto_picks_the_most_common_template_first_seen_on_a_tie():
    def with_template(template):
        tokenizer = tiny_tokenizer(40)
        tokenizer.chat_template = template
        return tokenizer

    a, b = "{{ 'A' }}", "{{ 'B' }}"
    assert most_common_template([with_template(b), with_template(a + "\n"), with_template(a)]) == a
    assert most_common_template([with_template(b), with_template(a)]) == b
    assert most_common_template([tiny_tokenizer(40), None]) is None


def test_a_literal_template_must_parse():
    assert check_jinja("{{ messages[0]['content'] }}", line=3)
    with pytest.raises(RecipeError, match="line 3, field `chat_template`: the chat template is not valid Jinja"):
        check_jinja("{% for m in messages %}{{ m }}", line=3)
