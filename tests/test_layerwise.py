"""Layer-wise methods (OBC, SparseGPT, Wanda): statistics, solvers against brute force, and bs.prune."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import brainsurgeon as bs
from brainsurgeon.allocation import Structure
from brainsurgeon.curvature.layer_inputs import layer_input_stats
from brainsurgeon.data import Calibration
from brainsurgeon.errors import BrainsurgeonError
from brainsurgeon.pruners.layerwise import LayerwiseMethod, row_balanced_mask
from brainsurgeon.pruners.obc import obc_prune, obs_step
from brainsurgeon.pruners import sweep_kernel
from brainsurgeon.pruners.sparsegpt import block_share, sparsegpt_prune
from brainsurgeon.pruners.wanda import wanda_mask, wanda_scores
from brainsurgeon.targets import Target

UNSTRUCTURED = Structure.parse("unstructured")
TOL = dict(rtol=1e-9, atol=1e-10)


def correlated_inputs(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """Rows with strongly correlated features (a random mixing of a few latent factors plus noise)."""
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(n, max(2, d // 3), generator=g, dtype=torch.float64)
    mix = torch.randn(latent.shape[1], d, generator=g, dtype=torch.float64)
    return latent @ mix + 0.1 * torch.randn(n, d, generator=g, dtype=torch.float64)


def hessian_of(x: torch.Tensor, percdamp: float = 0.01) -> torch.Tensor:
    h = 2.0 * x.T @ x / x.shape[0]
    return h + percdamp * torch.diagonal(h).mean() * torch.eye(h.shape[0], dtype=h.dtype)


# ----------------------------------------------------------------------------- statistics
def test_linear_hessian_matches_xxt_over_all_rows():
    torch.manual_seed(0)
    lin = nn.Linear(5, 3).double()
    model = nn.Sequential(nn.Linear(4, 5).double(), nn.Tanh(), lin, nn.Tanh())
    x = torch.randn(10, 7, 4, dtype=torch.float64)  # leading dims (batch, tokens) are all rows
    calib = Calibration([(x[:6], torch.zeros(6)), (x[6:], torch.zeros(4))])
    stats = layer_input_stats(model, Target("2", lin), calib)
    with torch.no_grad():
        rows = torch.tanh(model[0](x)).reshape(-1, 5)
    assert stats.num_rows == 70
    torch.testing.assert_close(stats.hessian, 2.0 * rows.T @ rows / 70, **TOL)
    torch.testing.assert_close(stats.sq_norms, (rows**2).sum(0), **TOL)


@pytest.mark.parametrize("d", [1, 7, 256, 257, 700])
def test_add_gram_is_the_full_product_summed_in_float64_and_exactly_symmetric(d):
    from brainsurgeon.curvature.layer_inputs import add_gram, mirror_upper

    torch.manual_seed(d)
    x = torch.randn(300, d)
    start = torch.randn(d, d, dtype=torch.float64)
    start = start + start.T  # accumulates onto what is there
    acc = start.clone()
    add_gram(acc, x)
    add_gram(acc, x[:100])  # a second batch
    mirror_upper(acc)
    x64 = x.double()
    want = start + x64.T @ x64 + x64[:100].T @ x64[:100]
    # float32 products (inner dimension 300) summed in float64: float32 rounding of each entry
    torch.testing.assert_close(acc, want, rtol=1e-5, atol=1e-4 * float(x64.square().sum(0).max()) ** 0.5)
    assert torch.equal(acc, acc.T)


@pytest.mark.parametrize("kw", [dict(stride=1, padding=0), dict(stride=2, padding=1, dilation=2), dict(padding="same")])
def test_conv_hessian_matches_explicit_patches(kw):
    torch.manual_seed(1)
    conv = nn.Conv2d(2, 3, 3, **kw).double()
    x = torch.randn(3, 2, 7, 6, dtype=torch.float64)
    stats = layer_input_stats(conv, Target("c", conv), Calibration([(x, torch.zeros(3))]))
    # explicit patches, by loops over output positions
    pad = conv._reversed_padding_repeated_twice  # (left, right, top, bottom)
    xp = torch.nn.functional.pad(x, pad)
    (kh, kw_), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
    patches = []
    for b in range(x.shape[0]):
        for i in range(0, xp.shape[2] - dh * (kh - 1), sh):
            for j in range(0, xp.shape[3] - dw * (kw_ - 1), sw):
                patches.append(xp[b, :, i : i + dh * (kh - 1) + 1 : dh, j : j + dw * (kw_ - 1) + 1 : dw].reshape(-1))
    X = torch.stack(patches)
    out = conv(x)
    assert X.shape[0] == out.shape[0] * out.shape[2] * out.shape[3]
    # the patches really are what the conv multiplies
    torch.testing.assert_close(X @ conv.weight.reshape(3, -1).T + conv.bias, out.permute(0, 2, 3, 1).reshape(-1, 3), **TOL)
    torch.testing.assert_close(stats.hessian, 2.0 * X.T @ X / X.shape[0], **TOL)


def test_grouped_conv_is_refused_naming_the_layer():
    model = nn.Sequential(nn.Conv2d(2, 4, 3, groups=2), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    x, y = torch.randn(8, 2, 6, 6), torch.randint(0, 3, (8,))
    with pytest.raises(BrainsurgeonError, match=r"'0'.*groups=2"):
        bs.prune(model, (x, y), "sparsegpt", 0.5)


# ----------------------------------------------------------------------------- OBC
def test_one_obs_step_matches_formula_and_downdate_is_reduced_inverse():
    x = correlated_inputs(50, 6)
    h = hessian_of(x)
    hinv = torch.linalg.inv(h)
    w = torch.randn(2, 6, dtype=torch.float64)
    q = torch.tensor([2, 4])
    w_step, hinv_step = w.clone(), hinv.expand(2, 6, 6).clone()
    loss = obs_step(w_step, hinv_step, q)
    for b in range(2):
        qb = int(q[b])
        expected_w = w[b] - w[b, qb] / hinv[qb, qb] * hinv[:, qb]
        torch.testing.assert_close(w_step[b], expected_w, **TOL)
        assert w_step[b, qb] == 0
        torch.testing.assert_close(loss[b], w[b, qb] ** 2 / (2 * hinv[qb, qb]), **TOL)
        keep = [j for j in range(6) if j != qb]
        reduced = torch.linalg.inv(h[keep][:, keep])
        torch.testing.assert_close(hinv_step[b][keep][:, keep], reduced, **TOL)
        assert hinv_step[b][qb].abs().max() < 1e-12


def brute_force_greedy(w_row: torch.Tensor, h: torch.Tensor, steps: int, nm: Structure | None = None):
    """Greedy OBS on one row, recomputing the inverse of H over the remaining weights every step.

    Returns (w, pruned set in order, step losses)."""
    w = w_row.clone()
    alive = list(range(len(w)))
    order, losses = [], []
    for _ in range(steps):
        hinv = torch.linalg.inv(h[alive][:, alive])
        best, best_score = None, None
        for a, q in enumerate(alive):
            if nm is not None:
                g = q // nm.m
                if sum(1 for p in order if p // nm.m == g) >= nm.m - nm.n:
                    continue
            score = w[q] ** 2 / hinv[a, a]
            if best_score is None or score < best_score:
                best, best_score = a, score
        q = alive[best]
        losses.append(float(w[q] ** 2 / (2 * hinv[best, best])))
        delta = -(w[q] / hinv[best, best]) * hinv[:, best]
        w[alive] = w[alive] + delta
        w[q] = 0.0
        order.append(q)
        alive.pop(best)
    return w, order, losses


def test_obc_matches_brute_force_greedy_obs_unstructured():
    torch.manual_seed(2)
    x = correlated_inputs(40, 7)
    h = hessian_of(x)
    w = torch.randn(4, 7, dtype=torch.float64)
    count = 13
    w_new, keep = obc_prune(w, h, count, UNSTRUCTURED, chunk_rows=3)  # 2 chunks
    assert int((~keep).sum()) == count
    # per-row counts from the full brute-force traces: k lowest of each row's running-max losses
    traces = [brute_force_greedy(w[r], h, 7)[2] for r in range(4)]
    flat = []
    for r, tr in enumerate(traces):
        run = float("-inf")
        for s, v in enumerate(tr):
            run = max(run, v)
            flat.append((run, r * 7 + s, r))
    counts = [0] * 4
    for _, _, r in sorted(flat)[:count]:
        counts[r] += 1
    for r in range(4):
        w_ref, order, _ = brute_force_greedy(w[r], h, counts[r])
        torch.testing.assert_close(w_new[r], w_ref, rtol=1e-8, atol=1e-9)
        assert set(torch.nonzero(~keep[r]).flatten().tolist()) == set(order)


def test_obc_nm_matches_brute_force_and_is_valid():
    torch.manual_seed(3)
    x = correlated_inputs(40, 8)
    h = hessian_of(x)
    w = torch.randn(3, 8, dtype=torch.float64)
    s = Structure.parse("2:4")
    w_new, keep = obc_prune(w, h, 12, s)
    assert (keep.reshape(3, 2, 4).sum(-1) == 2).all()
    for r in range(3):
        w_ref, order, _ = brute_force_greedy(w[r], h, 4, nm=s)
        torch.testing.assert_close(w_new[r], w_ref, rtol=1e-8, atol=1e-9)
        assert set(torch.nonzero(~keep[r]).flatten().tolist()) == set(order)


# ----------------------------------------------------------------------------- SparseGPT
def brute_force_sequential_obs(w: torch.Tensor, h: torch.Tensor, count: int, nm: Structure | None = None):
    """Columns in fixed order; at column i the OBS update over F = {i..d-1} with H_F^-1 recomputed.

    Mask per column: the rows whose w_i^2 / [H_F^-1]_00 is lowest, column i's share of ``count``
    (cumulative rounding), or the N:M choice at each group start over the group's current values."""
    w = w.clone()
    rows, d = w.shape
    pruned = torch.zeros(rows, d, dtype=torch.bool)
    for i in range(d):
        hinv_f = torch.linalg.inv(h[i:, i:])
        if nm is None:
            share = round(count * (i + 1) / d + 1e-12) - round(count * i / d + 1e-12)
            score = w[:, i] ** 2 / hinv_f[0, 0]
            order = sorted(range(rows), key=lambda r: (float(score[r]), r))
            pruned[order[:share], i] = True
        elif i % nm.m == 0:
            # scores of the group's columns under this order: [H_{F_j}^-1]_00 for each column j
            dg = torch.stack([torch.linalg.inv(h[j:, j:])[0, 0] for j in range(i, i + nm.m)])
            sc = w[:, i : i + nm.m] ** 2 / dg
            for r in range(rows):
                low = sorted(range(nm.m), key=lambda j: (float(sc[r, j]), j))[: nm.m - nm.n]
                pruned[r, [i + j for j in low]] = True
        for r in range(rows):
            if pruned[r, i]:
                w[r, i:] = w[r, i:] - w[r, i] / hinv_f[0, 0] * hinv_f[0, :]
                w[r, i] = 0.0
    return w, ~pruned


