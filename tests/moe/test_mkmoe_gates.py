"""Gate vectors: the pure math, prompt encoding, and the layer-streamed forward pass against a full one."""

from __future__ import annotations

import math

import pytest
import torch

from mkmoe.config import parse_moe_config
from mkmoe.gates import (
    cheap_embed_vector,
    compute_gates,
    condition_number,
    degenerate_layers,
    prompt_gate_vectors,
    random_gate_matrix,
    unit_rows,
)
from mkmoe.plan import plan_moe
from mkmoe.prompts import encode_prompts, load_tokenizer
from mkmoe.streaming import layer_input_states
from mksuite.common.input_models import open_input_models
from mksuite.common.loading import ModelReference

from mkmoe_helpers import moe_yaml

PROMPTS = ["the quick brown fox jumps over", "a model", "numbers and letters, words and sentences fill the pages"]


# -- pure math -------------------------------------------------------------------------------------------
def test_unit_rows_normalises_each_row_and_leaves_zero_rows_zero():
    rows = unit_rows(torch.tensor([[3.0, 4.0], [0.0, 0.0]]))
    assert torch.equal(rows, torch.tensor([[0.6, 0.8], [0.0, 0.0]]))


def test_prompt_gate_vector_is_normalised_positive_mean_minus_negative_mean():
    states = torch.tensor([[[1.0, 0.0], [3.0, 0.0], [0.0, 2.0]]])  # 1 layer, 3 prompts, hidden 2
    gates = prompt_gate_vectors(states, positive=[[0, 1], [2]], negative=[[2], []])
    # expert 0: mean(p0, p1) - p2 = (2, -2) -> (1, -1)/sqrt2; expert 1: p2 -> (0, 1)
    expected = torch.tensor([[[1 / math.sqrt(2), -1 / math.sqrt(2)], [0.0, 1.0]]])
    torch.testing.assert_close(gates, expected, atol=1e-7, rtol=0)


def test_cheap_embed_sums_rows_and_subtracts_unit_vectors():
    embedding = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    assert torch.equal(cheap_embed_vector(embedding, [[0], [0]], []), torch.tensor([1.0, 0.0]))
    # pos: (2, 0) -> (1, 0); neg: (1, 1) -> unit; gate = unit((1, 0) - (0.707, 0.707))
    expected = unit_rows(torch.tensor([1 - 1 / math.sqrt(2), -1 / math.sqrt(2)]))
    torch.testing.assert_close(cheap_embed_vector(embedding, [[0, 0]], [[2]]), expected, atol=1e-7, rtol=0)


def test_cheap_embed_sums_each_prompt_then_the_prompts_as_mergekit_does():
    g = torch.Generator().manual_seed(3)
    embedding = torch.randn(50, 16, generator=g) * torch.logspace(-3, 3, 16)  # rounding shows in the order
    prompts = [[int(i) for i in torch.randint(0, 50, (n,), generator=g)] for n in (7, 3, 12, 5)]
    per_prompt = torch.stack([embedding[ids].sum(dim=0) for ids in prompts]).sum(dim=0)
    assert torch.equal(cheap_embed_vector(embedding, prompts, []), unit_rows(per_prompt))


def test_random_gates_are_reproducible_per_name_and_row():
    first = random_gate_matrix(1, "layer0", 3, 4096, uniform=False)
    assert torch.equal(first, random_gate_matrix(1, "layer0", 3, 4096, uniform=False))
    assert torch.equal(first[:2], random_gate_matrix(1, "layer0", 2, 4096, uniform=False))
    assert not torch.equal(first, random_gate_matrix(2, "layer0", 3, 4096, uniform=False))
    assert not torch.equal(first, random_gate_matrix(1, "layer1", 3, 4096, uniform=False))
    assert abs(first.mean().item()) < 0.05 and abs(first.std().item() - 1) < 0.05


def test_uniform_random_gates_stay_within_one_over_root_hidden():
    gates = random_gate_matrix(0, "g", 4, 400, uniform=True)
    assert gates.abs().max().item() <= 1 / 20 and gates.abs().max().item() > 0.045
    assert abs(gates.mean().item()) < 0.005


def test_condition_number_and_degenerate_layers_name_the_closest_pair():
    orthogonal = torch.eye(3, 8)
    nearly_same = torch.eye(3, 8)
    nearly_same[2] = nearly_same[0] + 0.01 * nearly_same[2]
    assert condition_number(orthogonal) == pytest.approx(1.0)
    found = degenerate_layers([orthogonal, nearly_same])
    assert [(d.layer, d.experts) for d in found] == [(1, (0, 2))]
    assert found[0].condition > 5 and found[0].cosine > 0.99
    assert math.isinf(condition_number(torch.ones(4, 2)))


