"""Diagonal GGN / empirical Fisher / MC Fisher against torch.func brute force, and the ``obd`` method."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian, jacrev

import copy

import brainsurgeon as bs
from brainsurgeon.curvature.diagonal import diagonal_curvature, sample_labels
from brainsurgeon.data import Calibration, load_digits
from brainsurgeon.errors import BrainsurgeonError
from brainsurgeon.models import LeNet300
from brainsurgeon.targets import find_targets
from brainsurgeon.train import train_model

TOL = 1e-10  # float64 throughout: the fast path and the brute force agree to round-off


def mlp(bias: bool) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5, bias=bias), nn.Tanh(), nn.Linear(5, 4, bias=bias)).double()


def convnet(bias: bool) -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1, bias=bias), nn.Tanh(),
        nn.Conv2d(3, 4, 2, stride=2, padding=1, padding_mode="reflect", bias=bias), nn.Tanh(),
        nn.Flatten(), nn.Linear(4 * 3 * 3, 4, bias=bias),
    ).double()


def data_for(model: nn.Module, n: int = 7):
    g = torch.Generator().manual_seed(2)
    shape = (n, 6) if isinstance(model[0], nn.Linear) else (n, 2, 5, 5)
    return torch.randn(shape, generator=g, dtype=torch.float64), torch.randint(0, 4, (n,), generator=g)


def brute_force_diag(model, x, y, loss_fn, kind):
    """Per sample: J^T H J (GGN) or g g^T (Fisher) built in full with torch.func, then its diagonal."""
    targets = find_targets(model)
    params = {f"{t.name}.weight": t.weight.detach() for t in targets}

    def f(p, xi):
        return functional_call(model, p, (xi.unsqueeze(0),)).squeeze(0)

    def loss(p, xi, yi):
        return loss_fn(f(p, xi).unsqueeze(0), yi.unsqueeze(0))

    total = {k: torch.zeros_like(v) for k, v in params.items()}
    for xi, yi in zip(x, y):
        if kind == "ggn":
            jac = jacrev(f)(params, xi)  # {name: (C, *w)}
            out = f(params, xi)
            h = hessian(lambda o: loss_fn(o.unsqueeze(0), yi.unsqueeze(0)))(out)
            for k, j in jac.items():
                jm = j.reshape(j.shape[0], -1)
                total[k] += torch.diagonal(jm.T @ h @ jm).reshape(params[k].shape)
        else:
            g = jacrev(loss)(params, xi, yi)
            for k in total:
                total[k] += g[k] ** 2
    return {t.name: total[f"{t.name}.weight"].detach() / len(x) for t in targets}


@pytest.mark.parametrize("make", [mlp, convnet])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("kind", ["ggn", "empirical"])
def test_diagonal_matches_brute_force(make, bias, kind):
    model = make(bias)
    x, y = data_for(model)
    calib = Calibration.from_data((x, y), batch_size=3)  # several batches, one of them short
    loss_fn = nn.CrossEntropyLoss()
    d = diagonal_curvature(model, find_targets(model), calib, loss_fn, kind)
    ref = brute_force_diag(model, x, y, loss_fn, kind)
    assert d.num_samples == len(x)
    for name, r in ref.items():
        assert d[name].dtype == torch.float64 and d[name].shape == r.shape
        torch.testing.assert_close(d[name], r, rtol=TOL, atol=TOL * float(r.abs().max()))


def test_ggn_diagonal_for_a_non_cross_entropy_loss():
    model = mlp(True)
    x = data_for(model)[0]
    y = torch.randn(len(x), 4, dtype=torch.float64)
    loss_fn = nn.MSELoss()
    d = diagonal_curvature(model, find_targets(model), Calibration.from_data((x, y), batch_size=4), loss_fn, "ggn")
    ref = brute_force_diag(model, x, y, loss_fn, "ggn")
    for name, r in ref.items():
        torch.testing.assert_close(d[name], r, rtol=TOL, atol=TOL * float(r.abs().max()))


@pytest.mark.parametrize("make", [mlp, convnet])
def test_mc_fisher_equals_brute_force_with_the_same_sampled_labels(make):
    model = make(True)
    x, y = data_for(model)
    calib = Calibration.from_data((x, y), batch_size=len(x))
    d = diagonal_curvature(model, find_targets(model), calib, nn.CrossEntropyLoss(), "fisher", torch.Generator().manual_seed(5))
    with torch.no_grad():
        y_sampled = sample_labels(model(x), torch.Generator().manual_seed(5))
    assert not torch.equal(y_sampled, y)  # otherwise this would only re-test the empirical path
    ref = brute_force_diag(model, x, y_sampled, nn.CrossEntropyLoss(), "empirical")
    for name, r in ref.items():
        torch.testing.assert_close(d[name], r, rtol=TOL, atol=TOL * float(r.abs().max()))


def test_mc_fisher_converges_to_the_ggn_for_cross_entropy():
    # E_y~[g g^T] = GGN for cross-entropy; 4000 draws (the same 8 inputs repeated) give ~2-3% error
    model = mlp(True)
    x, _ = data_for(model, 8)
    xr = x.repeat(500, 1)
    yr = torch.zeros(len(xr), dtype=torch.long)
    targets = find_targets(model)
    calib = Calibration.from_data((xr, yr), batch_size=1000)
    mc = diagonal_curvature(model, targets, calib, nn.CrossEntropyLoss(), "fisher", torch.Generator().manual_seed(0))
    ggn = diagonal_curvature(model, targets, calib, nn.CrossEntropyLoss(), "ggn")
    for t in targets:
        rel = float((mc[t.name] - ggn[t.name]).norm() / ggn[t.name].norm())
        assert rel < 0.1, (t.name, rel)


def test_fisher_needs_cross_entropy():
    model = mlp(True)
    x = data_for(model)[0]
    calib = Calibration.from_data((x, torch.randn(len(x), 4, dtype=torch.float64)))
    with pytest.raises(BrainsurgeonError, match="CrossEntropyLoss"):
        diagonal_curvature(model, find_targets(model), calib, nn.MSELoss(), "fisher")


def test_unused_layer_gets_zero_curvature():
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Linear(6, 4), nn.Linear(6, 4)

        def forward(self, x):
            self.unused(x)
            return self.used(x)

    model = TwoHeads().double()
    x, y = data_for(mlp(True))
    d = diagonal_curvature(model, find_targets(model), Calibration.from_data((x, y)), nn.CrossEntropyLoss(), "ggn")
    assert torch.count_nonzero(d["unused"]) == 0 and torch.count_nonzero(d["used"]) > 0


# ----------------------------------------------------------------------------- the obd method
def lenet_on_digits():
    digits = load_digits()
    model = LeNet300(input_shape=(1, 8, 8), hidden=(24, 16))
    train_model(model, digits.train, epochs=3, seed=0)
    return model, digits


@pytest.fixture(scope="module")
def trained():
    return lenet_on_digits()


@pytest.mark.parametrize("curvature", ["ggn", "empirical", "fisher"])
def test_obd_scores_are_half_diag_times_w_squared(trained, curvature):
    model, digits = trained
    x, y = digits.train[0][:64].double(), digits.train[1][:64]
    model = copy.deepcopy(model).double()
    res = bs.prune(model, (x, y), "obd", 0.5, curvature=curvature, num_samples=64, seed=3)
    targets = find_targets(model)
    gen = torch.Generator().manual_seed(3)
    diag = diagonal_curvature(model, targets, Calibration.from_data((x, y), 64, 128), nn.CrossEntropyLoss(), curvature, gen)
    for t in targets:
        sal = 0.5 * diag[t.name] * t.weight.detach() ** 2
        k = int(round(0.5 * sal.numel()))
        expected_keep = torch.ones(sal.numel(), dtype=torch.bool)
        expected_keep[torch.argsort(sal.reshape(-1), stable=True)[:k]] = False
        assert torch.equal(res.masks[t.name].reshape(-1), expected_keep)


@pytest.mark.parametrize("allocation", ["uniform", "global"])
def test_obd_prune_exact_sparsity_zeros_and_determinism(trained, allocation):
    model, digits = trained
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kw = dict(allocation=allocation, num_samples=256, seed=1)
    a = bs.prune(model, digits.train, "obd", 0.7, **kw)
    b = bs.prune(model, digits.train, "obd", 0.7, **kw)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])  # the user's model is untouched
    total = zeros = 0
    for t in find_targets(a.model):
        n, z = t.weight.numel(), int((t.weight == 0).sum())
        assert torch.equal(t.weight == 0, ~a.masks[t.name])
        if allocation == "uniform":
            assert z == round(0.7 * n)
        total, zeros = total + n, zeros + z
    assert zeros == round(0.7 * total)
    assert a.report["method_options"] == {"curvature": "ggn"}
    for t in find_targets(a.model):
        assert torch.equal(a.masks[t.name], b.masks[t.name])


def test_obd_rejects_bad_options(trained):
    model, digits = trained
    with pytest.raises(BrainsurgeonError, match="curvature"):
        bs.prune(model, digits.train, "obd", 0.5, curvature="hessian")
    with pytest.raises(BrainsurgeonError, match="CrossEntropyLoss"):
        x = digits.train[0][:32]
        bs.prune(model, (x, torch.randn(32, 10)), "obd", 0.5, curvature="fisher", loss_fn=nn.MSELoss())
