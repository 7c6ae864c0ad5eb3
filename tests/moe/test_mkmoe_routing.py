"""Hidden-state gates route held-out prompts of each expert's topic to that expert."""

from __future__ import annotations

import torch

from mkmoe.prompts import encode_prompts

from mkmoe_helpers import build, moe_yaml, topics

# Two disjoint word sets, each word one or two tokens of the tiny tokenizer. A tiny random
# model has no semantics, so a "topic" here is its vocabulary: held-out prompts reuse it.
TOPIC_A = ["quick", "brown", "fox", "lazy", "dog", "cat", "warm", "fire"]
TOPIC_B = ["one", "two", "three", "four", "five", "river", "stone", "bridge"]


def test_held_out_prompts_are_routed_to_their_topics_expert_in_most_layers(tiny_family, tmp_path):
    from tiny_models import load_causal_lm, tiny_tokenizer

    base, (ft1, ft2) = tiny_family("llama")
    experts = [
        {"model": ft1, "positive_prompts": topics(12, TOPIC_A, seed=1)},
        {"model": ft2, "positive_prompts": topics(12, TOPIC_B, seed=2)},
    ]
    out = build(tmp_path / "moe", moe_yaml(base, experts, gate_mode="hidden", experts_per_token=1))
    held_out = topics(6, TOPIC_A, seed=10) + topics(6, TOPIC_B, seed=11)
    truth = torch.tensor([0] * 6 + [1] * 6)
    batch = encode_prompts(tiny_tokenizer(128), held_out)
    with torch.no_grad():
        router_logits = load_causal_lm(out)(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            output_router_logits=True,
        ).router_logits
    mask = batch.attention_mask.unsqueeze(-1).float()
    routed = torch.zeros(2, 2)  # [true topic, chosen expert], over held-out prompts x layers
    for layer_logits in router_logits:  # [prompts * tokens, experts]
        preference = (layer_logits.view(*batch.input_ids.shape, 2) * mask).sum(1) / mask.sum(1)
        for topic, chosen in zip(truth.tolist(), preference.argmax(dim=1).tolist()):
            routed[topic, chosen] += 1
    accuracy = routed.diagonal() / routed.sum(dim=1)
    assert (accuracy >= 0.75).all(), routed
