"""C-OBD, C-OBS and reconstruction (structured second-order criteria) against brute force."""
from __future__ import annotations


import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev

import brainsurgeon as bs
from brainsurgeon.context import PruneContext
from brainsurgeon.data import Calibration
from brainsurgeon.engine import build_options
from brainsurgeon.structured.groups import StructuredContext, build_groups, example_input
from brainsurgeon.structured.reconstruction import (
    contribution_gram,
    greedy_removal,
    input_moments,
    refit_consumer,
)
from brainsurgeon.structured.second_order import (
    StructuredKFACOBS,
    StructuredOBD,
    _group_modules,
    _Producer,
    group_obd_saliency,
    joint_rows_removal,
    loss_scale_counts,
    parameter_diagonals,
    row_removal_loss,
    row_removal_update,
)
from brainsurgeon.targets import find_targets

TOL = 1e-10  # float64 round-off


def _no_track(it, desc, total=None):
    return it


def mlp_bn() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Linear(6, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)
    ).double()
    with torch.no_grad():  # non-trivial running statistics and affine parameters
        m[1].running_mean.uniform_(-0.5, 0.5)
        m[1].running_var.uniform_(0.5, 2.0)
        m[1].weight.uniform_(0.5, 1.5)
        m[1].bias.uniform_(-0.3, 0.3)
    return m.eval()


def cnn_bn() -> nn.Module:
    torch.manual_seed(1)
    m = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.Tanh(), nn.Conv2d(3, 4, 3, padding=1, bias=False),
        nn.Tanh(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3),
    ).double()
    with torch.no_grad():
        m[1].running_mean.uniform_(-0.5, 0.5)
        m[1].running_var.uniform_(0.5, 2.0)
        m[1].weight.uniform_(0.5, 1.5)
        m[1].bias.uniform_(-0.3, 0.3)
    return m.eval()


