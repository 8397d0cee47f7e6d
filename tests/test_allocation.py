"""Masks from scores: exact counts, the global cap, N:M validity, determinism."""
import pytest
import torch

from brainsurgeon.allocation import (
    Structure,
    allocate_masks,
    global_counts,
    layer_sparsities,
    lowest_k_mask,
    nm_mask,
)
from brainsurgeon.errors import BrainsurgeonError


def _scores(seed=0, b_scale=0.1):
    g = torch.Generator().manual_seed(seed)
    return {
        "a": torch.rand(30, 20, generator=g),
        "b": torch.rand(10, 7, generator=g) * b_scale,
        "c": torch.rand(5, 3, 2, 2, generator=g),
    }


def test_lowest_k_prunes_exactly_the_k_lowest():
    s = torch.tensor([[0.5, 0.1, 0.9], [0.3, 0.2, 0.7]])
    keep = lowest_k_mask(s, 3)
    assert keep.tolist() == [[True, False, True], [False, False, True]]


def test_lowest_k_ties_broken_by_position():
    s = torch.zeros(10)
    assert lowest_k_mask(s, 4).tolist() == [False] * 4 + [True] * 6


@pytest.mark.parametrize("sparsity", [0.0, 0.33, 0.5, 0.9, 0.99])
def test_uniform_exact_per_layer(sparsity):
    masks = allocate_masks(_scores(), sparsity, "uniform", 0.99, Structure.parse("unstructured"))
    for name, s in _scores().items():
        assert int((~masks[name]).sum()) == round(sparsity * s.numel())


def test_global_is_one_threshold_and_exact_overall():
    scores = _scores(b_scale=0.8)  # no layer reaches the cap here
    masks = allocate_masks(scores, 0.6, "global", 0.99, Structure.parse("unstructured"))
    total = sum(s.numel() for s in scores.values())
    assert sum(int((~m).sum()) for m in masks.values()) == round(0.6 * total)
    pruned_max = max(scores[n][~masks[n]].max() for n in scores)
    kept_min = min(scores[n][masks[n]].min() for n in scores)
    assert pruned_max <= kept_min  # one threshold separates pruned from kept
    # layer "b" has the smallest scores: global allocation prunes it harder than the average
    assert (~masks["b"]).float().mean() > 0.6


def test_global_cap_binds_and_is_respected():
    scores = _scores()
    counts = global_counts(scores, 0.6, max_layer_sparsity=0.7)
    assert counts["b"] == int(0.7 * scores["b"].numel())
    assert sum(counts.values()) == round(0.6 * sum(s.numel() for s in scores.values()))
    sp = layer_sparsities(scores, 0.6, "global", 0.7)
    assert all(v <= 0.7 + 1e-12 for v in sp.values())


def _global_counts_by_sorting(scores, sparsity, cap_fraction):
    """The definition: a stable sort of every layer's cap lowest scores, concatenated in layer order."""
    from brainsurgeon.allocation import layer_cap, num_pruned

    k = num_pruned(sum(s.numel() for s in scores.values()), sparsity)
    eligible, owners = [], []
    for i, s in enumerate(scores.values()):
        cap = layer_cap(s.numel(), cap_fraction)
        eligible.append(torch.sort(s.reshape(-1).double(), stable=True).values[:cap])
        owners.append(torch.full((cap,), i))
    chosen = torch.cat(owners)[torch.argsort(torch.cat(eligible), stable=True)[:k]]
    return {name: int((chosen == i).sum()) for i, name in enumerate(scores)}


@pytest.mark.parametrize("seed", range(6))
def test_global_counts_by_selection_equal_the_sorted_definition(seed):
    g = torch.Generator().manual_seed(seed)
    sizes = [int(x) for x in torch.randint(1, 400, (5,), generator=g)]
    scores = {f"l{i}": torch.randint(0, 6, (n,), generator=g).float() for i, n in enumerate(sizes)}  # many ties
    if seed % 2:
        scores["l1"] = torch.rand(sizes[1], generator=g, dtype=torch.float64)
        scores["l2"][::7] = float("nan")  # NaN counts as the largest score
    if seed == 4:
        scores["l3"] = scores["l3"].bfloat16()
    for sparsity in (0.0, 0.1, 0.5, 0.83, 0.97):
        for cap in (0.99, 0.9, 0.6):
            expected = _global_counts_by_sorting(scores, sparsity, cap)
            if sum(expected.values()) < round(sparsity * sum(sizes)):  # the cap cannot hold it: refused
                with pytest.raises(BrainsurgeonError, match="max_layer_sparsity"):
                    global_counts(scores, sparsity, max_layer_sparsity=cap)
                continue
            assert global_counts(scores, sparsity, max_layer_sparsity=cap) == expected, (sparsity, cap)


def test_global_cap_too_low_is_a_clear_error():
    with pytest.raises(BrainsurgeonError, match="max_layer_sparsity"):
        global_counts({"a": torch.rand(10)}, 0.8, max_layer_sparsity=0.5)


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8)])
def test_nm_mask_keeps_n_largest_in_each_group(n, m):
    s = torch.rand(6, 16, generator=torch.Generator().manual_seed(1))
    keep = nm_mask(s, n, m)
    groups = keep.reshape(6, -1, m)
    assert (groups.sum(-1) == n).all()
    sg = s.reshape(6, -1, m)
    assert (sg[groups].reshape(6, -1, n).min(-1).values >= sg[~groups].reshape(6, -1, m - n).max(-1).values).all()


def test_nm_conv_weights_grouped_along_flattened_inputs():
    s = torch.rand(3, 2, 2, 2)  # 8 inputs per row
    keep = nm_mask(s, 2, 4)
    assert keep.shape == s.shape and (keep.reshape(3, 2, 4).sum(-1) == 2).all()


def test_nm_needs_divisible_rows():
    with pytest.raises(BrainsurgeonError, match="multiple of 4"):
        nm_mask(torch.rand(3, 6), 2, 4)


@pytest.mark.parametrize("bad", ["3:2", "0:4", "2-4", "channels"])
def test_structure_parse_errors(bad):
    with pytest.raises(BrainsurgeonError):
        Structure.parse(bad)


def test_structure_parse_nm():
    st = Structure.parse("2:4")
    assert st.is_nm and (st.n, st.m) == (2, 4) and st.sparsity == 0.5 and str(st) == "2:4"


def test_lowest_k_mask_equals_a_stable_sort_with_ties_and_nan():
    """The selection keeps exactly what a stable argsort would: ties by position, NaN as the largest."""
    from brainsurgeon.allocation import lowest_k_mask

    g = torch.Generator().manual_seed(0)
    for trial in range(200):
        n = int(torch.randint(1, 40, (1,), generator=g))
        s = torch.randint(0, 4, (n,), generator=g).float()
        if trial % 3 == 0:
            s[int(torch.randint(0, n, (1,), generator=g))] = float("nan")
        for k in range(n + 1):
            expected = torch.ones(n, dtype=torch.bool)
            expected[torch.argsort(s.double(), stable=True)[:k]] = False
            assert torch.equal(lowest_k_mask(s, k), expected), (s, k)
