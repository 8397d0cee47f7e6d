"""EigenDamage: the eigenbasis, EKFAC eigenvalues against brute force, exact decompositions."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

import brainsurgeon as bs
from brainsurgeon.data import Calibration
from brainsurgeon.structured.eigendamage import (
    FORMS,
    decompose_layer,
    eigenbasis,
    eigendamage,
    ekfac_eigenvalues,
    from_eigenbasis,
    importance,
    kfac_channel_factors,
    to_eigenbasis,
)
from brainsurgeon.targets import find_targets

TOL = 1e-10


def _no_track(it, desc, total=None):
    return it


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double().eval()


def cnn():
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.Tanh(),
        nn.Flatten(), nn.Linear(4 * 2 * 2, 3),
    ).double().eval()


def data_for(model, n=8):
    g = torch.Generator().manual_seed(2)
    shape = (n, 6) if isinstance(model[0], nn.Linear) else (n, 2, 4, 4)
    return torch.randn(shape, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def per_sample_weight_grads(model, name, x, y):
    """Per-sample gradients of the per-sample cross-entropy w.r.t. ``name``.weight (torch.func)."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(w, xi, yi):
        p = dict(params)
        p[f"{name}.weight"] = w
        out = functional_call(model, p, (xi.unsqueeze(0),))
        return nn.functional.cross_entropy(out, yi.unsqueeze(0))

    return vmap(grad(loss), in_dims=(None, 0, 0))(params[f"{name}.weight"], x, y)


@pytest.mark.parametrize("make", [mlp, cnn])
def test_eigenbasis_reconstructs_weight(make):
    model = make()
    x, y = data_for(model)
    targets = find_targets(model)
    calib = Calibration.from_data((x, y), len(x), 4)
    factors = kfac_channel_factors(model, targets, calib, nn.CrossEntropyLoss(), "empirical", None, _no_track)
    for t in targets:
        basis = eigenbasis(*factors[t.name])
        w = t.weight.detach()
        w_rot = to_eigenbasis(w, basis)
        assert torch.allclose(from_eigenbasis(w_rot, basis.q_s, basis.q_a), w, atol=TOL)


def test_kfac_channel_factors_equal_brute_force_for_linear_layers():
    model = mlp()
    x, y = data_for(model)
    targets = find_targets(model)
    calib = Calibration.from_data((x, y), len(x), 3)
    factors = kfac_channel_factors(model, targets, calib, nn.CrossEntropyLoss(), "empirical", None, _no_track)
    for t in targets:
        inputs = {}
        h = t.module.register_forward_pre_hook(lambda m, a: inputs.setdefault("a", a[0].detach()))
        with torch.no_grad():
            model(x)
        h.remove()
        a = inputs["a"]
        g = per_sample_weight_grads(model, t.name, x, y)  # (N, out, in) = s_i a_i^T
        # s_i from the gradient: g_i = s_i a_i^T, so s_i = g_i a_i / |a_i|^2
        s = torch.einsum("noi,ni->no", g, a) / (a**2).sum(1, keepdim=True)
        assert torch.allclose(factors[t.name][0], a.T @ a / len(x), atol=TOL)
        assert torch.allclose(factors[t.name][1], s.T @ s / len(x), atol=TOL)


@pytest.mark.parametrize("make", [mlp, cnn])
def test_ekfac_eigenvalues_equal_brute_force(make):
    model = make()
    x, y = data_for(model)
    targets = find_targets(model)
    calib = Calibration.from_data((x, y), len(x), 3)
    loss = nn.CrossEntropyLoss()
    factors = kfac_channel_factors(model, targets, calib, loss, "empirical", None, _no_track)
    bases = {n: eigenbasis(a, s) for n, (a, s) in factors.items()}
    lam = ekfac_eigenvalues(model, targets, bases, calib, loss, "empirical", None, _no_track)
    for t in targets:
        g = per_sample_weight_grads(model, t.name, x, y)
        b = bases[t.name]
        g_rot = torch.einsum("noi...,os,ia->nsa...", g, b.q_s, b.q_a)  # Q_S^T G Q_A per tap
        assert torch.allclose(lam[t.name], (g_rot**2).mean(0), atol=TOL, rtol=1e-8), t.name


