"""The error-correcting layer-wise fit: each layer fitted to the dense network's outputs."""
import copy

import pytest
import torch
from torch import nn

import brainsurgeon as bs
from brainsurgeon.curvature.layer_inputs import LayerInputStats, paired_input_stats
from brainsurgeon.data import Calibration
from brainsurgeon.pruners.layerwise import corrected_weights
from brainsurgeon.targets import find_targets


def _stats(xp, xd):
    n = len(xp)
    h = 2.0 / n * xp.T @ xp
    return LayerInputStats(hessian=h, sq_norms=h.diagonal() * n / 2, num_rows=n, cross=2.0 / n * xd.T @ xp)


def test_corrected_weights_solve_the_proximal_least_squares_problem():
    g = torch.Generator().manual_seed(0)
    xp = torch.randn(200, 12, generator=g, dtype=torch.float64)
    xd = xp + 0.3 * torch.randn(200, 12, generator=g, dtype=torch.float64)
    w = torch.randn(5, 12, generator=g, dtype=torch.float64)
    st = _stats(xp, xd)
    percdamp = 0.05
    lam = percdamp * float(st.hessian.diagonal().mean())
    got = corrected_weights(w, st, percdamp)
    # brute force: min (2/N)|W X_d - W' X_p|^2 + lam |W' - W|^2 as one stacked least-squares problem
    a = torch.cat([(2.0 / 200) ** 0.5 * xp, lam**0.5 * torch.eye(12, dtype=torch.float64)])
    b = torch.cat([(2.0 / 200) ** 0.5 * xd @ w.T, lam**0.5 * w.T])
    want = torch.linalg.lstsq(a, b).solution.T
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


def test_identical_inputs_leave_weights_unchanged():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(100, 8, generator=g, dtype=torch.float64)
    w = torch.randn(4, 8, generator=g, dtype=torch.float64)
    torch.testing.assert_close(corrected_weights(w, _stats(x, x), 0.01), w, rtol=1e-10, atol=1e-12)


def test_paired_stats_match_brute_force():
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).double()
    pruned = copy.deepcopy(dense)
    with torch.no_grad():
        pruned[0].weight[:, :3] = 0
    x = torch.randn(50, 6, dtype=torch.float64)
    calib = Calibration.from_data((x, torch.zeros(50, dtype=torch.long)), batch_size=16)
    t = find_targets(pruned)[1]
    st = paired_input_stats(pruned, t, dense, dense[2], calib)
    xp, xd = torch.relu(pruned[0](x)), torch.relu(dense[0](x))
    torch.testing.assert_close(st.hessian, 2 / 50 * xp.T @ xp)
    torch.testing.assert_close(st.cross, 2 / 50 * xd.T @ xp)


@pytest.mark.parametrize("method", ["sparsegpt", "obc"])
def test_error_correction_brings_outputs_closer_to_the_dense_network(method):
    torch.manual_seed(0)
    from brainsurgeon.data import load_digits
    from brainsurgeon.models import LeNet300
    from brainsurgeon.train import train_model

    ds = load_digits()
    model = train_model(LeNet300((1, 8, 8), hidden=(48, 24)), ds.train, epochs=8, lr=3e-3)
    data = (ds.x_train[:512], ds.y_train[:512])
    with torch.no_grad():
        ref = model(ds.x_test)
    errs = {}
    for ec in (True, False):
        res = bs.prune(model, data, method, 0.85, allocation="global", error_correction=ec)
        assert res.report["error_correction"] is ec
        with torch.no_grad():
            errs[ec] = float((res.model(ds.x_test) - ref).square().mean())
    assert errs[True] < errs[False]


def test_auto_corrects_under_global_allocation_only():
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    data = (torch.randn(64, 4), torch.randint(0, 3, (64,)))
    assert bs.prune(model, data, "sparsegpt", 0.5, allocation="global").report["error_correction"] is True
    assert bs.prune(model, data, "sparsegpt", 0.5).report["error_correction"] is False
    assert bs.prune(model, data, "obc", 0.5, error_correction=True).report["error_correction"] is True


def test_error_correction_must_be_a_bool_or_auto():
    model = nn.Sequential(nn.Linear(4, 3))
    with pytest.raises(bs.BrainsurgeonError, match="error_correction"):
        bs.prune(model, (torch.randn(8, 4), torch.zeros(8, dtype=torch.long)), "sparsegpt", 0.5, error_correction=1)