# -- prompts ----------------------------------------------------------------------------------------------
def test_prompts_get_bos_prefix_and_left_padding_with_bos(tiny_model):
    from tiny_models import BOS_ID

    tokenizer = load_tokenizer(tiny_model("llama"))
    before = (tokenizer.padding_side, tokenizer.pad_token)
    batch = encode_prompts(tokenizer, ["the fox", "the quick brown fox jumps"])
    short = tokenizer("the fox", add_special_tokens=False)["input_ids"]
    width = batch.input_ids.shape[1]
    assert batch.input_ids[0, width - len(short) - 1 :].tolist() == [BOS_ID] + short
    assert batch.input_ids[0, : width - len(short) - 1].tolist() == [BOS_ID] * (width - len(short) - 1)
    assert batch.attention_mask[0].tolist() == [0] * (width - len(short) - 1) + [1] * (len(short) + 1)
    assert batch.attention_mask[1].all() and batch.input_ids[1, 0] == BOS_ID
    assert batch.position_ids[0, -len(short) - 1 :].tolist() == list(range(len(short) + 1))
    assert (tokenizer.padding_side, tokenizer.pad_token) == before


# -- streaming forward --------------------------------------------------------------------------------------
def _open(path):
    ref = ModelReference(str(path))
    return open_input_models([ref])[ref]


def _full_forward_states(path, batch):
    from tiny_models import load_causal_lm

    model = load_causal_lm(path)
    with torch.no_grad():
        out = model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            output_hidden_states=True,
        )
    return torch.stack(out.hidden_states[: model.config.num_hidden_layers])  # entering each layer


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3", "gemma2"])
def test_layer_streamed_states_equal_full_forward_hidden_states(arch, tiny_model):
    path = tiny_model(arch)
    batch = encode_prompts(load_tokenizer(path), PROMPTS)
    assert not batch.attention_mask.all()  # padding is present
    full = _full_forward_states(path, batch)
    last = layer_input_states(_open(path), batch, reduce="last")
    torch.testing.assert_close(last, full[:, :, -1], atol=1e-5, rtol=0)
    mask = batch.attention_mask[None, :, :, None].float()
    mean = layer_input_states(_open(path), batch, reduce="mean")
    torch.testing.assert_close(mean, (full * mask).sum(2) / mask.sum(2), atol=1e-5, rtol=0)


def test_streaming_reads_each_tensor_once_and_skips_what_it_does_not_need(tiny_model):
    path = tiny_model("llama")
    base = _open(path)
    loads: list[str] = []
    source = base.files.tensors
    original = source.load
    source.load = lambda name: loads.append(name) or original(name)
    layer_input_states(base, encode_prompts(load_tokenizer(path), PROMPTS), reduce="last")
    assert len(loads) == len(set(loads))
    assert not any(name.startswith("model.layers.2.") for name in loads)  # the last layer's input is enough
    assert "lm_head.weight" not in loads
    assert {n for n in loads if n.startswith("model.layers.1.")} == {
        n for n in source.names() if n.startswith("model.layers.1.")
    }
    # layers are read in order, one after the other
    layer_of = [int(n.split(".")[2]) for n in loads if n.startswith("model.layers.")]
    assert layer_of == sorted(layer_of)


def test_only_the_embedding_rows_of_the_prompt_tokens_are_read(tiny_model):
    path = tiny_model("llama")
    base = _open(path)
    source = base.files.tensors
    rows: list[tuple[str, int, int]] = []
    original_rows, original_load = source.load_rows, source.load
    source.load_rows = lambda name, start, stop: rows.append((name, start, stop)) or original_rows(name, start, stop)
    source.load = lambda name: pytest.fail(f"{name} was read whole") if "embed" in name else original_load(name)
    batch = encode_prompts(load_tokenizer(path), PROMPTS)
    layer_input_states(base, batch, reduce="last")
    assert sorted(start for _, start, _ in rows) == torch.unique(batch.input_ids).tolist()
    assert {name for name, _, _ in rows} == {"model.embed_tokens.weight"} and all(b == a + 1 for _, a, b in rows)