def test_block_share_sums_to_count():
    for count, cols, bs_ in [(37, 10, 3), (100, 128, 16), (5, 7, 1)]:
        shares = [block_share(count, c, min(c + bs_, cols), cols) for c in range(0, cols, bs_)]
        assert sum(shares) == count and min(shares) >= 0


@pytest.fixture(params=["compiled", "torch"])
def sweep_path(request, monkeypatch):
    """SparseGPT's column sweep compiled (pruners/csrc/sweep.c) or as the torch loop."""
    if request.param == "torch":
        monkeypatch.setattr(sweep_kernel, "applies", lambda *tensors: False)
    else:
        assert sweep_kernel.available(), f"a C compiler is needed for the sweep kernel: {sweep_kernel.why_not()}"
    return request.param


@pytest.mark.parametrize("structure", ["unstructured", "2:4"])
def test_sparsegpt_blocksize_one_matches_sequential_obs(structure, sweep_path):
    torch.manual_seed(4)
    x = correlated_inputs(60, 8)
    h = hessian_of(x)
    w = torch.randn(5, 8, dtype=torch.float64)
    s = Structure.parse(structure)
    count = 20  # half of 5 x 8: also what 2:4 gives
    w1, keep1 = sparsegpt_prune(w, h, count, s, blocksize=4 if s.is_nm else 1, mask_blocksize=None if s.is_nm else 1)
    w_ref, keep_ref = brute_force_sequential_obs(w, h, count, nm=s if s.is_nm else None)
    assert torch.equal(keep1, keep_ref)
    torch.testing.assert_close(w1, w_ref, rtol=1e-8, atol=1e-9)
    # lazy batching is exact: bigger blocks, same per-column masks, same result
    w4, keep4 = sparsegpt_prune(w, h, count, s, blocksize=4, mask_blocksize=1 if not s.is_nm else None)
    assert torch.equal(keep4, keep1)
    torch.testing.assert_close(w4, w1, rtol=1e-9, atol=1e-10)
    assert int((~keep1).sum()) == count