@pytest.mark.parametrize("make", [mlp, cnn])
@pytest.mark.parametrize("form", FORMS)
def test_decomposition_at_zero_pruning_equals_original(make, form):
    model = make()
    x, y = data_for(model)
    targets = find_targets(model)
    calib = Calibration.from_data((x, y), len(x), 8)
    factors = kfac_channel_factors(model, targets, calib, nn.CrossEntropyLoss(), "empirical", None, _no_track)
    for t in targets:
        basis = eigenbasis(*factors[t.name])
        w_rot = to_eigenbasis(t.weight.detach(), basis)
        keep_r = torch.ones(w_rot.shape[0], dtype=torch.bool)
        keep_c = torch.ones(w_rot.shape[1], dtype=torch.bool)
        new = decompose_layer(t.module, w_rot, basis, keep_r, keep_c, form)
        inputs = {}
        h = t.module.register_forward_pre_hook(lambda m, a: inputs.setdefault("a", a[0].detach()))
        with torch.no_grad():
            model(x)
        h.remove()
        with torch.no_grad():
            got, want = new(inputs["a"]), t.module(inputs["a"])
        # built in the model's float64 (no float32 detour): exact to round-off
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("make", [mlp, cnn])
def test_eigendamage_shrinks_the_model_and_keeps_its_interface(make):
    model = make().float()
    x, y = data_for(model, 32)
    x = x.float()
    before = sum(p.numel() for p in model.parameters())
    for ekfac in (False, True):
        res = eigendamage(model, (x, y), 0.5, ekfac=ekfac, fisher="empirical", max_layer_sparsity=0.8)
        after = sum(p.numel() for p in res.model.parameters())
        assert after < before and res.report["overall"]["achieved_sparsity"] >= 0.5
        assert res.model(x).shape == model(x).shape
        changed = [n for n, r in res.report["layers"].items() if r["form"] != "unchanged"]
        assert changed and all(not isinstance(res.model.get_submodule(n), type(model.get_submodule(n))) or
                                res.report["layers"][n]["form"] == "dense" for n in changed)
    # the user's model is untouched; zero sparsity changes nothing
    assert sum(p.numel() for p in model.parameters()) == before
    res = eigendamage(model, (x, y), 0.0, fisher="empirical")
    with torch.no_grad():
        assert torch.equal(res.model(x), model(x))


def test_eigendamage_bad_input():
    model = mlp().float()
    x, y = data_for(model, 16)
    with pytest.raises(bs.BrainsurgeonError, match="ekfac"):
        eigendamage(model, (x.float(), y), 0.5, ekfac="yes")
    with pytest.raises(bs.BrainsurgeonError, match="max_layer_sparsity"):
        eigendamage(model, (x.float(), y), 0.95, max_layer_sparsity=0.2)
    with pytest.raises(bs.BrainsurgeonError, match="sparsity"):
        eigendamage(model, (x.float(), y), 1.5)


def patches_by_loops(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """(B, T_out, C_in, kh*kw) by slicing the zero-padded input at every output position."""
    ph, pw = conv.padding
    xp = nn.functional.pad(x, (pw, pw, ph, ph))
    (kh, kw), (sh, sw) = conv.kernel_size, conv.stride
    rows = [
        xp[:, :, i : i + kh, j : j + kw].reshape(len(x), x.shape[1], -1)
        for i in range(0, xp.shape[2] - kh + 1, sh) for j in range(0, xp.shape[3] - kw + 1, sw)
    ]
    return torch.stack(rows, 1)


def test_conv_channel_factor_is_the_per_tap_average_of_the_patch_factor():
    # A_ch = (1/N) sum_n sum_{t in output positions} (1/kk) sum_k x_ntk x_ntk^T; tr(A_patch) = kk tr(A_ch)
    model = cnn()
    x, y = data_for(model)
    targets = find_targets(model)
    factors = kfac_channel_factors(
        model, targets, Calibration.from_data((x, y), len(x), 3), nn.CrossEntropyLoss(), "empirical", None, _no_track
    )
    inp = x
    for index, layer in enumerate(model):
        if isinstance(layer, nn.Conv2d):
            p = patches_by_loops(layer, inp)  # (B, T, C, kk)
            kk = p.shape[-1]
            expected = torch.einsum("btck,btdk->cd", p, p) / (kk * len(x))
            torch.testing.assert_close(factors[str(index)][0], expected, rtol=1e-12, atol=1e-12)
            trace_patch = float((p**2).sum()) / len(x)  # tr of the KFC patch factor (1/N) sum_nt a a^T
            assert trace_patch == pytest.approx(kk * float(torch.trace(expected)), rel=1e-12)
        with torch.no_grad():
            inp = layer(inp)


def test_conv_importance_is_on_the_fisher_scale():
    """Total K-FAC importance over total EKFAC importance (the exact Fisher diagonal in the same
    eigenbasis) per layer. Summing A over the input positions gave 1.08 (same padding), 1.68
    (valid) and 5.1 (stride 2) on this net; at the output positions all are within 10% of 1."""
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.Tanh(), nn.Conv2d(8, 8, 3), nn.Tanh(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(8 * 3 * 3, 5),
    ).double()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(256, 3, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 5, (256,), generator=g)
    targets = find_targets(model)
    calib = Calibration.from_data((x, y), len(x), 64)
    loss = nn.CrossEntropyLoss()
    bases = {n: eigenbasis(a, s) for n, (a, s) in kfac_channel_factors(model, targets, calib, loss, "empirical", None, _no_track).items()}
    lam = ekfac_eigenvalues(model, targets, bases, calib, loss, "empirical", None, _no_track)
    for t in targets[:3]:
        b = bases[t.name]
        w_rot = to_eigenbasis(t.weight.detach(), b)
        kfac_total = float(importance(w_rot, b).sum())
        b.ekfac = lam[t.name]
        ratio = kfac_total / float(importance(w_rot, b).sum())
        assert 0.85 < ratio < 1.1, (t.name, ratio)
