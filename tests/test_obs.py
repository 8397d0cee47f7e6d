"""Full OBS: the Woodbury inverse, the OBS formulas against brute force, and bs.prune(method="obs")."""
from __future__ import annotations

import copy
import time
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian, jacrev

import brainsurgeon as bs
from brainsurgeon.context import Numerics
from brainsurgeon.curvature import inverse as inverse_mod
from brainsurgeon.curvature.inverse import outer_product_inverse, solve_spd, woodbury_update_, init_inverse
from brainsurgeon.curvature.per_sample import PerSampleVectors
from brainsurgeon.data import Calibration
from brainsurgeon.errors import BrainsurgeonError, MemoryBudgetError
from brainsurgeon.pruners.obs import obs_joint_update, obs_saliency, obs_single_update, relative_damping, two_pass
from brainsurgeon.targets import find_targets

from conftest import fit, tiny_data, tiny_mlp


def _f64_case(n=24, seed=0):
    model = tiny_mlp(seed).double()
    x, y = tiny_data((8,), n=n)
    x = x.double()
    fit(model, (x, y), steps=20)
    return model, x, y


def brute_force_ggn(model, x, y, loss_fn):
    """(1/N) sum_i J_i^T H_i J_i over all Linear weights, J from jacrev, H_i from hessian."""
    targets = find_targets(model)
    names = [f"{t.name}.weight" for t in targets]
    params = {k: v.detach() for k, v in model.named_parameters()}

    def out_fn(wts, xi):
        return functional_call(model, {**params, **dict(zip(names, wts))}, (xi.unsqueeze(0),)).squeeze(0)

    wts = tuple(params[k] for k in names)
    total = sum(w.numel() for w in wts)
    ggn = torch.zeros(total, total, dtype=torch.float64)
    for xi, yi in zip(x, y):
        jac = torch.cat([j.reshape(j.shape[0], -1) for j in jacrev(out_fn)(wts, xi)], dim=1)  # (C, n)
        out = out_fn(wts, xi)
        h = hessian(lambda o: loss_fn(o.unsqueeze(0), yi.unsqueeze(0)))(out)
        ggn += jac.T @ h @ jac
    return ggn / len(x)


def _random_spd(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n + 3, generator=g, dtype=torch.float64)
    return a @ a.T / n + 0.1 * torch.eye(n, dtype=torch.float64)


def _rel(a, b):
    return float((a - b).norm() / b.norm())


# --- the inverse ---------------------------------------------------------------------------------

@pytest.mark.parametrize("rank", [1, 5, 64])
def test_woodbury_inverse_equals_inverse_of_brute_force_ggn(rank):
    model, x, y = _f64_case()
    loss_fn = nn.CrossEntropyLoss()
    ggn = brute_force_ggn(model, x, y, loss_fn)
    psv = PerSampleVectors(model, find_targets(model), Calibration.from_data((x, y), batch_size=10), loss_fn, "ggn")
    alpha = 1e-3 * float(ggn.diagonal().mean())
    lam = torch.tensor([alpha], dtype=torch.float64)
    inv = outer_product_inverse(iter(psv), lam, ggn.shape[0], len(x), rank=rank)[0]
    exact = torch.linalg.inv(alpha * torch.eye(ggn.shape[0], dtype=torch.float64) + ggn)
    assert _rel(inv, exact) < 1e-8


def test_sherman_morrison_step_is_the_paper_recursion():
    # one rank-1 step must equal H^-1 - H^-1 v v^T H^-1 / (P + v^T H^-1 v) (Hassibi & Stork eq. 8)
    h_inv = torch.linalg.inv(_random_spd(6))
    v = torch.randn(1, 6, dtype=torch.float64)
    expected = h_inv - (h_inv @ v.T @ v @ h_inv) / (7.0 + float(v @ h_inv @ v.T))
    got = woodbury_update_(h_inv.clone().unsqueeze(0), v.unsqueeze(0), num_samples=7, rank=1)[0]
    assert torch.allclose(got, expected, rtol=1e-12, atol=1e-14)


def test_init_inverse_is_scaled_identity_per_block():
    inv = init_inverse(torch.tensor([2.0, 4.0]), 3)
    eye = torch.eye(3, dtype=torch.float64)
    assert torch.equal(inv[0], eye / 2) and torch.equal(inv[1], eye / 4)


# --- the OBS formulas against brute force --------------------------------------------------------

def _constrained_minimum(h, w, q):
    """Brute force: minimise 1/2 dw^T H dw s.t. dw_Q = -w_Q by solving the KKT system."""
    n, k = h.shape[0], len(q)
    e = torch.zeros(n, k, dtype=torch.float64)
    e[q, torch.arange(k)] = 1.0
    kkt = torch.zeros(n + k, n + k, dtype=torch.float64)
    kkt[:n, :n], kkt[:n, n:], kkt[n:, :n] = h, e, e.T
    rhs = torch.cat([torch.zeros(n, dtype=torch.float64), -w[q]])
    dw = torch.linalg.solve(kkt, rhs)[:n]
    return dw, float(0.5 * dw @ h @ dw)


