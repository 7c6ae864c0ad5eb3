"""mkmoe rules that follow mergekit-moe 0.1.5 (each found by running it on tiny models)."""

from __future__ import annotations

import pytest

from mkmoe.config import ACKNOWLEDGE_FLAG, parse_moe_config
from mksuite.common.errors import RecipeError

ONE_MODEL = """\
base_model: base
gate_mode: {mode}
experts:
  - source_model: a
    positive_prompts: ["the fox"]
  - source_model: a
    positive_prompts: ["one two"]
"""


def test_identical_experts_with_random_gates_need_no_acknowledgement():
    """mergekit-moe builds this without the flag: random routing already tells the copies apart."""
    config = parse_moe_config(ONE_MODEL.format(mode="random"))
    assert [str(e.source_model) for e in config.experts] == ["a", "a"]


@pytest.mark.parametrize("mode", ["uniform_random", "hidden", "hidden_avg", "cheap_embed"])
def test_identical_experts_with_other_gates_still_need_the_acknowledgement(mode):
    with pytest.raises(RecipeError) as caught:
        parse_moe_config(ONE_MODEL.format(mode=mode))
    assert "same model" in caught.value.message and ACKNOWLEDGE_FLAG in caught.value.render()
    assert parse_moe_config(ONE_MODEL.format(mode=mode), allow_identical_experts=True).gate_mode == mode