def data_for(model, n: int = 10):
    g = torch.Generator().manual_seed(3)
    shape = (n, 6) if isinstance(model[0], nn.Linear) else (n, 2, 4, 4)
    return torch.randn(shape, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def structured_ctx(model, x, y, sparsity=0.4, allocation="uniform", batch_size=4):
    opts = build_options("t", sparsity, "unstructured", allocation, 0.9, len(x), None, 0, "cpu", batch_size)
    calib = Calibration.from_data((x, y), len(x), batch_size)
    ctx = PruneContext(
        model=model, targets=find_targets(model), calib=calib, loss_fn=nn.CrossEntropyLoss(), options=opts,
        generator=torch.Generator().manual_seed(0),
    )
    return StructuredContext(ctx, build_groups(model, example_input(calib)))


def brute_ggn_diag(model, x):
    """diag( (1/N) sum_i J_i^T H_i J_i ) for every parameter, by torch.func (cross-entropy)."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    jac = jacrev(lambda p: functional_call(model, p, (x,)))(params)  # (N, C, *shape)
    with torch.no_grad():
        p = torch.softmax(model(x), 1)
    hess = torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)  # (N, C, C)
    out = {}
    for k, j in jac.items():
        j = j.reshape(j.shape[0], j.shape[1], -1)
        out[k] = torch.einsum("icq,icd,idq->q", j, hess, j).reshape(params[k].shape) / len(x)
    return out


# ----------------------------------------------------------------------------- C-OBD
@pytest.mark.parametrize("make", [mlp_bn, cnn_bn])
def test_parameter_diagonals_equal_exact_ggn_diagonal(make):
    model = make()
    x, y = data_for(model)
    sctx = structured_ctx(model, x, y)
    mods = _group_modules(sctx.groups)
    diags = parameter_diagonals(model, mods, sctx.calib, nn.CrossEntropyLoss(), "ggn", None, _no_track)
    exact = brute_ggn_diag(model, x)
    checked = 0
    for name, entry in diags.diag.items():
        for p, d in entry.items():
            ref = exact[f"{name}.{p}"]
            assert torch.allclose(d, ref, atol=TOL, rtol=1e-8), (name, p)
            checked += 1
    assert checked >= 6  # weights, biases and the BatchNorm's weight and bias


def test_group_saliency_is_sum_of_exact_obd_saliencies_over_the_group():
    model = mlp_bn()
    x, y = data_for(model)
    sctx = structured_ctx(model, x, y)
    diags = parameter_diagonals(model, _group_modules(sctx.groups), sctx.calib, nn.CrossEntropyLoss(), "ggn", None, _no_track)
    exact = brute_ggn_diag(model, x)
    p = dict(model.named_parameters())
    sal = {k: 0.5 * exact[k] * p[k].detach() ** 2 for k in exact}
    group = sctx.groups["0"]  # Linear(6, 5) -> BN -> Tanh -> Linear(5, 4)
    # unit u: its row and bias, its BN weight and bias, and the consumer's column u
    expected = sal["0.weight"].sum(1) + sal["0.bias"] + sal["1.weight"] + sal["1.bias"] + sal["3.weight"].sum(0)
    got = group_obd_saliency(group, diags)
    assert torch.allclose(got, expected, atol=TOL, rtol=1e-8)
    # the method's importance is that saliency
    obd = StructuredOBD()
    assert torch.allclose(obd.importance(group, sctx), expected, atol=TOL, rtol=1e-8)


def test_loss_scale_counts_global_threshold_and_cap():
    scores = {"a": torch.tensor([1.0, 2.0, 30.0, 40.0]), "b": torch.tensor([3.0, 4.0, 5.0, 0.5])}
    counts, capped = loss_scale_counts(scores, 0.5, 0.9)
    assert counts == {"a": 2, "b": 2}  # the 4 lowest: 0.5, 1, 2, 3
    counts, capped = loss_scale_counts(scores, 0.5, 0.5)  # at most 2 per group
    assert counts == {"a": 2, "b": 2} and sorted(capped) == ["a", "b"]
    counts, _ = loss_scale_counts({"a": scores["a"], "b": scores["b"] * 100}, 0.5, 0.9)
    assert counts == {"a": 3, "b": 1}  # a's 30 is below b's 300; a keeps one unit (cap floor(3.6)=3)
    with pytest.raises(bs.BrainsurgeonError, match="cap"):
        loss_scale_counts(scores, 0.9, 0.5)


# ----------------------------------------------------------------------------- C-OBS
def spd(n, seed):
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(n, n, generator=g, dtype=torch.float64)
    return m @ m.T + 0.5 * torch.eye(n, dtype=torch.float64)


def explicit_block_obs(w, s, a, rows):
    """OBS with the explicit Fisher F = S (x) A (row-major vec of W): remove rows jointly."""
    d = w.shape[1]
    f_inv = torch.linalg.inv(torch.kron(s, a))
    q = torch.cat([torch.arange(r * d, (r + 1) * d) for r in rows])
    wq = w.reshape(-1)[q]
    k = torch.linalg.solve(f_inv[q][:, q], wq)
    return (-f_inv[:, q] @ k).reshape(w.shape), 0.5 * float(wq @ k)


def test_cobs_row_loss_and_update_equal_explicit_kronecker_inverse():
    s, a = spd(5, 0), spd(4, 1)
    w = torch.randn(5, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    s_inv = torch.linalg.inv(s)
    losses = row_removal_loss(w, s_inv, a)
    for i in range(5):
        dw, loss = explicit_block_obs(w, s, a, [i])
        assert abs(float(losses[i]) - loss) < TOL * max(1, loss)
        assert torch.allclose(row_removal_update(w, s_inv, i), dw, atol=TOL)
        assert torch.allclose((w + dw)[i], torch.zeros(4, dtype=torch.float64), atol=TOL)
        # and the loss is the K-FAC quadratic of the update
        quad = 0.5 * float((dw.reshape(-1) @ torch.kron(s, a) @ dw.reshape(-1)))
        assert abs(quad - loss) < 1e-9 * max(1, loss)


def test_cobs_sequential_removal_with_downdates_equals_joint_block_obs():
    s, a = spd(6, 3), spd(4, 4)
    w = torch.randn(6, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    rows = [4, 1, 2]
    dw, loss = explicit_block_obs(w, s, a, rows)
    dw_j, loss_j = joint_rows_removal(w, torch.linalg.inv(s), a, torch.tensor(rows))
    assert torch.allclose(dw_j, dw, atol=1e-9) and abs(loss_j - loss) < 1e-9 * max(1, loss)
    member = type("M", (), {})()
    prod = _Producer(member, w.clone(), torch.linalg.inv(s), a, torch.arange(6))
    for r in rows:
        prod.remove(r)
    assert torch.allclose(prod.w, w + dw, atol=1e-9)


def test_cobs_method_compensates_better_than_zeroing_under_kfac():
    model = mlp_bn()
    x, y = data_for(model, 24)
    sctx = structured_ctx(model, x, y, sparsity=0.4)
    algo = StructuredKFACOBS(fisher="exact")
    algo.check(sctx)
    w0 = {p.member.name: p.w.clone() for g in sctx.groups for p in algo._state(sctx)[g.name]}
    factors = {p.member.name: (p.s_inv.clone(), p.a) for g in sctx.groups for p in algo._state(sctx)[g.name]}
    counts, _ = algo.allocate(sctx)
    keep = algo.select(sctx, counts)
    assert {g: int((~k).sum()) for g, k in keep.items()} == counts and sum(counts.values()) > 0
    for g in sctx.groups:
        for p in algo._state(sctx)[g.name]:
            removed = p.rows[~keep[g.name]]
            assert (p.w[removed] == 0).all()
            s = torch.linalg.inv(factors[p.member.name][0])
            a = factors[p.member.name][1]
            dw = p.w - w0[p.member.name]
            zeroed = torch.zeros_like(dw)
            zeroed[removed] = -w0[p.member.name][removed]
            quad = lambda d: float(torch.trace(s @ d @ a @ d.T))  # noqa: E731
            assert quad(dw) < quad(zeroed)
    algo.compensate(sctx, keep)
    p = algo._state(sctx)["0"][0]
    assert torch.allclose(model[0].weight, p.w[:, :6]) and torch.allclose(model[0].bias, p.w[:, 6])


# ----------------------------------------------------------------------------- reconstruction
@pytest.mark.parametrize("make", [mlp_bn, cnn_bn])
def test_contribution_gram_equals_measured_output_change(make):
    model = make()
    x, y = data_for(model, 12)
    sctx = structured_ctx(model, x, y)
    group = sctx.groups["0"]
    consumer = group.consumers[0]
    moments = input_moments(model, {consumer.name: consumer.module}, sctx.calib, _no_track)
    gram = contribution_gram(group, moments)
    removed = torch.tensor([0, 2])
    inputs = {}
    h = consumer.module.register_forward_pre_hook(lambda m, a: inputs.setdefault("x", a[0].detach()))
    with torch.no_grad():
        model(x)
    h.remove()
    xin = inputs["x"]
    xz = xin.clone()
    xz[:, removed] = 0  # the removed units' inputs (channels / features) of the consumer
    with torch.no_grad():
        change = consumer.module(xin) - consumer.module(xz)
    measured = float((change**2).sum()) / len(x)
    assert abs(float(gram[removed][:, removed].sum()) - measured) < 1e-9 * max(1, measured)


def test_greedy_removal_picks_least_increase():
    gram = torch.tensor([[4.0, -3.0, 0.0], [-3.0, 4.0, 0.0], [0.0, 0.0, 2.0]], dtype=torch.float64)
    assert greedy_removal(gram, 1).tolist() == [True, True, False]  # lowest G_uu
    # after unit 2, adding 0 or 1 costs 4; ties go to the lowest index
    assert greedy_removal(gram, 2).tolist() == [False, True, False]
    assert greedy_removal(gram, 0).all()


def test_refit_equals_lstsq_with_ridge_rows():
    g = torch.Generator().manual_seed(7)
    n, d, out = 40, 6, 3
    a = torch.randn(n, d, generator=g, dtype=torch.float64)
    a1 = torch.cat([a, torch.ones(n, 1, dtype=torch.float64)], 1)
    w_full = torch.randn(out, d + 1, generator=g, dtype=torch.float64)
    moment = a1.T @ a1 / n
    kept = torch.tensor([0, 2, 3, 5])
    ridge = 1e-3
    new, lam = refit_consumer(w_full, moment, kept, ridge)
    idx = torch.cat([kept, torch.tensor([d])])
    design = torch.cat([a1[:, idx] / n**0.5, lam**0.5 * torch.eye(len(idx), dtype=torch.float64)])
    target = torch.cat([(a1 @ w_full.T) / n**0.5, torch.zeros(len(idx), out, dtype=torch.float64)])
    ref = torch.linalg.lstsq(design, target).solution.T
    assert torch.allclose(new, ref, atol=1e-10)


def test_reconstruction_through_bs_prune_refit_beats_no_refit():
    model = mlp_bn().float()
    x, y = data_for(model, 64)
    x = x.float()
    errs = {}
    for refit in (True, False):
        res = bs.prune(model, (x, y), method="reconstruction", sparsity=0.4, structure="channel", refit=refit)
        assert res.model[0].out_features == 3 and res.model[3].out_features == 2  # 5 -> 3, 4 -> 2 units
        with torch.no_grad():
            errs[refit] = float(((res.model(x) - model(x)) ** 2).mean())
    assert errs[True] < errs[False]
    with pytest.raises(bs.BrainsurgeonError, match="refit"):
        bs.prune(model, (x, y), method="reconstruction", sparsity=0.4, structure="channel", refit="yes")