# -- gates from a plan ------------------------------------------------------------------------------------------
def test_hidden_gates_match_unpadded_full_forward_with_negatives_subtracted(tiny_family):
    from tiny_models import load_causal_lm

    base, (ft1, ft2) = tiny_family("llama")
    experts = [
        {"model": ft1, "positive_prompts": PROMPTS[:2], "negative_prompts": PROMPTS[2:]},
        {"model": ft2, "positive_prompts": PROMPTS[2:]},
    ]
    plan = plan_moe(parse_moe_config(moe_yaml(base, experts, gate_mode="hidden")))
    gates = compute_gates(plan, precise=True)
    model, tokenizer = load_causal_lm(base), load_tokenizer(base)

    def state(prompt):  # [layers, hidden] at the last token, prompt alone (no padding)
        ids = torch.tensor([tokenizer(tokenizer.bos_token + prompt, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
        return torch.stack([h[0, -1] for h in hidden[:3]])

    p = [state(prompt) for prompt in PROMPTS]
    expected0 = unit_rows((p[0] + p[1]) / 2 - p[2])
    expected1 = unit_rows(p[2])
    for layer, name in enumerate(plan.router_names):
        assert name == f"model.layers.{layer}.block_sparse_moe.gate.weight"
        torch.testing.assert_close(gates[name], torch.stack([expected0[layer], expected1[layer]]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("gate_mode", ["hidden", "hidden_avg"])
def test_default_hidden_gates_follow_mergekits_bfloat16_batches(tiny_family, gate_mode):
    """mergekit-moe's rule, found by running it: the model in bfloat16 with transformers'
    default attention; each expert's positive prompts, and its negative ones, one left-padded
    batch of their own, no position ids; last position (hidden) or the bfloat16 sum over
    every position, padding included, divided by the width (hidden_avg); bfloat16 means,
    difference and normalisation."""
    import transformers

    base, (ft1, ft2) = tiny_family("llama")
    experts = [
        {"model": ft1, "positive_prompts": PROMPTS[:2], "negative_prompts": PROMPTS[2:]},
        {"model": ft2, "positive_prompts": PROMPTS[1:]},
    ]
    plan = plan_moe(parse_moe_config(moe_yaml(base, experts, gate_mode=gate_mode)))
    gates = compute_gates(plan)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.bfloat16)
    tokenizer = load_tokenizer(base)

    def mean_state(prompts):  # [layers, hidden]
        ids = [tokenizer(tokenizer.bos_token + p, add_special_tokens=False)["input_ids"] for p in prompts]
        width = max(map(len, ids))
        input_ids = torch.tensor([[tokenizer.bos_token_id] * (width - len(i)) + i for i in ids])
        mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids])
        with torch.no_grad():
            hidden = model(input_ids=input_ids, attention_mask=mask, output_hidden_states=True).hidden_states[:3]
        per_prompt = [h[:, -1] if gate_mode == "hidden" else h.sum(dim=1) / h.shape[1] for h in hidden]
        return torch.stack(per_prompt).mean(dim=1)

    rows = [mean_state(PROMPTS[:2]) - mean_state(PROMPTS[2:]), mean_state(PROMPTS[1:])]
    expected = torch.stack(rows, dim=1)
    expected = expected / expected.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    for layer, name in enumerate(plan.router_names):
        assert gates[name].dtype == torch.float32
        assert torch.equal(gates[name], expected[layer].float())
    precise = compute_gates(plan, precise=True)
    assert not torch.equal(precise[plan.router_names[1]], gates[plan.router_names[1]])


def test_similar_prompts_warn_about_degenerate_routing_naming_the_experts(tiny_family):
    base, (ft1, ft2) = tiny_family("llama")
    long = "the quick brown fox jumps over the lazy dog while the cat sleeps by the warm fire"
    experts = [{"model": ft1, "positive_prompts": [long]}, {"model": ft2, "positive_prompts": [long + " a"]}]
    plan = plan_moe(parse_moe_config(moe_yaml(base, experts, gate_mode="cheap_embed")))
    with pytest.warns(UserWarning, match="prompts are too similar") as caught:
        compute_gates(plan)
    message = str(caught[0].message)
    assert f"experts[0] ({ft1}" in message and f"experts[1] ({ft2}" in message


def test_cheap_embed_gate_is_the_same_for_every_layer_and_unit_length(tiny_family):
    base, (ft1, ft2) = tiny_family("llama")
    experts = [{"model": ft1, "positive_prompts": ["the fox"]}, {"model": ft2, "positive_prompts": ["one two"]}]
    plan = plan_moe(parse_moe_config(moe_yaml(base, experts, gate_mode="cheap_embed")))
    gates = [compute_gates(plan)[name] for name in plan.router_names]
    assert all(torch.equal(gates[0], g) for g in gates)
    torch.testing.assert_close(gates[0].norm(dim=1), torch.ones(2))


def test_random_modes_need_no_prompts_and_follow_the_seed(tiny_family):
    base, (ft1, ft2) = tiny_family("llama")
    plan = plan_moe(parse_moe_config(moe_yaml(base, [ft1, ft2], gate_mode="uniform_random")))
    first, again, other = compute_gates(plan, seed=5), compute_gates(plan, seed=5), compute_gates(plan, seed=6)
    name = plan.router_names[1]
    assert torch.equal(first[name], again[name]) and not torch.equal(first[name], other[name])
    assert first[name].abs().max() <= 1 / math.sqrt(32)


def test_big_matrices_copied_in_row_blocks_give_the_same_states(tiny_model, monkeypatch):
    import mkmoe.streaming as streaming

    path = tiny_model("qwen2")
    batch = encode_prompts(load_tokenizer(path), PROMPTS)
    whole = layer_input_states(_open(path), batch, reduce="mean")
    monkeypatch.setattr(streaming, "_COPY_BLOCK_BYTES", 100)  # a few rows per read
    base = _open(path)
    blocks: list[str] = []
    original = base.files.tensors.load_rows
    base.files.tensors.load_rows = lambda name, a, b: blocks.append(name) or original(name, a, b)
    assert torch.equal(layer_input_states(base, batch, reduce="mean"), whole)
    assert any("mlp.down_proj" in name for name in blocks)
