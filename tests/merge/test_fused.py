"""The fused kernels give the torch form's bits in bfloat16, float16 and float32, case by case
(mkmerge/methods/fused.py)."""

import itertools

import pytest
import torch

from mkmerge.methods import fused
from mkmerge.methods.sort_order import order_keys
from mkmerge.methods.task_arithmetic import task_vector_merge

pytestmark = pytest.mark.skipif(not fused.available(), reason="numba is not installed")
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# Per dtype: large values (twice them overflows) and subnormals.
_EXTREMES = {torch.bfloat16: (3e38, 1e-40), torch.float16: (6e4, 6e-8), torch.float32: (3e38, 1e-40)}


def _family(
    count: int, numel: int = 40_000, seed: int = 0, dtype: torch.dtype = torch.bfloat16, infinite: bool = False
):
    """A base and ``count`` fine-tunes in ``dtype`` with the awkward cases in them: entries
    equal to the base (zero deltas), magnitudes repeated many times (ties at the top-k
    threshold, in float32 too: the base has bfloat16's few significant bits, and the noise
    is on a 1/128 grid, so the deltas are exact), deltas of opposite signs that cancel in the
    election sum, and large and subnormal values; with ``infinite``, deltas that overflow."""
    g = torch.Generator().manual_seed(seed)
    large, tiny = _EXTREMES[dtype]
    base = torch.randn(numel, generator=g).to(torch.bfloat16).to(dtype)
    base[:64] = torch.tensor([0.0, -0.0, tiny, -tiny, large, -large, 1.0, -1.0] * 8, dtype=dtype)
    tensors = []
    for i in range(count):
        noise = torch.randn(numel, generator=g) * 0.02
        noise[numel // 2 :] = torch.round(noise[numel // 2 :] * 128) / 128  # few distinct magnitudes: ties
        t = (base.float() + noise).to(dtype)
        t[i * 100 : i * 100 + 500] = base[i * 100 : i * 100 + 500]  # zero deltas
        tensors.append(t)
    if count >= 2:
        tensors[1][1000:2000] = (2 * base[1000:2000].float() - tensors[0][1000:2000].float()).to(dtype)
    if infinite:  # deltas of ∓2·large and ∓inf, of opposite signs where two inputs have them
        tensors[-1][4:64:8] = -base[4:64:8]
        tensors[0][5:64:8] = -base[5:64:8]
        if count >= 2:
            tensors[-1][5:64:8] = float("-inf")
    return base, tensors


def _torch_form(monkeypatch, **kwargs):
    with monkeypatch.context() as patch:
        patch.setattr(fused, "applies", lambda *args: False)
        return task_vector_merge(**kwargs)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit, except that NaNs need only both be NaN (torch's own payloads vary by code path)."""
    if a.dtype != b.dtype or a.shape != b.shape or not torch.equal(a.isnan(), b.isnan()):
        return False
    numbers = ~a.isnan()
    bits = torch.int32 if a.dtype == torch.float32 else torch.int16
    return torch.equal(a[numbers].view(bits), b[numbers].view(bits))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("count", [1, 2, 3, 4])
@pytest.mark.parametrize(
    "consensus, normalize, lambda_", [(True, True, 1.0), (True, False, 0.7), (False, True, 1.0), (False, False, 1.3)]
)
def test_magnitude_sparsified_merges_match_the_torch_form(monkeypatch, count, consensus, normalize, lambda_, dtype):
    base, tensors = _family(count, dtype=dtype, infinite=True)
    weights = [0.7, -0.3, 1.1, 0.45][:count]
    densities = [0.5, 0.31, 0.9, 0.05][:count]
    kwargs = dict(base=base, tensors=tensors, weights=weights, densities=densities, sparsifier="magnitude",
                  consensus=consensus, normalize=normalize, lambda_=lambda_)  # fmt: skip
    assert _same_bits(task_vector_merge(**kwargs), _torch_form(monkeypatch, **kwargs))


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_threshold_ties_are_broken_as_torchs_sort_breaks_them_in_both_forms(monkeypatch, dtype):
    base = torch.zeros(1000, dtype=dtype)
    tensors = [torch.full((1000,), 0.5, dtype=dtype), torch.full((1000,), -0.25, dtype=dtype)]
    tensors[0][::7] = 0.75
    kwargs = dict(base=base, tensors=tensors, weights=[1.0, 1.0], densities=[0.3, 0.5], sparsifier="magnitude",
                  consensus=True, normalize=True)  # fmt: skip
    merged = task_vector_merge(**kwargs)
    assert _same_bits(merged, _torch_form(monkeypatch, **kwargs))
    # The first input keeps its 143 entries at 0.75 and 157 of its 0.5s, the second 500 of its
    # entries (all equal): which ones, torch's own sort says. The first wins wherever it kept one.
    kept = []
    for tensor, k in ((tensors[0], 300), (tensors[1], 500)):
        mask = torch.zeros(1000, dtype=torch.bool)
        mask[torch.argsort(tensor.float().abs(), descending=True)[:k]] = True
        kept.append(mask)
    expected = torch.where(kept[0], tensors[0], torch.where(kept[1], tensors[1], torch.zeros_like(base)))
    assert torch.equal(merged, expected)
    assert int((merged == 0.75).sum()) == 143 and int((merged == 0.5).sum()) == 157
    assert not torch.equal(kept[1], torch.arange(1000) < 500)  # not simply the lowest indices


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rescale, consensus", list(itertools.product([True, False], [True, False])))
def test_dare_masks_and_rescale_match_the_torch_form(monkeypatch, rescale, consensus, dtype):
    base, tensors = _family(3, seed=3, dtype=dtype, infinite=not rescale)  # an infinite L1 norm: NaN everywhere
    generators = lambda: [torch.Generator().manual_seed(10 + i) for i in range(3)]
    kwargs = dict(base=base, tensors=tensors, weights=[0.5, 0.3, 0.4], densities=[0.4, 0.7, 1.0], sparsifier="random",
                  rescale=rescale, consensus=consensus, normalize=False)  # fmt: skip
    fast = task_vector_merge(generators=generators(), **kwargs)
    assert _same_bits(fast, _torch_form(monkeypatch, generators=generators(), **kwargs))


@pytest.mark.parametrize("dtype", DTYPES)
def test_task_arithmetic_matches_the_torch_form_with_inputs_of_another_dtype(monkeypatch, dtype):
    base, tensors = _family(2, seed=5, dtype=dtype)
    other = torch.float16 if dtype == torch.float32 else torch.float32
    tensors = [
        (tensors[0].double() * 1.001).to(other),
        tensors[1],
    ]  # converted to the compute dtype first, in both forms
    kwargs = dict(base=base, tensors=tensors, weights=[0.6, 0.6], densities=[1.0, 1.0], lambda_=0.5)
    assert _same_bits(task_vector_merge(**kwargs), _torch_form(monkeypatch, **kwargs))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_delta_histograms_are_bincounts_of_the_magnitude_keys(dtype):
    base, tensors = _family(2, seed=7, dtype=dtype)
    for tensor, counts in zip(tensors, fused.delta_histograms(base, tensors)):
        expected = torch.bincount(order_keys((tensor - base).abs().reshape(-1)), minlength=1 << 16)
        assert torch.equal(counts, expected)
        assert torch.equal(
            torch.from_numpy(fused.delta_keys(base, tensor)), order_keys((tensor - base).abs().reshape(-1))
        )


def test_float32_delta_histograms_count_the_keys_two_16_bit_digits_at_a_time():
    base, tensors = _family(2, seed=7, dtype=torch.float32)
    keys = [order_keys((t - base).abs().reshape(-1)) for t in tensors]
    for k, counts in zip(keys, fused.delta_histograms(base, tensors)):
        assert torch.equal(counts, torch.bincount(k >> 16, minlength=1 << 16))
    buckets = [int(k.max()) >> 16, int(k.median()) >> 16]
    for k, bucket, counts in zip(keys, buckets, fused.delta_histograms(base, tensors, buckets)):
        assert counts.sum() > 0
        assert torch.equal(counts, torch.bincount(k[(k >> 16) == bucket] & 0xFFFF, minlength=1 << 16))
    assert torch.equal(torch.from_numpy(fused.delta_keys(base, tensors[0])), keys[0])


def test_cpu_merges_of_up_to_four_inputs_in_the_fused_dtypes_are_fused():
    base, tensors = _family(4, numel=100)
    assert fused.applies(base, tensors[:4])
    assert not fused.applies(base, tensors + [tensors[0]])  # five inputs: torch's stack grouping differs
    assert fused.applies(base.float(), [t.float() for t in tensors])
    assert fused.applies(base.half(), [t.half() for t in tensors])
    assert not fused.applies(base.double(), [t.double() for t in tensors])
    assert not fused.applies(base, [tensors[0][:50]])


def _linear_matches_the_torch_form(monkeypatch, tensors, weights, normalize):
    from mkmerge.methods.linear import linear_merge

    with monkeypatch.context() as patch:
        patch.setattr(fused, "linear_applies", lambda tensors: False)
        reference = linear_merge(tensors, weights, normalize)
    assert fused.linear_applies(tensors)
    assert _same_bits(linear_merge(tensors, weights, normalize), reference)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("count", [1, 2, 3, 4, 6])
@pytest.mark.parametrize("normalize", [True, False])
def test_linear_matches_the_torch_form(monkeypatch, count, normalize, dtype):
    _, tensors = _family(count, seed=11, dtype=dtype)
    _linear_matches_the_torch_form(monkeypatch, tensors, [0.3, 0.45, -0.2, 0.77, 0.11, 0.6][:count], normalize)


@pytest.mark.parametrize("count", [1, 3, 5])
@pytest.mark.parametrize("normalize", [True, False])
def test_float32_linear_matches_the_torch_form(monkeypatch, count, normalize):
    g = torch.Generator().manual_seed(17)
    tensors = [torch.randn(50_001, generator=g) * torch.exp(torch.randn(50_001, generator=g) * 4) for _ in range(count)]
    _linear_matches_the_torch_form(monkeypatch, tensors, [0.3, -0.45, 0.2, 0.77, 0.11][:count], normalize)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t", [0.1, 0.4, 0.93])
def test_slerp_mix_matches_the_torch_form(monkeypatch, t, dtype):
    from mkmerge.methods.slerp import slerp_merge

    g = torch.Generator().manual_seed(13)
    base = torch.randn(40_000, generator=g).to(dtype)
    other = (base.float() * 0.5 + torch.randn(40_000, generator=g)).to(dtype)  # far from parallel
    with monkeypatch.context() as patch:
        patch.setattr(fused, "mix_applies", lambda tensors: False)
        reference = slerp_merge(t, base, other)
    assert not reference.isnan().any()
    assert _same_bits(slerp_merge(t, base, other), reference)


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_cut_among_zero_deltas_needs_no_replay_and_gives_the_torch_forms_bits(monkeypatch, dtype):
    from mkmerge.methods import task_vector_fused

    base, tensors = _family(2, seed=5, dtype=dtype)
    for t in tensors:  # half of each delta exactly zero (signed zeros included): the cut falls among them
        t[:20000] = base[:20000]
    kwargs = dict(base=base, tensors=tensors, weights=[0.6, 0.4], densities=[0.7, 0.9], sparsifier="magnitude",
                  consensus=True, normalize=True)  # fmt: skip

    def no_replay(*args):
        raise AssertionError("a zero threshold was replayed")

    with monkeypatch.context() as patch:
        patch.setattr(task_vector_fused, "_sorted_ties", no_replay)
        merged = task_vector_merge(**kwargs)
    assert _same_bits(merged, _torch_form(monkeypatch, **kwargs))  # the torch form keeps torch's exact set


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_bits_do_not_depend_on_how_many_threads_split_the_tensor(monkeypatch, dtype):
    from mkmerge.methods.linear import linear_merge

    from method_helpers import threads

    base, tensors = _family(3, numel=1_100_003, seed=17, dtype=dtype)  # four threads' worth, with a ragged end
    dare = lambda: dict(generators=[torch.Generator().manual_seed(i) for i in range(3)])
    runs = {
        "ties": lambda: task_vector_merge(
            base, tensors, [0.5, 0.3, 0.4], [0.5, 0.2, 0.8], sparsifier="magnitude", consensus=True, normalize=True
        ),
        "dare_ties": lambda: task_vector_merge(
            base, tensors, [0.5, 0.3, 0.4], [0.5, 0.2, 0.8], sparsifier="random", consensus=True, rescale=True, **dare()
        ),
        "linear": lambda: linear_merge(tensors, [0.2, 0.3, 0.5]),
        "histograms": lambda: torch.stack(fused.delta_histograms(base, tensors)),
    }
    for name, run in runs.items():
        with threads(1):
            one = run()
        with threads(4):
            four = run()
        assert torch.equal(one, four), name
    with threads(4):
        assert _same_bits(runs["dare_ties"](), _torch_form(monkeypatch, base=base, tensors=tensors, weights=[0.5, 0.3, 0.4], densities=[0.5, 0.2, 0.8],
                                                            sparsifier="random", consensus=True, rescale=True, **dare()))  # fmt: skip
        # the ties on the threshold (replayed, then listed) are found across all four ranges
        assert _same_bits(runs["ties"](), _torch_form(monkeypatch, base=base, tensors=tensors, weights=[0.5, 0.3, 0.4], densities=[0.5, 0.2, 0.8],
                                                       sparsifier="magnitude", consensus=True, normalize=True))  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("numel", [40_003, 1_100_003])  # one range; four threads' ranges (ragged ends)
def test_the_equal_key_policies_keep_exactly_the_entries_a_mask_names(dtype, numel):
    """fused.merge's "first n on the threshold" and "those listed" policies against the same
    merge given the mask they mean, built in torch from the deltas' magnitude keys."""
    from method_helpers import threads

    base, tensors = _family(2, numel=numel, seed=5, dtype=dtype)
    rules_for = {}
    masks = []
    g = torch.Generator().manual_seed(3)
    for i, tensor in enumerate(tensors):
        delta = (tensor.float() - base.float()).to(dtype)
        keys = order_keys(delta.abs())
        values, counts = torch.unique(keys[keys != 0], return_counts=True)
        key = int(values[counts.argmax()])  # the most repeated non-zero magnitude
        on_key = keys == key
        positions = torch.nonzero(on_key).flatten()
        if i == 0:  # the first n entries on the key, n spanning several ranges
            n = int(positions.numel() * 0.6)
            rule = fused.InputRule(0.6, fused.MODE_MAGNITUDE, key=key, equal=n)
            chosen = positions[:n]
        else:  # those a list marks, in index order
            listed = torch.rand(positions.numel(), generator=g) < 0.3
            rule = fused.InputRule(0.6, fused.MODE_LISTED, key=key, equal=0, listed=listed.numpy().astype("uint8"))
            chosen = positions[listed]
        mask = keys > key
        mask[chosen] = True
        rules_for[i] = rule
        masks.append(fused.InputRule(0.6, fused.MODE_MASK, mask=mask.numpy()))
    with threads(4):
        expected = fused.merge(base, tensors, masks, consensus=True, normalize=True, lambda_=1.0)
        got = fused.merge(base, tensors, [rules_for[0], rules_for[1]], consensus=True, normalize=True, lambda_=1.0)
    assert _same_bits(got, expected)


def _float16_conversions():
    """(widen, round) loops over arrays, for each float16 conversion the kernels may use:
    the branch-free one in integer arithmetic, and the CPU's own where it has one (F16C)."""
    import numba

    from mkmerge.methods import fused_kernels as k

    pairs = {"soft": (k._widen_half_soft, k._round_half_soft)}
    if k._F16C:
        pairs["f16c"] = (k._f32_from_half, k._half_from_f32)
    loops = {}
    for name, (widen, round_) in pairs.items():

        def widen_all(bits, out, widen=widen):
            for j in range(bits.size):
                out[j] = widen(bits[j])

        def round_all(values, out, round_=round_):
            for j in range(values.size):
                out[j] = round_(values[j])

        loops[name] = (numba.njit(widen_all), numba.njit(round_all))
    return loops


def test_float16_conversions_give_torchs_bits_for_every_half_and_millions_of_floats():
    import numpy as np

    every_half = np.arange(1 << 16, dtype=np.uint16).view(np.int16)
    widened_by_torch = torch.from_numpy(every_half.copy()).view(torch.float16).float()
    g = np.random.default_rng(0)
    floats = np.concatenate([
        g.integers(0, 1 << 32, size=2_000_000, dtype=np.uint64).astype(np.uint32).view(np.float32),  # every exponent, NaNs
        widened_by_torch.numpy(),  # exact halves, and just above and below each
        np.nextafter(widened_by_torch.numpy(), np.float32(np.inf)),
        np.nextafter(widened_by_torch.numpy(), np.float32(-np.inf)),
        (widened_by_torch.numpy()[:-1] + widened_by_torch.numpy()[1:]) / 2,  # midpoints: ties to even
        np.float32([65504, 65519.996, 65520, 65536, 2.0**-24, 2.0**-25, 1.5 * 2.0**-25, 2.0**-26, 1e-45, 0.0, -0.0]),
    ]).astype(np.float32)  # fmt: skip
    rounded_by_torch = torch.from_numpy(floats).to(torch.float16)
    for name, (widen_all, round_all) in _float16_conversions().items():
        widened = np.empty(every_half.size, dtype=np.float32)
        widen_all(every_half, widened)
        assert _same_bits(torch.from_numpy(widened), widened_by_torch), name
        rounded = np.empty(floats.size, dtype=np.int16)
        round_all(floats, rounded)
        assert _same_bits(torch.from_numpy(rounded).view(torch.float16), rounded_by_torch), name


@pytest.mark.parametrize("dtype", DTYPES)
def test_delta_l1_partials_are_the_torch_forms_partials_of_the_delta_and_the_masked_delta(dtype, monkeypatch):
    import math

    from mkmerge.methods import reductions

    monkeypatch.setattr(reductions, "CHUNKS_PER_BLOCK", 3)  # several spans, and a ragged last chunk
    base, tensors = _family(2, numel=5 * reductions.CHUNK + 123, seed=21, dtype=dtype, infinite=True)
    mask = torch.rand(base.shape, generator=torch.Generator().manual_seed(1)) < 0.4
    for tensor in tensors:
        delta = tensor - base
        expected = (reductions.l1_partials(delta), reductions.l1_partials(delta * mask))
        got = fused.delta_l1_partials(base, tensor, mask.numpy())
        for want, have in zip(expected, got):
            assert len(want) == len(have) == 6
            assert all(w == h or (math.isnan(w) and math.isnan(h)) for w, h in zip(want, have))
    # the infinite deltas of the last input: its unmasked partial is infinite, not a number
    assert math.isinf(got[0][0])
