"""WoodFisher: the batched Sherman-Morrison block inverse, the per-block joint OBS step, bs.prune."""
from __future__ import annotations

import copy
import time

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad

import brainsurgeon as bs
from brainsurgeon.context import Numerics
from brainsurgeon.curvature.inverse import outer_product_inverse
from brainsurgeon.curvature.per_sample import ParamLayout, PerSampleVectors
from brainsurgeon.data import Calibration
from brainsurgeon.errors import BrainsurgeonError, MemoryBudgetError
from brainsurgeon.pruners.obs import obs_joint_update
from brainsurgeon.pruners.woodfisher import BlockLayout, block_joint_update
from brainsurgeon.targets import find_targets

from conftest import fit, tiny_data, tiny_mlp


def brute_force_gradients(model, x, y, loss_fn):
    """Per-sample loss gradients of all Linear weights, one torch.func.grad call per sample: (N, n)."""
    targets = find_targets(model)
    names = [f"{t.name}.weight" for t in targets]
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(wts, xi, yi):
        out = functional_call(model, {**params, **dict(zip(names, wts))}, (xi.unsqueeze(0),))
        return loss_fn(out, yi.unsqueeze(0))

    wts = tuple(params[k] for k in names)
    return torch.stack([torch.cat([g.reshape(-1) for g in grad(loss)(wts, xi, yi)]) for xi, yi in zip(x, y)])


@pytest.mark.parametrize("rank", [1, 7])
def test_sherman_morrison_block_inverse_equals_exact_block_inverse(rank):
    model = tiny_mlp(0).double()
    x, y = tiny_data((8,), n=20)
    x = x.double()
    loss_fn = nn.CrossEntropyLoss()
    g = brute_force_gradients(model, x, y, loss_fn)  # (20, 96 + 96 + 32)
    targets = find_targets(model)
    blocks = BlockLayout(ParamLayout.of(targets), block_size=40)  # 96 = 40 + 40 + 16: padded last blocks
    assert blocks.blocks_per_layer == [3, 3, 1]
    lam_layer = torch.tensor([0.3, 0.2, 0.1], dtype=torch.float64)
    lam = lam_layer[blocks.layer_of_block()]
    psv = PerSampleVectors(model, targets, Calibration.from_data((x, y), batch_size=6), loss_fn, "empirical")
    inv = outer_product_inverse(iter(psv), lam, 40, len(x), blocks.to_blocks, rank=rank)
    layout = blocks.layout
    b = 0
    for i in range(3):
        gl = g[:, layout.slice(i)]
        for start in range(0, gl.shape[1], 40):
            gb = gl[:, start : start + 40]
            k = gb.shape[1]
            exact = torch.linalg.inv(lam_layer[i] * torch.eye(k, dtype=torch.float64) + gb.T @ gb / len(x))
            assert float((inv[b, :k, :k] - exact).norm() / exact.norm()) < 1e-10
            # padded coordinates stay decoupled: lam^-1 on the diagonal, zero coupling
            pad = inv[b, k:, k:]
            assert torch.allclose(pad, torch.eye(40 - k, dtype=torch.float64) / lam_layer[i])
            assert torch.equal(inv[b, :k, k:], torch.zeros(k, 40 - k, dtype=torch.float64))
            b += 1
    assert b == blocks.num_blocks