@pytest.mark.parametrize("structure", ["unstructured", "2:4"])
def test_sparsegpt_lazy_blocks_are_exact_when_the_width_is_not_a_multiple(structure, sweep_path):
    torch.manual_seed(9)
    x = correlated_inputs(90, 12)
    h = hessian_of(x)
    w = torch.randn(6, 12, dtype=torch.float64)
    s = Structure.parse(structure)
    count = 36
    mbs = None if s.is_nm else 1
    ref, keep_ref = sparsegpt_prune(w, h, count, s, blocksize=4 if s.is_nm else 1, mask_blocksize=mbs)
    for bs_ in (8, 16):  # 12 = 8 + 4: a short last block; 16: one block wider than the layer
        out, keep = sparsegpt_prune(w, h, count, s, blocksize=bs_, mask_blocksize=mbs)
        assert torch.equal(keep, keep_ref)
        torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-10)
    # float32 (the production path: LAPACK in float32, the same algebra) agrees to float32 precision
    out32, keep32 = sparsegpt_prune(w.float(), h, count, s, blocksize=8, mask_blocksize=mbs)
    assert int((~keep32).sum()) == count and (out32[~keep32] == 0).all()
    same = keep32 == keep_ref
    assert same.all(1).sum() >= 4  # float32 rounding may flip a near-tie, not the whole mask
    torch.testing.assert_close(out32.double()[same.all(1)], ref[same.all(1)], rtol=1e-4, atol=1e-4)


