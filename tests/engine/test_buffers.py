"""Read buffers are reused only when nothing else can still see them."""

from __future__ import annotations

import torch

from mksuite.common.loading.buffers import READ_BUFFERS, BufferPool, typed_view


def _loaded(pool: BufferPool, nbytes: int = 1024) -> torch.Tensor:
    buffer = pool.take(nbytes)
    return typed_view(buffer, torch.float32, (nbytes // 4 // 8, 8))


def test_a_sole_owner_is_kept_and_its_memory_handed_out_again():
    pool = BufferPool()
    tensor = _loaded(pool)
    pointer = tensor.data_ptr()
    assert pool.give(tensor)
    del tensor
    again = pool.take(1024)
    assert again.data_ptr() == pointer and pool.reused == 1
    assert pool.take(1024).data_ptr() != pointer  # handed out once only


def test_anything_still_seen_elsewhere_is_refused():
    pool = BufferPool()
    tensor = _loaded(pool)
    view = tensor[:2]
    assert not pool.give(tensor)  # a view shares the storage
    del view
    alias = tensor
    assert not pool.give(tensor)  # another Python reference
    del alias
    assert not pool.give(tensor.view(-1))  # a view itself (it has a _base)
    assert pool.give(tensor)


def test_the_pool_is_bounded_and_new_sizes_push_out_old_ones():
    pool = BufferPool(max_bytes=1500)
    first, second = _loaded(pool), _loaded(pool)
    assert pool.give(first)
    assert pool.give(second)  # the older buffer makes room
    assert pool._held == 1024
    big = _loaded(pool, 2048)
    assert not pool.give(big)  # larger than the whole pool


def test_a_merge_reuses_read_buffers_without_changing_its_output(tiny_family, tmp_path):
    from mkmerge.methods import METHODS
    from mkmerge.recipe import parse_recipe
    from mkmerge.run import run_merge
    from mksuite.common.build import BuildOptions

    from tiny_models import read_tensors

    base, (a, b) = tiny_family("llama", hidden=64, vocab=200)
    text = f"""
merge_method: linear
models:
  - {{model: {base}, parameters: {{weight: 0.2}}}}
  - {{model: {a}, parameters: {{weight: 0.3}}}}
  - {{model: {b}, parameters: {{weight: 0.5}}}}
"""
    READ_BUFFERS.clear()
    before = READ_BUFFERS.reused
    # One read in flight ahead of compute, so each read comes after the last merge freed its
    # buffers (with the default budget a tiny model is read whole before any buffer is free).
    options = BuildOptions(prefetch_bytes=1)
    run_merge(parse_recipe(text, known_methods=METHODS.keys()), tmp_path / "out", options, write_card=False)
    assert READ_BUFFERS.reused > before
    merged = read_tensors(tmp_path / "out")
    inputs = [read_tensors(p) for p in (base, a, b)]
    name = "model.layers.1.mlp.up_proj.weight"
    w = torch.tensor([0.2, 0.3, 0.5])
    expected = sum(w[i] * inputs[i][name] for i in range(3)) / w.sum()
    torch.testing.assert_close(merged[name], expected, rtol=1e-6, atol=1e-6)
