"""Structured criteria against their definitions, computed independently on tiny networks."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from torch import nn

import brainsurgeon as bs
from brainsurgeon import registry
from brainsurgeon.context import PruneContext
from brainsurgeon.data import Calibration
from brainsurgeon.engine import build_options
from brainsurgeon.registry import get_method
from brainsurgeon.structured.groups import StructuredContext, StructuredMethod, build_groups, example_input
from brainsurgeon.structured.search import energy_first_counts
from brainsurgeon.targets import find_targets

from conftest import NUM_CLASSES, fit, tiny_data

COMMON = dict(num_samples=48, batch_size=16, seed=0, structure="channel")
STRUCTURED = sorted(n for n in bs.methods() if "channel" in get_method(n).structures)


def _mlp(act=nn.ReLU):
    torch.manual_seed(0)
    data = tiny_data((8,), n=48)
    model = nn.Sequential(nn.Linear(8, 12), act(), nn.Linear(12, 10), act(), nn.Linear(10, NUM_CLASSES))
    return fit(model, data).double(), (data[0].double(), data[1])


def _sctx(model, data, allocation="uniform"):
    opts = build_options("l1-norm", 0.5, "unstructured", allocation, 0.99, 1024, None, 0, "cpu", 16)
    calib = Calibration.from_data(data, 1024, 16)
    ctx = PruneContext(model=model, targets=find_targets(model), calib=calib, loss_fn=nn.CrossEntropyLoss(),
                       options=opts, generator=torch.Generator().manual_seed(0))
    return StructuredContext(ctx, build_groups(model, example_input(calib)))


def _hidden(model, x, upto):
    with torch.no_grad():
        return model[:upto](x)


def test_every_structured_method_is_registered_with_docs():
    assert {"l1-norm", "l2-norm", "bn-scale", "apoz", "entropy", "taylor", "activation-correlation", "icc",
            "random-search", "energy-aware"} <= set(STRUCTURED)
    for name in STRUCTURED:
        cls = get_method(name)
        assert issubclass(cls, StructuredMethod) and "unstructured" not in cls.structures
        assert cls.summary and re.search(r"arXiv:\d{4}\.\d{5}|(19|20)\d\d", cls.__doc__), name  # cites a paper


def test_norm_criteria_sum_over_residual_partners():
    from brainsurgeon.models import SmallResNet

    torch.manual_seed(0)
    model = SmallResNet((1, 8, 8), NUM_CLASSES).eval()
    sctx = _sctx(model, tiny_data((1, 8, 8), n=16))
    g = [g for g in sctx.groups if "layers.1.conv2" in g.layer_names][0]
    w1, w2 = model.layers[1].conv2.weight.detach(), model.layers[1].shortcut[0].weight.detach()
    l1 = w1.abs().sum((1, 2, 3)) + w2.abs().sum((1, 2, 3))
    l2 = (w1.pow(2).sum((1, 2, 3)) + w2.pow(2).sum((1, 2, 3))).sqrt()
    torch.testing.assert_close(get_method("l1-norm")().importance(g, sctx), l1.double())
    torch.testing.assert_close(get_method("l2-norm")().importance(g, sctx), l2.double())
    gamma = model.layers[1].bn2.weight.detach().abs() + model.layers[1].shortcut[1].weight.detach().abs()
    torch.testing.assert_close(get_method("bn-scale")().importance(g, sctx), gamma.double())


def test_bn_scale_without_batchnorm_is_refused():
    model, data = _mlp()
    with pytest.raises(bs.BrainsurgeonError, match="bn-scale needs an affine BatchNorm.*0"):
        bs.prune(model, data, "bn-scale", 0.5, **COMMON)


def test_apoz_matches_zero_fraction_and_needs_relu():
    model, data = _mlp()
    sctx = _sctx(model, data)
    h = _hidden(model, data[0], 2)  # post-ReLU output of layer 0
    expected = 1.0 - (h == 0).double().mean(0)
    torch.testing.assert_close(get_method("apoz")().importance(sctx.groups["0"], sctx), expected)
    tanh_model, data = _mlp(nn.Tanh)
    with pytest.raises(bs.BrainsurgeonError, match="post-ReLU"):
        bs.prune(tanh_model, data, "apoz", 0.5, **COMMON)


def test_entropy_matches_numpy_histogram():
    model, data = _mlp()
    sctx = _sctx(model, data)
    h = _hidden(model, data[0], 4).numpy()  # layer 2's units, post-ReLU
    scores = get_method("entropy")(bins=8).importance(sctx.groups["2"], sctx)
    for u in range(h.shape[1]):
        col = h[:, u]
        if col.max() == col.min():
            assert scores[u] == 0
            continue
        counts, _ = np.histogram(col, bins=8, range=(col.min(), col.max()))
        p = counts[counts > 0] / len(col)
        assert scores[u].item() == pytest.approx(-(p * np.log(p)).sum(), abs=1e-9)


def test_taylor_matches_per_sample_autograd():
    """Theta_u = mean_n |a_nu * dl_n/da_nu| (S = 1 for a Linear unit), l_n the per-sample loss."""
    model, data = _mlp()
    sctx = _sctx(model, data)
    x, y = data
    expected = torch.zeros(12, dtype=torch.float64)
    for n in range(len(x)):
        a = model[:2](x[n : n + 1]).detach().requires_grad_(True)
        loss = nn.functional.cross_entropy(model[2:](a), y[n : n + 1])
        (g,) = torch.autograd.grad(loss, a)
        expected += (a * g).detach()[0].abs()
    expected /= len(x)
    torch.testing.assert_close(get_method("taylor")().importance(sctx.groups["0"], sctx), expected, rtol=1e-9, atol=1e-12)


def test_activation_correlation_matches_numpy():
    model, data = _mlp()
    sctx = _sctx(model, data)
    a = _hidden(model, data[0], 2).numpy()
    z = _hidden(model, data[0], 3).numpy()  # the consumer's outputs
    expected = []
    for u in range(a.shape[1]):
        if a[:, u].std() == 0:
            expected.append(0.0)
            continue
        r = [abs(np.corrcoef(a[:, u], z[:, j])[0, 1]) for j in range(z.shape[1]) if z[:, j].std() > 0]
        expected.append(max(r))
    got = get_method("activation-correlation")().importance(sctx.groups["0"], sctx)
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-9)


def test_icc_matches_anova_and_needs_labels():
    from brainsurgeon.structured.criteria import icc

    g = torch.Generator().manual_seed(0)
    y = torch.tensor([0] * 5 + [1] * 7 + [2] * 4)
    f = torch.randn(16, 3, generator=g, dtype=torch.float64)
    f[:, 0] = y.double() * 3  # fully explained by the class: ICC = 1
    f[:, 2] = 1.0  # constant: 0
    # one-way ANOVA by hand
    fn = f[:, 1].numpy()
    groups = [fn[y.numpy() == c] for c in range(3)]
    n, k = len(fn), 3
    msb = sum(len(gr) * (gr.mean() - fn.mean()) ** 2 for gr in groups) / (k - 1)
    msw = sum(((gr - gr.mean()) ** 2).sum() for gr in groups) / (n - k)
    n0 = (n - sum(len(gr) ** 2 for gr in groups) / n) / (k - 1)
    got = icc(f, y)
    assert got[0].item() == pytest.approx(1.0)
    assert got[1].item() == pytest.approx((msb - msw) / (msb + (n0 - 1) * msw))
    assert got[2].item() == 0.0
    model, (x, _) = _mlp()
    with pytest.raises(bs.BrainsurgeonError, match="icc.* needs integer class labels"):
        bs.prune(model, (x, torch.randn(len(x), NUM_CLASSES, dtype=torch.float64)), "icc", 0.5,
                 loss_fn=nn.MSELoss(), **COMMON)


def test_random_search_keeps_the_best_trial_and_is_seeded():
    model, data = _mlp()
    res = bs.prune(model, data, "random-search", 0.5, num_trials=6, **COMMON)
    rs = res.report["random_search"]
    assert len(rs["losses"]) == 6 and rs["best_loss"] == min(rs["losses"])
    loss = nn.functional.cross_entropy(res.model(data[0]), data[1]).item()
    assert loss == pytest.approx(rs["best_loss"], rel=1e-9)  # the compact model is the best trial
    again = bs.prune(model, data, "random-search", 0.5, num_trials=6, **COMMON)
    assert all(torch.equal(res.masks[k], again.masks[k]) for k in res.masks)
    with pytest.raises(bs.BrainsurgeonError, match="uniform"):
        bs.prune(model, data, "random-search", 0.5, allocation="global", **COMMON)


def test_energy_aware_refit_is_the_least_squares_solution():
    model, data = _mlp()
    x = data[0]
    res = bs.prune(model, data, "energy-aware", 0.5, damping=1e-10, compact=False, **COMMON)
    same_sel = bs.prune(model, data, "l2-norm", 0.5, compact=False, **COMMON)
    assert all(torch.equal(res.masks[k], same_sel.masks[k]) for k in res.masks)  # magnitude selection
    keep0 = res.masks["0"]
    # layer 2 reads layer 0's kept units: its kept columns solve min ||Z - b - A_K W_K^T||
    a = _hidden(same_sel.model, x, 2)[:, keep0]
    z = model[2](_hidden(model, x, 2)) - model[2].bias.detach()
    w_ls = torch.linalg.lstsq(a, z).solution.T
    rows = res.masks["2"]  # layer 2's own pruned rows are zeroed afterwards
    torch.testing.assert_close(res.model[2].weight.detach()[rows][:, keep0], w_ls[rows], atol=1e-6, rtol=1e-6)
    # and so it reconstructs layer 2's output better than the same selection without refit
    err = lambda m: (m[:3](x) - model[:3](x))[:, rows].pow(2).sum().item()  # noqa: E731
    assert err(res.model) < err(same_sel.model)


def test_energy_first_allocation_prunes_hungry_groups_first():
    model, data = _mlp()
    groups = _sctx(model, data).groups
    counts, capped = energy_first_counts(groups, {"0": 10.0, "2": 1.0}, 0.5, 0.8)
    assert counts == {"0": 9, "2": 2} and capped == ["0"]  # 11 of 22 units: 0 up to its cap first
    with pytest.raises(bs.BrainsurgeonError, match="max_layer_sparsity"):
        energy_first_counts(groups, {"0": 1.0, "2": 1.0}, 0.5, 0.3)


def test_a_custom_importance_plugs_in(monkeypatch):
    class LastUnitsFirst(StructuredMethod):
        """Test only (2024): scores units by their index."""

        summary = "test only"

        def importance(self, group, sctx):
            return torch.arange(group.num_units, dtype=torch.float64)

    monkeypatch.setitem(registry._REGISTRY, "test-index", LastUnitsFirst)
    LastUnitsFirst.name = "test-index"
    model, data = _mlp()
    res = bs.prune(model, data, "test-index", 0.5, **COMMON)
    assert res.masks["0"].tolist() == [False] * 6 + [True] * 6


def test_energy_aware_refit_of_a_conv_consumer_reduces_its_error():
    from brainsurgeon.models import LeNet5

    torch.manual_seed(0)
    model = LeNet5((1, 16, 16), NUM_CLASSES).double().eval()
    x, y = tiny_data((1, 16, 16), n=32)
    x = x.double()
    res = bs.prune(model, (x, y), "energy-aware", 0.5, compact=False, **COMMON)
    plain = bs.prune(model, (x, y), "l2-norm", 0.5, compact=False, **COMMON)
    rows = res.masks["features.3"]
    err = lambda m: (m.features[:4](x) - model.features[:4](x))[:, rows].pow(2).sum().item()  # noqa: E731
    assert err(res.model) < 0.9 * err(plain.model)