def test_sparsegpt_reconstructs_better_than_magnitude():
    x = correlated_inputs(400, 32, seed=5)
    torch.manual_seed(5)
    w = torch.randn(16, 32, dtype=torch.float64)
    h = hessian_of(x)
    count = 16 * 32 // 2
    w_sg, keep = sparsegpt_prune(w, h, count, UNSTRUCTURED, blocksize=8)
    mag_keep = torch.ones_like(keep)
    mag_keep.view(-1)[torch.argsort(w.abs().view(-1))[:count]] = False
    err = lambda w2: float(((w - w2) @ x.T).square().sum())  # noqa: E731
    e_sg, e_mag = err(w_sg), err(w * mag_keep)
    assert int((~keep).sum()) == count and (w_sg[~keep] == 0).all()
    assert e_sg < 0.5 * e_mag, (e_sg, e_mag)


# ----------------------------------------------------------------------------- Wanda
def test_wanda_scores_formula_and_row_balanced_mask():
    torch.manual_seed(6)
    x = torch.randn(30, 6, dtype=torch.float64)
    w = torch.randn(4, 6, dtype=torch.float64)
    sq = (x**2).sum(0)
    s = wanda_scores(w, sq)
    for i in range(4):
        for j in range(6):
            assert abs(float(s[i, j]) - abs(float(w[i, j])) * float(x[:, j].norm())) < 1e-12
    keep = wanda_mask(w, sq, 10, UNSTRUCTURED)  # 10 = 2 per row + 2 extra
    pruned_per_row = (~keep).sum(1)
    assert int(pruned_per_row.sum()) == 10 and set(pruned_per_row.tolist()) <= {2, 3}
    for r in range(4):  # within each row, the pruned are the lowest scores
        k = int(pruned_per_row[r])
        assert set(torch.nonzero(~keep[r]).flatten().tolist()) == set(torch.argsort(s[r])[:k].tolist())
    # remainder rows: the ones whose 3rd-lowest score is lowest
    third = torch.sort(s, dim=1).values[:, 2]
    assert set(torch.nonzero(pruned_per_row == 3).flatten().tolist()) == set(torch.argsort(third)[:2].tolist())
    assert torch.equal(row_balanced_mask(s, 0), torch.ones_like(keep))


# ----------------------------------------------------------------------------- bs.prune
def tiny_mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))


def tiny_data(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 12, generator=g)
    return x, (x[:, :4].argmax(1))


METHODS = ["obc", "sparsegpt", "wanda"]


@pytest.mark.parametrize("method", METHODS)
def test_prune_uniform_exact_per_layer_zeros_and_deterministic(method):
    model, data = tiny_mlp(), tiny_data()
    before = copy.deepcopy(model.state_dict())
    r = bs.prune(model, data, method, 0.6, num_samples=64, batch_size=32)
    for name, rep in r.report["layers"].items():
        assert rep["pruned"] == round(0.6 * rep["numel"])
        assert rep["achieved_sparsity"] == rep["pruned"] / rep["numel"]
    for name, mod in r.model.named_modules():
        if name in r.masks:
            assert (mod.weight[~r.masks[name]] == 0).all()
            assert (mod.weight[r.masks[name]] != 0).all()
    r2 = bs.prune(model, data, method, 0.6, num_samples=64, batch_size=32)
    for k in r.masks:
        assert torch.equal(r.masks[k], r2.masks[k])
    for (k, a), b in zip(r.model.state_dict().items(), r2.model.state_dict().values()):
        assert torch.equal(a, b), k
    for k, v in model.state_dict().items():  # the user's model is untouched
        assert torch.equal(v, before[k])