def test_single_weight_saliency_and_update_match_brute_force():
    h = _random_spd(7, seed=1)
    inv = torch.linalg.inv(h)
    w = torch.randn(7, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    for q in range(7):
        dw, loss = obs_single_update(inv, w, q)
        ref_dw, ref_loss = _constrained_minimum(h, w, [q])
        assert torch.allclose(dw, ref_dw, rtol=1e-10, atol=1e-12)
        # the quadratic model's loss change of the update is exactly the predicted saliency
        assert abs(0.5 * float(dw @ h @ dw) - loss) < 1e-10 * max(loss, 1e-12)
        assert abs(loss - ref_loss) < 1e-10 * ref_loss
        assert abs(float(obs_saliency(w[q], inv[q, q])) - loss) < 1e-12 * loss
        assert abs(float(w[q] + dw[q])) <= 1e-14 * abs(float(w[q]))  # the update removes w_q


def test_joint_removal_matches_brute_force_and_downdates_inverse():
    h = _random_spd(9, seed=3)
    inv = torch.linalg.inv(h)
    w = torch.randn(9, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    q = torch.tensor([1, 4, 7])
    numerics = Numerics()
    dw, new_inv, loss, r = obs_joint_update(inv, w, q, numerics)
    ref_dw, ref_loss = _constrained_minimum(h, w, q.tolist())
    assert torch.allclose(dw, ref_dw, rtol=1e-10, atol=1e-12)
    assert abs(0.5 * float(dw @ h @ dw) - loss) < 1e-10 * loss  # L_Q is the quadratic model's loss change
    assert abs(loss - ref_loss) < 1e-10 * ref_loss
    assert torch.equal((w + dw)[q], torch.zeros(3, dtype=torch.float64))  # exactly zero, not approximately
    assert r.tolist() == [0, 2, 3, 5, 6, 8]
    # the Schur complement is the inverse Hessian of the remaining weights
    assert _rel(new_inv, torch.linalg.inv(h[r[:, None], r])) < 1e-10
    assert numerics.fallbacks == []


def test_joint_removal_of_a_singular_block_falls_back_without_nan():
    # two identical weights: [H^-1]_QQ is singular; the pseudo-inverse gives a finite answer
    inv = torch.ones(3, 3, dtype=torch.float64) + torch.diag(torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64))
    numerics = Numerics()
    sol = solve_spd(inv[:2, :2].unsqueeze(0), torch.tensor([[[1.0], [1.0]]], dtype=torch.float64), numerics, "obs")
    assert torch.isfinite(sol).all()
    assert torch.allclose(inv[:2, :2] @ sol[0], torch.tensor([[1.0], [1.0]], dtype=torch.float64))
    assert numerics.fallbacks and "pseudo-inverse" in numerics.fallbacks[0]


def test_zero_curvature_damping_falls_back_and_is_recorded():
    numerics = Numerics()
    lam = relative_damping(torch.tensor([0.0, 2.0]), 0.1, numerics, "x")
    assert lam.tolist() == [0.1, pytest.approx(0.2)]
    assert numerics.fallbacks and "zero curvature" in numerics.fallbacks[0]


def test_second_pass_sees_the_same_sampled_fisher_labels(mlp_case):
    # relative damping streams the vectors twice; the "fisher" labels must be the same both times
    model, data = mlp_case
    gen = torch.Generator().manual_seed(0)
    psv = PerSampleVectors(
        model, find_targets(model), Calibration.from_data(data, batch_size=16), nn.CrossEntropyLoss(), "fisher", gen
    )
    again = two_pass(SimpleNamespace(generator=gen), psv)
    first = torch.cat(list(psv))
    assert torch.equal(torch.cat(list(again())), first)
    assert not torch.equal(torch.cat(list(psv)), first)  # without the rewind the labels differ


# --- bs.prune(method="obs") -----------------------------------------------------------------------

@pytest.mark.parametrize("allocation", ["uniform", "global"])
def test_prune_obs_exact_sparsity_zeros_and_untouched_input(mlp_case, allocation):
    model, data = mlp_case
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = bs.prune(model, data, "obs", 0.6, allocation=allocation, max_layer_sparsity=0.8, obs_steps=3)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    total = sum(m.numel() for m in res.masks.values())
    pruned = sum(int((~m).sum()) for m in res.masks.values())
    if allocation == "uniform":
        assert pruned == sum(round(0.6 * m.numel()) for m in res.masks.values())
    else:
        assert pruned == round(0.6 * total)
    for name, mask in res.masks.items():
        w = res.model.get_submodule(name).weight
        assert torch.equal(w[~mask], torch.zeros_like(w[~mask]))
        if allocation == "uniform":
            assert int((~mask).sum()) == round(0.6 * mask.numel())
        else:
            assert int((~mask).sum()) <= int(0.8 * mask.numel())
    # compensation changed the kept weights
    assert not torch.equal(res.model[0].weight[res.masks["0"]], model[0].weight[res.masks["0"]])
    assert res.report["numerics"]["damping"]["obs"] > 0
    assert res.report["obs"]["predicted_loss_increase"] > 0


def test_prune_obs_is_deterministic(mlp_case):
    model, data = mlp_case
    a = bs.prune(model, data, "obs", 0.5, curvature="fisher", seed=3)
    b = bs.prune(model, data, "obs", 0.5, curvature="fisher", seed=3)
    for k in a.masks:
        assert torch.equal(a.masks[k], b.masks[k])
        assert torch.equal(a.model.get_submodule(k).weight, b.model.get_submodule(k).weight)


def test_one_step_prediction_equals_quadratic_model_of_the_run(mlp_case):
    # one step, one layer: the reported loss increase equals 1/2 dw^T H dw with H built by brute force
    model, (x, y) = mlp_case
    model = copy.deepcopy(model).double()  # .double() is in place: never on the shared fixture
    x = x.double()
    res = bs.prune(model, (x, y), "obs", 0.3, layers=["4"], obs_steps=1, damping=1e-2)
    w0, w1 = model[4].weight.detach().reshape(-1), res.model[4].weight.detach().reshape(-1)
    dw = w1 - w0
    params = {k: v.detach() for k, v in model.named_parameters()}

    def out_fn(w, xi):
        return functional_call(model, {**params, "4.weight": w.reshape(4, 8)}, (xi.unsqueeze(0),)).squeeze(0)

    loss_fn = nn.CrossEntropyLoss()
    ggn = torch.zeros(32, 32, dtype=torch.float64)
    for xi, yi in zip(x, y):
        j = jacrev(out_fn)(w0, xi)
        h = hessian(lambda o: loss_fn(o.unsqueeze(0), yi.unsqueeze(0)))(out_fn(w0, xi))
        ggn += j.T @ h @ j
    ggn /= len(x)
    alpha = res.report["numerics"]["damping"]["obs"]
    assert alpha == pytest.approx(1e-2 * float(ggn.diagonal().mean()), rel=1e-9)
    quad = 0.5 * float(dw @ (ggn + alpha * torch.eye(32, dtype=torch.float64)) @ dw)
    assert quad == pytest.approx(res.report["obs"]["predicted_loss_increase"], rel=1e-8)


def test_obs_loses_less_than_magnitude_on_a_trained_model():
    from brainsurgeon.data import load_digits
    from brainsurgeon.evaluate import evaluate

    d = load_digits()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
    fit(model, d.train, steps=300)
    calib = (d.train[0][:256], d.train[1][:256])
    dense = evaluate(model, d.train)["loss"]
    for sparsity in (0.5, 0.7):
        mag = evaluate(bs.prune(model, calib, "magnitude", sparsity).model, d.train)["loss"]
        obs = evaluate(bs.prune(model, calib, "obs", sparsity).model, d.train)["loss"]
        assert obs - dense < mag - dense, (sparsity, dense, obs, mag)


# --- bad input -----------------------------------------------------------------------------------

def test_memory_budget_error_is_raised_before_any_work(mlp_case, monkeypatch):
    model, data = mlp_case

    def boom(*a, **k):  # any curvature work would be a failure of the check
        raise AssertionError("the inverse was built before the budget check")

    monkeypatch.setattr(PerSampleVectors, "__iter__", boom)
    monkeypatch.setattr(inverse_mod, "outer_product_inverse", boom)
    n = sum(m.weight.numel() for m in model if isinstance(m, nn.Linear))
    t0 = time.perf_counter()
    with pytest.raises(MemoryBudgetError) as err:
        bs.prune(model, data, "obs", 0.5, max_memory_bytes=1000)
    assert time.perf_counter() - t0 < 2.0
    msg = str(err.value)
    assert f"n={n}" in msg and str(16 * n * n) in msg and "1000" in msg
    assert "woodfisher" in msg and "sparsegpt" in msg


@pytest.mark.parametrize("opts", [{"curvature": "hessian"}, {"obs_steps": 0}, {"max_memory_bytes": -1}, {"block_size": 4}])
def test_bad_options_are_clear_errors(mlp_case, opts):
    model, data = mlp_case
    with pytest.raises(BrainsurgeonError):
        bs.prune(model, data, "obs", 0.5, **opts)


def test_fisher_curvature_needs_cross_entropy(mlp_case):
    model, (x, y) = mlp_case
    target = nn.functional.one_hot(y, 4).float()
    with pytest.raises(BrainsurgeonError, match="CrossEntropyLoss"):
        bs.prune(model, (x, target), "obs", 0.5, curvature="fisher", loss_fn=nn.MSELoss())


def test_obs_refuses_nm_structure(mlp_case):
    model, data = mlp_case
    with pytest.raises(BrainsurgeonError, match="N:M"):
        bs.prune(model, data, "obs", structure="2:4")