def _spd_blocks(nb, size, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(nb, size, size + 2, generator=g, dtype=torch.float64)
    return a @ a.transpose(1, 2) / size + 0.2 * torch.eye(size, dtype=torch.float64)


def test_block_joint_update_matches_per_block_obs():
    h = _spd_blocks(3, 6, seed=5)
    inv = torch.linalg.inv(h)
    w = torch.randn(3, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    remove = torch.zeros(3, 6, dtype=torch.bool)
    remove[0, [1, 3]] = True
    remove[1, [0, 2, 4, 5]] = True  # block 2 removes nothing and must not change
    inv_b, w_b = inv.clone(), w.clone()
    loss = block_joint_update(inv_b, w_b, remove, Numerics())
    expected_loss = 0.0
    for b in range(2):
        q = remove[b].nonzero().squeeze(1)
        dw, new_inv, l_q, r = obs_joint_update(inv[b], w[b], q, Numerics())
        expected_loss += l_q
        assert torch.allclose(w_b[b], w[b] + dw, rtol=1e-10, atol=1e-12)
        assert torch.equal(w_b[b][q], torch.zeros(len(q), dtype=torch.float64))
        assert torch.allclose(inv_b[b][r[:, None], r], new_inv, rtol=1e-10, atol=1e-12)
        # the downdate is the inverse of the remaining weights' block (Schur complement)
        assert torch.allclose(new_inv, torch.linalg.inv(h[b][r[:, None], r]), rtol=1e-9, atol=1e-11)
        assert torch.equal(inv_b[b][q], torch.zeros(len(q), 6, dtype=torch.float64))
        # 1/2 dw^T F dw of the block equals its predicted loss increase
        assert abs(0.5 * float(dw @ h[b] @ dw) - l_q) < 1e-10 * l_q
    assert loss == pytest.approx(expected_loss, rel=1e-10)
    assert torch.allclose(inv_b[2], inv[2]) and torch.equal(w_b[2], w[2])


@pytest.mark.parametrize("allocation", ["uniform", "global"])
def test_prune_woodfisher_exact_sparsity_zeros_untouched(mlp_case, allocation):
    model, data = mlp_case
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = bs.prune(model, data, "woodfisher", 0.7, allocation=allocation, max_layer_sparsity=0.85, block_size=16)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    pruned = {k: int((~m).sum()) for k, m in res.masks.items()}
    if allocation == "uniform":
        assert pruned == {k: round(0.7 * m.numel()) for k, m in res.masks.items()}
    else:
        assert sum(pruned.values()) == round(0.7 * sum(m.numel() for m in res.masks.values()))
        assert all(pruned[k] <= int(0.85 * m.numel()) for k, m in res.masks.items())
    for name, mask in res.masks.items():
        w = res.model.get_submodule(name).weight
        assert torch.equal(w[~mask], torch.zeros_like(w[~mask]))
    assert set(res.report["numerics"]["damping"]) == {"woodfisher:0", "woodfisher:2", "woodfisher:4"}
    assert res.report["woodfisher"]["num_blocks"] == 6 + 6 + 2


def test_prune_woodfisher_is_deterministic(mlp_case):
    model, data = mlp_case
    a = bs.prune(model, data, "woodfisher", 0.5, curvature="fisher", block_size=8, seed=2)
    b = bs.prune(model, data, "woodfisher", 0.5, curvature="fisher", block_size=8, seed=2)
    for k in a.masks:
        assert torch.equal(a.masks[k], b.masks[k])
        assert torch.equal(a.model.get_submodule(k).weight, b.model.get_submodule(k).weight)


def test_one_block_covering_a_layer_is_full_obs(mlp_case):
    # one target layer in one block: WoodFisher's block-diagonal Fisher is the full empirical
    # Fisher, so it must reproduce OBS with curvature="empirical" exactly (same damping, steps)
    model, (x, y) = mlp_case
    model = copy.deepcopy(model).double()
    x = x.double()
    kw = dict(layers=["4"], obs_steps=3, damping=1e-2)
    wf = bs.prune(model, (x, y), "woodfisher", 0.6, block_size=32, **kw)
    obs = bs.prune(model, (x, y), "obs", 0.6, curvature="empirical", **kw)
    assert torch.equal(wf.masks["4"], obs.masks["4"])
    assert torch.allclose(wf.model[4].weight, obs.model[4].weight, rtol=1e-9, atol=1e-12)
    assert wf.report["woodfisher"]["predicted_loss_increase"] == pytest.approx(
        obs.report["obs"]["predicted_loss_increase"], rel=1e-9
    )


def test_woodfisher_loses_less_than_magnitude_on_a_trained_model():
    from brainsurgeon.data import load_digits
    from brainsurgeon.evaluate import evaluate

    d = load_digits()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
    fit(model, d.train, steps=300)
    calib = (d.train[0][:512], d.train[1][:512])
    dense = evaluate(model, d.train)["loss"]
    for sparsity in (0.5, 0.7):
        mag = evaluate(bs.prune(model, calib, "magnitude", sparsity).model, d.train)["loss"]
        wf = evaluate(bs.prune(model, calib, "woodfisher", sparsity).model, d.train)["loss"]
        assert wf - dense < mag - dense, (sparsity, dense, wf, mag)


def test_memory_budget_error_before_any_work(mlp_case, monkeypatch):
    model, data = mlp_case

    def boom(*a, **k):
        raise AssertionError("curvature work started before the budget check")

    monkeypatch.setattr(PerSampleVectors, "__iter__", boom)
    t0 = time.perf_counter()
    with pytest.raises(MemoryBudgetError, match=r"14 inverse blocks of 16x16") as err:
        bs.prune(model, data, "woodfisher", 0.5, block_size=16, max_memory_bytes=4096)
    assert time.perf_counter() - t0 < 2.0
    assert "4096" in str(err.value)
    assert "use a method that scales" in str(err.value) and "kfac-obd" in str(err.value)


@pytest.mark.parametrize("opts", [{"block_size": 0}, {"curvature": "ggn"}, {"obs_steps": 1.5}, {"max_memory_bytes": True}])
def test_bad_options_are_clear_errors(mlp_case, opts):
    model, data = mlp_case
    with pytest.raises(BrainsurgeonError):
        bs.prune(model, data, "woodfisher", 0.5, **opts)


@pytest.mark.parametrize("method", ["obs", "woodfisher"])
def test_conv_layers_are_pruned_to_exact_counts(cnn_case, method):
    model, data = cnn_case
    res = bs.prune(model, data, method, 0.6)
    for name, mask in res.masks.items():
        w = res.model.get_submodule(name).weight
        assert int((~mask).sum()) == round(0.6 * mask.numel())
        assert torch.equal(w[~mask], torch.zeros_like(w[~mask]))
        assert torch.isfinite(w).all()
