"""K-FAC factors against brute force, the K-FAC OBS formulas against an explicit Fisher block, and
the ``kfac-obd`` / ``kfac-obs`` methods."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import jacrev

import brainsurgeon as bs
from brainsurgeon.context import Numerics
from brainsurgeon.curvature.diagonal import sample_labels
from brainsurgeon.curvature.kfac import KFACFactors, damped, kfac_factors
from brainsurgeon.data import Calibration, load_digits
from brainsurgeon.errors import BrainsurgeonError
from brainsurgeon.evaluate import evaluate
from brainsurgeon.models import LeNet300
from brainsurgeon.pruners.kfac import constrained_refit, obs_saliency, single_weight_update
from brainsurgeon.targets import find_targets
from brainsurgeon.train import train_model

TOL = 1e-10  # float64 round-off


def mlp(bias: bool) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5, bias=bias), nn.Tanh(), nn.Linear(5, 4, bias=bias)).double()


def convnet(bias: bool) -> nn.Sequential:
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1, bias=bias), nn.Tanh(),
        nn.Conv2d(3, 4, 2, stride=2, padding=1, bias=bias), nn.Tanh(),
        nn.Flatten(), nn.Linear(4 * 3 * 3, 4, bias=bias),
    ).double()


def data_for(model, n: int = 6):
    g = torch.Generator().manual_seed(2)
    shape = (n, 6) if isinstance(model[0], nn.Linear) else (n, 2, 5, 5)
    return torch.randn(shape, generator=g, dtype=torch.float64), torch.randint(0, 4, (n,), generator=g)


def patches_by_loops(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """(B, T, C_in*kh*kw) by slicing the zero-padded input position by position (no F.unfold)."""
    ph, pw = conv.padding
    xp = F.pad(x, (pw, pw, ph, ph))
    kh, kw = conv.kernel_size
    sh, sw = conv.stride
    rows = []
    for i in range(0, xp.shape[2] - kh + 1, sh):
        for j in range(0, xp.shape[3] - kw + 1, sw):
            rows.append(xp[:, :, i : i + kh, j : j + kw].reshape(len(x), -1))
    return torch.stack(rows, 1)


def brute_force_factors(model: nn.Sequential, index: int, x, labels):
    """A from the layer's inputs, S from per-sample jacrev of the loss w.r.t. the pre-activation.

    ``labels``: (N,) labels, or (N, C) probabilities for the exact expectation over labels.
    """
    layer = model[index]
    prefix, suffix = model[:index], model[index + 1 :]
    with torch.no_grad():
        inp = prefix(x)
        z = layer(inp)
    a = patches_by_loops(layer, inp) if isinstance(layer, nn.Conv2d) else inp.unsqueeze(1)
    if layer.bias is not None:
        a = torch.cat([a, torch.ones_like(a[..., :1])], -1)
    A = torch.einsum("btd,bte->de", a, a) / len(x)
    S = torch.zeros(z.shape[1], z.shape[1], dtype=torch.float64)
    positions = z[0].numel() // z.shape[1]
    for n in range(len(x)):
        ys = [(labels[n], 1.0)] if labels.dim() == 1 else [(torch.tensor(c), labels[n, c]) for c in range(labels.shape[1])]
        for yc, weight in ys:
            s = jacrev(lambda zi: F.cross_entropy(suffix(zi.unsqueeze(0)), yc.unsqueeze(0)))(z[n])
            s = s.reshape(z.shape[1], -1)  # (out, T)
            S += weight * (s @ s.T) / positions
    return A, S.detach() / len(x)


@pytest.mark.parametrize("make", [mlp, convnet])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("fisher", ["empirical", "true", "exact"])
def test_factors_match_brute_force(make, bias, fisher):
    model = make(bias)
    x, y = data_for(model)
    calib = Calibration.from_data((x, y), batch_size=len(x))
    factors = kfac_factors(model, find_targets(model), calib, nn.CrossEntropyLoss(), fisher, torch.Generator().manual_seed(4))
    with torch.no_grad():
        out = model(x)
    if fisher == "true":
        labels = sample_labels(out, torch.Generator().manual_seed(4))
        assert not torch.equal(labels, y)
    elif fisher == "exact":
        labels = torch.softmax(out, 1)
    else:
        labels = y
    for index, layer in enumerate(model):
        if not isinstance(layer, (nn.Linear, nn.Conv2d)):
            continue
        name = str(index)
        A, S = brute_force_factors(model, index, x, labels)
        f = factors[name]
        assert f.has_bias == bias and f.A.dtype == torch.float64
        torch.testing.assert_close(f.A, A, rtol=TOL, atol=TOL * float(A.abs().max()))
        torch.testing.assert_close(f.S, S, rtol=TOL, atol=TOL * float(S.abs().max()))


@pytest.mark.parametrize("bias", [True, False])
def test_single_sample_kronecker_is_the_exact_fisher_block(bias):
    # one sample, one position: vec(G) vec(G)^T = (s s^T) (x) (a a^T) exactly, bias folded into A
    model = mlp(bias)
    x, y = data_for(model, 1)
    factors = kfac_factors(model, find_targets(model), Calibration.from_data((x, y)), nn.CrossEntropyLoss(), "empirical")
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    for name in ("0", "2"):
        layer = model[int(name)]
        g = layer.weight.grad
        if bias:
            g = torch.cat([g, layer.bias.grad.unsqueeze(1)], 1)
        block = torch.outer(g.reshape(-1), g.reshape(-1))
        kron = torch.kron(factors[name].S, factors[name].A)
        torch.testing.assert_close(kron, block, rtol=TOL, atol=TOL * float(block.abs().max()))


def random_spd(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(n, n + 2, generator=g, dtype=torch.float64)
    return m @ m.T / n


def test_damping_is_pi_corrected_and_relative():
    A, S = random_spd(5, 0) * 100, random_spd(3, 1) * 0.01
    numerics = Numerics()
    a, s = damped(KFACFactors("fc", A, S, has_bias=False), 1e-2, numerics)
    assert a.damping == pytest.approx(0.1 * float(torch.diagonal(A).mean()))
    assert s.damping == pytest.approx(0.1 * float(torch.diagonal(S).mean()))
    # pi-corrected Tikhonov: the identity term of the product is gamma * mean diag(S (x) A)
    assert a.damping * s.damping == pytest.approx(1e-2 * float(torch.diagonal(torch.kron(S, A)).mean()))
    torch.testing.assert_close(a.inverse, torch.linalg.inv(A + a.damping * torch.eye(5, dtype=torch.float64)))
    assert numerics.damping == {"fc.A": a.damping, "fc.S": s.damping}


def test_dead_inputs_and_empty_factors_stay_finite():
    A = random_spd(4, 2)
    A[1, :] = 0
    A[:, 1] = 0  # a dead input
    numerics = Numerics()
    a, s = damped(KFACFactors("fc", A, torch.zeros(3, 3, dtype=torch.float64), has_bias=False), 1e-2, numerics)
    assert torch.isfinite(a.inverse).all() and torch.isfinite(s.inverse).all()
    assert s.damping == pytest.approx(0.1)
    assert numerics.fallbacks == ["fc: K-FAC factor S (output gradients) is all zeros; damped with the absolute value 0.1"]


def explicit_problem(out=3, d=5, seed=0):
    """Damped factors and the explicitly built and inverted Fisher block S_d (x) A_d."""
    a, s = damped(KFACFactors("fc", random_spd(d, seed), random_spd(out, seed + 1), has_bias=True), 1e-2)
    fisher = torch.kron(s.matrix, a.matrix)
    w0 = torch.randn(out, d, generator=torch.Generator().manual_seed(seed + 2), dtype=torch.float64)
    return a, s, w0, torch.linalg.inv(fisher)


def test_obs_saliency_and_single_weight_update_match_the_explicit_inverse():
    a, s, w0, finv = explicit_problem()
    n = w0.shape[1] - 1  # the last column is the bias
    sal = obs_saliency(w0[:, :n], s, a)
    w = w0.reshape(-1)
    for i in range(w0.shape[0]):
        for j in range(n):
            q = i * w0.shape[1] + j
            assert float(sal[i, j]) == pytest.approx(float(w[q] ** 2 / (2 * finv[q, q])), rel=1e-10)
    i, j = 1, 2
    q = i * w0.shape[1] + j
    expected = -(w[q] / finv[q, q]) * finv[:, q]
    update = single_weight_update(w0, i, j, s, a)
    torch.testing.assert_close(update.reshape(-1), expected, rtol=1e-10, atol=1e-12)
    # the joint solver with one removed weight gives the same update
    pruned = torch.zeros_like(w0, dtype=torch.bool)
    pruned[i, j] = True
    res = constrained_refit(w0, w0, pruned, s, a, max_iters=200, tol=1e-13)
    torch.testing.assert_close(res.weight - w0, update, rtol=1e-8, atol=1e-10)


def test_joint_refit_matches_the_block_obs_formula():
    a, s, w0, finv = explicit_problem(out=4, d=6, seed=3)
    pruned = torch.zeros_like(w0, dtype=torch.bool)
    pruned[0, 1] = pruned[0, 3] = pruned[2, 0] = pruned[3, 4] = pruned[1, 1] = True  # bias column stays free
    q = pruned.reshape(-1).nonzero().squeeze(1)
    w = w0.reshape(-1)
    # dw = -F^-1 E_Q (E_Q^T F^-1 E_Q)^-1 w_Q
    expected = w - finv[:, q] @ torch.linalg.solve(finv[q][:, q], w[q])
    res = constrained_refit(w0, w0, pruned, s, a, max_iters=500, tol=1e-13)
    assert res.relative_residual < 1e-10
    torch.testing.assert_close(res.weight.reshape(-1), expected, rtol=1e-8, atol=1e-10)
    assert torch.count_nonzero(res.weight[pruned]) == 0


def test_later_step_saliency_is_a_lower_bound_of_the_true_obs_loss():
    """After Q is removed, kfac-obs still scores with [S^-1]_ii [A^-1]_jj (no downdate). The true
    OBS loss uses the inverse of the Fisher restricted to the remaining weights R; the method's
    saliency equals it with Q empty and is a lower bound otherwise (as its docstring says)."""
    a, s, w0, finv = explicit_problem(out=4, d=6, seed=5)
    fisher = torch.kron(s.matrix, a.matrix)
    n = w0.shape[1] - 1
    torch.testing.assert_close(
        obs_saliency(w0[:, :n], s, a).reshape(-1),
        (w0**2 / (2 * finv.diagonal().reshape(w0.shape)))[:, :n].reshape(-1), rtol=1e-10, atol=0,
    )
    pruned = torch.zeros_like(w0, dtype=torch.bool)
    pruned[0, 1] = pruned[1, 3] = pruned[2, 0] = pruned[3, 4] = pruned[3, 2] = True
    w = constrained_refit(w0, w0, pruned, s, a, max_iters=500, tol=1e-13).weight
    keep = ~pruned.reshape(-1)
    true = w.reshape(-1)[keep] ** 2 / (2 * torch.linalg.inv(fisher[keep][:, keep]).diagonal())
    sal = torch.cat([obs_saliency(w[:, :n], s, a), torch.full((4, 1), float("nan"), dtype=torch.float64)], 1)
    sal = sal.reshape(-1)[keep]
    weights = ~torch.isnan(sal)  # the bias column is never scored
    assert (sal[weights] <= true[weights] * (1 + 1e-10)).all()
    assert (sal[weights] < true[weights] * (1 - 1e-3)).any()  # and not equal: the bound is loose


# ----------------------------------------------------------------------------- the methods
@pytest.fixture(scope="module")
def trained():
    digits = load_digits()
    model = LeNet300(input_shape=(1, 8, 8), hidden=(24, 16))
    train_model(model, digits.train, epochs=20, lr=1e-2, seed=0)
    return model, digits


def conv_model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2, bias=False), nn.ReLU(),
        nn.Flatten(), nn.Linear(4 * 3 * 3, 10),
    )


def check_masks(res, sparsity: float, allocation: str):
    total = zeros = 0
    for t in find_targets(res.model):
        n, z = t.weight.numel(), int((t.weight == 0).sum())
        assert torch.equal(t.weight == 0, ~res.masks[t.name])  # pruned = exactly zero, kept = non-zero
        if allocation == "uniform":
            assert z == round(sparsity * n)
        total, zeros = total + n, zeros + z
    assert zeros == round(sparsity * total)


@pytest.mark.parametrize("method", ["kfac-obd", "kfac-obs"])
@pytest.mark.parametrize("allocation", ["uniform", "global"])
def test_prune_exact_sparsity_report_and_determinism(trained, method, allocation):
    model, digits = trained
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kw = dict(allocation=allocation, num_samples=256, seed=7)
    a = bs.prune(model, digits.train, method, 0.75, **kw)
    b = bs.prune(model, digits.train, method, 0.75, **kw)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    check_masks(a, 0.75, allocation)
    for k, v in a.model.state_dict().items():
        assert torch.equal(v, b.model.state_dict()[k])
    if method == "kfac-obs":
        assert set(a.report["numerics"]["damping"]) == {f"net.{i}.{f}" for i in (1, 3, 5) for f in "AS"}
        assert a.report["kfac_obs"]["damping_relative"] == 1e-2
        # compensation moved the kept weights and the biases
        assert not torch.equal(a.model.net[1].bias, model.net[1].bias)


@pytest.mark.parametrize("method", ["kfac-obd", "kfac-obs"])
def test_conv_model(method):
    digits = load_digits()
    res = bs.prune(conv_model(), digits.train, method, 0.5, num_samples=128, fisher="empirical", damping=1e-3)
    check_masks(res, 0.5, "uniform")
    if method == "kfac-obs":
        assert res.report["numerics"]["damping"]["0.A"] > 0


def test_kfac_obs_compensation_lowers_the_loss(trained):
    model, digits = trained
    calib = (digits.train[0][:512], digits.train[1][:512])
    res = bs.prune(model, calib, "kfac-obs", 0.6, num_samples=512, obs_steps=3)
    masked = copy.deepcopy(model)
    with torch.no_grad():
        for t in find_targets(masked):
            t.weight.mul_(res.masks[t.name])
    loss_dense = evaluate(model, calib)["loss"]
    loss_masked = evaluate(masked, calib)["loss"]
    loss_obs = evaluate(res.model, calib)["loss"]
    print("losses dense/obs/masked", loss_dense, loss_obs, loss_masked)
    assert loss_obs < loss_masked, (loss_dense, loss_obs, loss_masked)
    assert loss_obs - loss_dense < 0.5 * (loss_masked - loss_dense), (loss_dense, loss_obs, loss_masked)


def test_bad_options_and_layers(trained):
    model, digits = trained
    with pytest.raises(BrainsurgeonError, match="obs_steps"):
        bs.prune(model, digits.train, "kfac-obs", 0.5, obs_steps=0)
    with pytest.raises(BrainsurgeonError, match="fisher"):
        bs.prune(model, digits.train, "kfac-obd", 0.5, fisher="exactly")
    grouped = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Conv2d(2, 2, 3, groups=2), nn.Flatten(), nn.Linear(32, 10))
    with pytest.raises(BrainsurgeonError, match="grouped"):
        bs.prune(grouped, digits.train, "kfac-obs", 0.5)


def test_kfac_obd_masks_follow_half_s_ii_a_jj_w_squared(trained):
    model, digits = trained
    x, y = digits.train[0][:200], digits.train[1][:200]
    res = bs.prune(model, (x, y), "kfac-obd", 0.6, num_samples=200, seed=11)
    targets = find_targets(model)
    factors = kfac_factors(
        model, targets, Calibration.from_data((x, y), 200, 128), nn.CrossEntropyLoss(), "true", torch.Generator().manual_seed(11)
    )
    for t in targets:
        f = factors[t.name]
        fisher_diag = torch.diagonal(torch.kron(f.S, f.A)).reshape(f.S.shape[0], -1)[:, : t.weight.shape[1]]
        sal = 0.5 * fisher_diag * t.weight.detach().double() ** 2
        keep = torch.ones(sal.numel(), dtype=torch.bool)
        keep[torch.argsort(sal.reshape(-1), stable=True)[: round(0.6 * sal.numel())]] = False
        assert torch.equal(res.masks[t.name].reshape(-1), keep)


def test_true_fisher_needs_cross_entropy_and_other_losses_work(trained):
    model, digits = trained
    data = (digits.train[0][:128], torch.randn(128, 10))
    with pytest.raises(BrainsurgeonError, match="fisher='exact' or 'empirical'"):
        bs.prune(model, data, "kfac-obs", 0.5, loss_fn=nn.MSELoss())
    res = bs.prune(model, data, "kfac-obs", 0.5, loss_fn=nn.MSELoss(), fisher="exact", obs_steps=2)
    check_masks(res, 0.5, "uniform")