@pytest.mark.parametrize("method", METHODS)
def test_prune_global_exact_overall_with_cap(method):
    model, data = tiny_mlp(1), tiny_data()
    r = bs.prune(model, data, method, 0.7, allocation="global", max_layer_sparsity=0.8, num_samples=64)
    layers = r.report["layers"]
    total = sum(l["numel"] for l in layers.values())
    assert sum(l["pruned"] for l in layers.values()) == round(0.7 * total)
    assert all(l["achieved_sparsity"] <= 0.8 + 1e-12 for l in layers.values())
    assert all(l["target_sparsity"] == l["achieved_sparsity"] for l in layers.values())
    assert len({round(l["achieved_sparsity"], 6) for l in layers.values()}) > 1  # really non-uniform


@pytest.mark.parametrize("method", METHODS)
def test_prune_nm_masks_valid(method):
    model, data = tiny_mlp(2), tiny_data()
    r = bs.prune(model, data, method, structure="2:4", layers=["0", "2"], num_samples=64)
    for name in ("0", "2"):
        mask = r.masks[name]
        groups = mask.reshape(mask.shape[0], -1, 4)
        assert (groups.sum(-1) == 2).all()
        w = dict(r.model.named_modules())[name].weight
        assert ((w != 0).reshape(mask.shape[0], -1, 4).sum(-1) <= 2).all()


def test_sequential_calibration_uses_pruned_earlier_layers(monkeypatch):
    model, data = tiny_mlp(3), tiny_data()
    seen = {}
    original = LayerwiseMethod.prune_layer

    def spy(self, name, w, stats, count, ctx):
        seen[name] = stats.hessian.clone()
        return original(self, name, w, stats, count, ctx)

    monkeypatch.setattr(LayerwiseMethod, "prune_layer", spy)
    r = bs.prune(model, data, "sparsegpt", 0.6, num_samples=64)
    calib = Calibration.from_data(data, 64, 128)
    for name in ("2", "4"):
        pruned_h = layer_input_stats(r.model, Target(name, dict(r.model.named_modules())[name]), calib).hessian
        dense_h = layer_input_stats(model, Target(name, dict(model.named_modules())[name]), calib).hessian
        torch.testing.assert_close(seen[name], pruned_h)
        assert (seen[name] - dense_h).abs().max() > 1e-3 * dense_h.abs().max()


def test_dead_inputs_keep_exact_counts_and_are_reported():
    model, (x, y) = tiny_mlp(4), tiny_data()
    x = x.clone()
    x[:, [1, 5, 6]] = 0.0  # three inputs never active: 48 dead weights in layer 0
    for method, sparsity in (("sparsegpt", 0.1), ("obc", 0.1), ("sparsegpt", 0.6)):
        r = bs.prune(model, (x, y), method, sparsity, num_samples=64, layers=["0"])
        rep = r.report["layers"]["0"]
        assert rep["pruned"] == round(sparsity * rep["numel"]) and rep["achieved_sparsity"] == rep["pruned"] / rep["numel"]
        assert any("never active" in f for f in r.report["numerics"]["fallbacks"])
        assert torch.isfinite(r.model[0].weight).all()
        mask = r.masks["0"]
        dead_pruned = int((~mask[:, [1, 5, 6]]).sum())
        assert dead_pruned == min(48, rep["pruned"])  # the free weights go first
        # dead weights the count did not need keep their original values
        kept_dead = mask[:, [1, 5, 6]]
        assert torch.equal(r.model[0].weight[:, [1, 5, 6]][kept_dead], model[0].weight[:, [1, 5, 6]][kept_dead])
    assert "0" in r.report["numerics"]["damping"]


