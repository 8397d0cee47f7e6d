"""The compiled SparseGPT column sweep (pruners/csrc/sweep.c) against explicit loops and the torch path."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import brainsurgeon as bs
from brainsurgeon.allocation import Structure
from brainsurgeon.pruners import sparsegpt, sweep_kernel


@pytest.fixture
def kernel():
    assert sweep_kernel.available(), f"a C compiler is needed for the sweep kernel: {sweep_kernel.why_not()}"
    return sweep_kernel


@pytest.fixture
def torch_loop(monkeypatch):
    """The torch loop, as on a machine where the kernel does not build."""
    monkeypatch.setattr(sweep_kernel, "applies", lambda *tensors: False)


def block(n, rows, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=g, dtype=torch.float64)
    U = torch.linalg.cholesky(a @ a.T + n * torch.eye(n, dtype=torch.float64)).T  # upper, positive diagonal
    W = torch.randn(n, rows, generator=g, dtype=torch.float64)
    return W.to(dtype), U.to(dtype)


def explicit_sweep(W, U, pruned):
    """Right-looking, column by column, in float64: err_i = p_i w_i / U_ii; w_j -= err_i U_ij for j > i."""
    W, U = W.double().clone(), U.double()
    err = torch.zeros_like(W)
    for i in range(W.shape[0]):
        err[i] = pruned[i].double() * W[i] / U[i, i]
        W[i + 1:] -= U[i, i + 1:, None] * err[i]
    return W, err


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_columns_match_the_explicit_sweep(kernel, dtype):
    n, rows = 20, 13
    W, U = block(n, rows, seed=1, dtype=dtype)
    pruned = torch.rand(n, rows, generator=torch.Generator().manual_seed(2)) < 0.5
    want_w, want_err = explicit_sweep(W, U, pruned)
    Ut = U.T.contiguous()
    scale = pruned.to(dtype) / torch.diagonal(U)[:, None]
    err = torch.empty_like(W)
    for w0, w1 in [(0, 7), (7, 8), (8, 20)]:  # windows: each gathers only its own columns' errors
        if w0:
            W[w0:w1] -= Ut[w0:w1, :w0] @ err[:w0]
        kernel.sweep_columns(W, err, Ut, scale[w0:w1].contiguous(), w0, w1)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(W.double(), want_w, rtol=tol, atol=tol)
    torch.testing.assert_close(err.double(), want_err, rtol=tol, atol=tol)


@pytest.mark.parametrize("keep,m", [(2, 4), (4, 8), (1, 3)])
def test_nm_masks_follow_the_window_rule_with_ties(kernel, keep, m):
    """Per row and group, the m - keep lowest (w / U_jj)^2 are pruned, ties to the earlier column (as
    ``nm_window_pruned``); the weights then as the explicit sweep with that mask."""
    n, rows = 4 * m, 9
    W, U = block(n, rows, seed=3)
    U = U / torch.diagonal(U)[:, None] * 1.5  # equal diagonals: equal weights give equal scores
    W[0:m, 0] = 0.25  # a whole group tied in the first row (nothing before it changes it)
    W[1, 1] = -W[0, 1]  # a tie of opposite signs
    P = torch.empty(n, rows, dtype=torch.bool)
    got = W.clone()
    kernel.sweep_nm(got, torch.empty_like(W), U.T.contiguous(), torch.diagonal(U).reciprocal(), P, keep, m)
    assert torch.equal(P.view(-1, m, rows).sum(1), torch.full((n // m, rows), m - keep))
    assert P[: m - keep, 0].all() and not P[m - keep : m, 0].any()  # the tied group: the earliest pruned
    want_w, _ = explicit_sweep(W, U, P)
    torch.testing.assert_close(got, want_w, rtol=1e-12, atol=1e-12)
    # each group's choice, from the values the sweep had then (every earlier column applied)
    for w0 in range(0, n, m):
        before, _ = explicit_sweep(W, U, P * (torch.arange(n)[:, None] < w0))
        scores = (before[w0 : w0 + m] / torch.diagonal(U)[w0 : w0 + m, None]).square()
        assert torch.equal(P[w0 : w0 + m], sparsegpt.nm_window_pruned(scores, keep))


def layer_problem(rows, cols, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * cols, cols // 3, generator=g, dtype=torch.float64) @ torch.randn(cols // 3, cols, generator=g,
                                                                                         dtype=torch.float64)
    x += 0.1 * torch.randn(4 * cols, cols, generator=g, dtype=torch.float64)
    h = 2 * x.T @ x / x.shape[0]
    h += 0.01 * torch.diagonal(h).mean() * torch.eye(cols, dtype=torch.float64)
    return torch.randn(rows, cols, generator=g), h


@pytest.mark.parametrize("structure,mask_bs,blocksize", [
    ("unstructured", None, 128), ("unstructured", 32, 128), ("2:4", None, 128), ("4:8", None, 128), ("3:7", None, 126),
])
def test_sparsegpt_compiled_equals_the_torch_loop(kernel, monkeypatch, structure, mask_bs, blocksize):
    """A float32 layer wider than two blocks with a shorter last block: the same masks, the weights to
    float32 rounding (the sums are formed in another order)."""
    s = Structure.parse(structure)
    cols = 7 * 46 if s.m == 7 else 328 if s.is_nm else 322
    w, h = layer_problem(40, cols, seed=4)
    count = w.numel() // 2 if not s.is_nm else w.numel() * (s.m - s.n) // s.m
    fast_w, fast_keep = sparsegpt.sparsegpt_prune(w, h, count, s, blocksize, mask_bs)
    monkeypatch.setattr(sweep_kernel, "applies", lambda *tensors: False)
    slow_w, slow_keep = sparsegpt.sparsegpt_prune(w, h, count, s, blocksize, mask_bs)
    assert int((~fast_keep).sum()) == count
    assert torch.equal(fast_keep, slow_keep)
    torch.testing.assert_close(fast_w, slow_w, rtol=1e-4, atol=1e-5)
    assert (fast_w[~fast_keep] == 0).all()


def test_the_torch_loop_runs_where_the_kernel_does_not_apply(torch_loop):
    w, h = layer_problem(8, 32, seed=5)
    out, keep = sparsegpt.sparsegpt_prune(w, h, 128, Structure.parse("unstructured"), blocksize=16)
    assert int((~keep).sum()) == 128 and (out[~keep] == 0).all()


def test_bad_shapes_are_refused(kernel):
    W, U = block(8, 5, seed=6)
    with pytest.raises(ValueError):
        kernel.sweep_columns(W, torch.empty_like(W), U, torch.ones(3, 5, dtype=W.dtype), 0, 4)
    with pytest.raises(ValueError):
        kernel.sweep_nm(W, torch.empty_like(W), U, torch.ones(8, dtype=W.dtype),
                        torch.empty(8, 5, dtype=torch.bool), 2, 3)  # 3 does not divide 8
    assert not kernel.applies(W, U.float())  # mixed dtypes
    assert not kernel.applies(W.T, U)  # not contiguous
    scale = torch.ones(8, 5, dtype=W.dtype)
    with pytest.raises(ValueError):
        kernel.sweep_columns(W, torch.empty_like(W), U.T, scale, 0, 8)  # a transposed view: raw pointers refused
    with pytest.raises(ValueError):
        kernel.sweep_columns(W, torch.empty_like(W), U.float(), scale, 0, 8)


def test_the_report_says_which_sweep_ran(kernel, monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 4))
    x, y = torch.randn(64, 16), torch.randint(0, 4, (64,))
    compiled = bs.prune(model, (x, y), "sparsegpt", 0.5, progress=False)
    assert compiled.report["column_sweep"].startswith("compiled")
    monkeypatch.setattr(sweep_kernel.KERNEL, "_lib", None)
    monkeypatch.setattr(sweep_kernel.KERNEL, "_why_not", "no C compiler (cc not found): install gcc or set CC")
    loop = bs.prune(model, (x, y), "sparsegpt", 0.5, progress=False)
    assert loop.report["column_sweep"] == "torch loop: no C compiler (cc not found): install gcc or set CC"
    for a, b in zip(compiled.model.parameters(), loop.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