def test_bad_options_are_refused():
    model, data = tiny_mlp(), tiny_data()
    with pytest.raises(BrainsurgeonError, match="mask_blocksize"):
        bs.prune(model, data, "sparsegpt", 0.5, blocksize=8, mask_blocksize=3)
    with pytest.raises(BrainsurgeonError, match="blocksize"):
        bs.prune(model, data, "sparsegpt", 0.5, blocksize=0)
    with pytest.raises(BrainsurgeonError, match="global_saliency"):
        bs.prune(model, data, "wanda", 0.5, global_saliency="bogus")
    with pytest.raises(BrainsurgeonError, match="percdamp"):
        bs.prune(model, data, "obc", 0.5, percdamp=-1.0)
    with pytest.raises(BrainsurgeonError, match="disagree"):
        bs.prune(model, data, "obc", 0.5, percdamp=0.05, damping=0.1)
    with pytest.raises(BrainsurgeonError, match="multiple of M"):
        bs.prune(model, data, "sparsegpt", structure="2:4", blocksize=6, layers=["0"])


def test_row_counts_take_prefixes_of_each_rows_greedy_order():
    from brainsurgeon.pruners.obc import row_counts

    # row 0's cheap second step cannot be taken without its expensive first one
    losses = torch.tensor([[3.0, 0.1, 9.0], [2.0, 2.5, 9.0]])
    assert row_counts(losses, 2).tolist() == [0, 2]
    assert row_counts(losses, 4).tolist() == [2, 2]
    assert int(row_counts(losses, 5).sum()) == 5


def tiny_cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 8, 3, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 3 * 3, 4)
    )


@pytest.mark.parametrize("method", METHODS)
def test_prune_conv_net_exact_counts(method):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, 1, 8, 8, generator=g)
    y = torch.randint(0, 4, (48,), generator=g)
    r = bs.prune(tiny_cnn(), (x, y), method, 0.5, num_samples=48)
    for name, rep in r.report["layers"].items():
        assert rep["pruned"] == round(0.5 * rep["numel"]), name
        assert rep["achieved_sparsity"] == rep["pruned"] / rep["numel"]


def test_wanda_refuses_damping():
    with pytest.raises(BrainsurgeonError, match="damping does not apply"):
        bs.prune(tiny_mlp(), tiny_data(), "wanda", 0.5, damping=0.01)


def test_lowest_k_select_equals_the_stable_sort_choice():
    from brainsurgeon.allocation import lowest_k_mask
    from brainsurgeon.pruners.sparsegpt import lowest_k_select

    g = torch.Generator().manual_seed(7)
    s = torch.randint(0, 5, (6, 9), generator=g).float()  # many ties
    for k in (0, 1, 10, 27, 53, 54):
        assert torch.equal(lowest_k_select(s, k), ~lowest_k_mask(s, k)), k


@pytest.mark.parametrize("n, m", [(2, 4), (1, 4), (4, 8), (3, 8), (1, 2), (5, 16)])
def test_nm_window_choice_equals_the_stable_sort_choice(n, m):
    from brainsurgeon.allocation import nm_mask
    from brainsurgeon.pruners.sparsegpt import nm_window_pruned

    g = torch.Generator().manual_seed(m + n)
    for s in (torch.randint(0, 3, (m, 300), generator=g).float(), torch.rand(m, 300, generator=g)):  # ties, none
        chosen = nm_window_pruned(s, n)
        assert torch.equal(chosen, ~nm_mask(s.T, n, m).T)
        assert torch.equal(chosen.sum(0), torch.full((300,), m - n))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_reversed_cholesky_gives_the_upper_factor_of_the_inverse(dtype):
    from brainsurgeon.pruners.sparsegpt import reversed_cholesky

    h = hessian_of(correlated_inputs(80, 37, seed=8))
    tol = dict(rtol=1e-8, atol=1e-10) if dtype == torch.float64 else dict(rtol=2e-3, atol=1e-4)
    lower = reversed_cholesky(h, dtype).tril()  # the strict upper triangle is scratch
    assert lower.dtype == dtype and (torch.diagonal(lower) > 0).all()
    torch.testing.assert_close((lower @ lower.T).double(), h.flip(0, 1), **tol)  # J H J = L L^T
    m = lower.flip(0, 1).double()  # M = J L J: upper, H = M M^T
    assert torch.equal(m, m.triu())
    u = torch.linalg.solve_triangular(m, torch.eye(37, dtype=m.dtype), upper=True)  # U = M^-1: H^-1 = U^T U
    expected = torch.linalg.cholesky(torch.linalg.inv(h), upper=True)
    torch.testing.assert_close(u, expected, **tol)
    with pytest.raises(torch.linalg.LinAlgError):
        reversed_cholesky(-h, dtype)
