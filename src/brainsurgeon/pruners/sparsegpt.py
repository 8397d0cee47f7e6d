"""SparseGPT (Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately Pruned
in One-Shot", Algorithm 1)."""
from __future__ import annotations

from contextlib import contextmanager
from functools import cache
from typing import Callable, ClassVar

import numpy as np
import torch
from scipy.linalg import lapack
from threadpoolctl import ThreadpoolController

from ..allocation import Structure, nm_mask
from ..curvature.layer_inputs import LayerInputStats
from ..errors import BrainsurgeonError
from ..registry import register
from . import sweep_kernel
from .layerwise import LayerwiseMethod


@cache
def _blas_pools() -> ThreadpoolController:
    """The process's BLAS thread pools, found once (scipy's LAPACK is loaded by this module's
    import): ``threadpool_limits`` searches the loaded libraries on every call, about 0.9 ms, once
    per layer solved."""
    return ThreadpoolController()


def reversed_cholesky(hessian: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """L lower triangular with J H J = L L^T (J: the order reversal), in ``dtype``; only the lower
    triangle is meaningful (on the CPU the strict upper triangle is left as scratch).

    M = J L J is then the upper triangular factor of H = M M^T, and U = M^-1 the upper Cholesky
    factor of the inverse, H^-1 = U^T U: row i of U is H_F^-1[0, :] / sqrt([H_F^-1]_00) for
    F = {i, ..., d-1}, every OBS downdate of SparseGPT's fixed column order at once (see
    ``sparsegpt_prune`` for why U itself is never formed).

    On the CPU the reversal is folded into the float64 -> ``dtype`` copy (a numpy view with negative
    strides) and LAPACK's potrf factorises that copy in place without clearing the other triangle:
    measured 0.15 s against 0.37 s for ``torch.linalg.cholesky_ex`` on the flipped copy at d = 4096
    (which also copies its input and zeroes a triangle). LAPACK runs on ONE thread: OpenBLAS's
    pool threads busy-wait after every multi-threaded call (its thread timeout), and in a prune
    they stole the cores from torch's next kernels (perf on SmolLM2, 2 threads: 12% of all samples
    in ``blas_thread_server``); one thread costs 3.4 against 1.9 ms at d = 576, 23 against 14 ms at
    d = 1536, 0.27 against 0.14 s at d = 4096.
    Raises ``torch.linalg.LinAlgError`` if H is not positive definite in ``dtype``.
    """
    if hessian.device.type == "cpu" and dtype in (torch.float32, torch.float64):
        n = hessian.shape[0]
        out = torch.empty(n, n, dtype=dtype)
        buf = out.numpy()
        np.copyto(buf, hessian.detach().numpy()[::-1, ::-1], casting="same_kind")
        potrf = lapack.spotrf if dtype == torch.float32 else lapack.dpotrf
        with _blas_pools().limit(limits=1, user_api="blas"):
            # buf.T is the same symmetric matrix in Fortran order, factorised in place as R^T R
            # (R upper, Fortran order): read in C order, buf's lower triangle is R^T = L.
            _, info = potrf(buf.T, lower=0, clean=0, overwrite_a=1)
        if info != 0:
            raise torch.linalg.LinAlgError(f"H is not positive definite in {dtype} (LAPACK potrf info {info})")
        return out
    lower, info = torch.linalg.cholesky_ex(hessian.to(dtype).flip(0, 1))
    if int(info) != 0:
        raise torch.linalg.LinAlgError(f"H is not positive definite in {dtype} (leading minor {int(info)})")
    return lower


def block_share(count: int, c0: int, c1: int, cols: int) -> int:
    """Weights to prune among columns [c0, c1): cumulative rounding, so shares sum to ``count``."""
    return (2 * count * c1 + cols) // (2 * cols) - (2 * count * c0 + cols) // (2 * cols)


def kth_smallest(flat: torch.Tensor, k: int) -> float:
    """The k-th smallest value (1-based) of a 1-D tensor. On the CPU numpy's introselect
    (``np.partition``), measured 12x faster than ``torch.kthvalue`` on 512k floats (0.7 vs 8 ms:
    SparseGPT selects once per mask block)."""
    if flat.device.type == "cpu":
        return float(np.partition(flat.detach().numpy(), k - 1)[k - 1])
    return float(torch.kthvalue(flat, k).values)


def lowest_k_select(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the ``k`` lowest ``scores``, ties broken by position: the same choice as
    ``allocation.lowest_k_mask`` (pruned = True here) in O(n) with a selection instead of a sort."""
    flat = scores.reshape(-1)
    chosen = torch.zeros(flat.shape, dtype=torch.bool, device=flat.device)
    if k <= 0:
        return chosen.view_as(scores)
    if k >= flat.numel():
        return ~chosen.view_as(scores)
    threshold = kth_smallest(flat, k)
    chosen = flat <= threshold
    excess = int(torch.count_nonzero(chosen)) - k  # ties at the threshold (usually none)
    if excess > 0:
        ties = torch.nonzero(flat == threshold).flatten()  # in position order
        chosen[ties[len(ties) - excess :]] = False  # keep the first ones, as a stable sort would
    return chosen.view_as(scores)


@contextmanager
def one_thread():
    """Run the column loop's many small kernels on one thread: at 4096 x 128 they are too small for
    a parallel region to pay for its synchronisation, and on a busy machine each region's barrier
    can cost a scheduler time slice (measured 9x slower with 2 threads on the shared 2-core box)."""
    old = torch.get_num_threads()
    if old == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def nm_window_pruned(s: torch.Tensor, n: int) -> torch.Tensor:
    """Pruned mask of one N:M window given as rows: ``s`` (m, R), column r one group of m scores.

    The same choice as ``~allocation.nm_mask(s.T, n, m).T`` (the m - n lowest of each group, ties
    to the earlier input) by ranks: score k's place in a stable ascending sort is
    #{l : s_l < s_k} + #{l < k : s_l = s_k}, and it is pruned if that is below m - n. m x m
    comparisons of whole rows instead of a transposed copy, a float64 cast, an argsort and a
    scatter over R tiny groups: SparseGPT chooses a mask every m columns, and at 2:4 the choice
    was half of a layer's solve (measured at 1536 x 576, 1 thread: 73 ms against 34 ms for 50%
    unstructured). Scores are finite (squares of finite weights, scaled).
    """
    m = s.shape[0]
    earlier = torch.ones(m, m, dtype=torch.bool, device=s.device).tril_(-1)  # [k, l]: l < k
    a, b = s.unsqueeze(1), s.unsqueeze(0)  # [k, l, r]: a = s_k, b = s_l
    before = (b < a) | ((b == a) & earlier.unsqueeze(-1))
    return before.sum(1) < (m - n)


def _choose(W1: torch.Tensor, dinv: torch.Tensor, i: int, j: int, col: int, count: int, cols: int,
            structure: Structure) -> torch.Tensor:
    """Pruned mask of block rows [i, j) (columns col.. of W) from their current values: the lowest
    OBS errors w^2 / U_ii^2, per row and group of M for N:M, else the block's share of ``count``."""
    s = (W1[i:j] * dinv[i:j, None]).square_()
    if structure.is_nm:
        if s.shape[0] == structure.m <= 16:
            return nm_window_pruned(s, structure.n)
        return ~nm_mask(s.T, structure.n, structure.m).T
    return lowest_k_select(s, block_share(count, col, col + (j - i), cols))


def _sweep_columns(W1: torch.Tensor, err: torch.Tensor, Ut: torch.Tensor, scale: torch.Tensor, w0: int,
                   w1: int) -> None:
    """Columns [w0, w1) in torch, as ``sweep_kernel.sweep_columns``: each gathers the errors of the
    window's earlier columns (one matrix-vector product), then its own error is w_j scale_j."""
    for j in range(w0, w1):
        if j > w0:
            W1[j].addmv_(err[w0:j].T, Ut[j, w0:j], alpha=-1.0)
        torch.mul(W1[j], scale[j - w0], out=err[j])


def _sweep(W1: torch.Tensor, U1: torch.Tensor, P1: torch.Tensor, i1: int, count: int, cols: int,
           structure: Structure, mask_bs: int) -> None:
    """The eager part of one block (W1: the block's columns of W as rows, current at entry).

    Column i removes its chosen weights with err_i = p_i w_i / U_ii and would compensate the block's
    later columns, w_j -= err_i U_ij. The updates are gathered left-looking instead: column j is
    brought up to date only when its turn (or its mask window's) comes, w_j -= sum_{i<j} U_ij err_i,
    one matrix-vector product over the stored errors instead of a rank-1 update of every later
    column per column (half the memory traffic, one kernel per column). The mask is chosen at the
    start of each mask window, after the window's columns are brought up to date by one matmul.
    Where it is built, the compiled sweep (``sweep_kernel``) runs the per-column loop, and at N:M
    the whole block, mask choices included: the same arithmetic, summed in another order."""
    n = W1.shape[0]
    dinv = torch.diagonal(U1).reciprocal()
    Ut = U1.T.contiguous()  # Ut[j, :j] = U_{:j, j}: the coefficients column j gathers
    err = torch.empty_like(W1)
    compiled = sweep_kernel.applies(W1, err, Ut, dinv)
    if compiled and structure.is_nm and sweep_kernel.fits_nm(n, structure.m):
        sweep_kernel.sweep_nm(W1, err, Ut, dinv, P1, structure.n, structure.m)  # masks chosen inside
    else:
        columns = sweep_kernel.sweep_columns if compiled else _sweep_columns
        window = structure.m if structure.is_nm else mask_bs
        for w0 in range(0, n, window):
            w1 = min(w0 + window, n)
            if w0 > 0:
                W1[w0:w1].addmm_(Ut[w0:w1, :w0], err[:w0], alpha=-1.0)
            P1[w0:w1] = _choose(W1, dinv, w0, w1, i1 + w0, count, cols, structure)
            scale = P1[w0:w1].to(W1.dtype).mul_(dinv[w0:w1, None])  # p_i / U_ii per row of the window
            columns(W1, err, Ut, scale, w0, w1)
    # exactly zero, not a rounding residue (+ 0.0 turns the -0.0 of negative residues into +0.0);
    # measured 8x faster than masked_fill_ with a strided boolean mask
    W1.mul_(~P1).add_(0.0)


def sparsegpt_prune(
    w: torch.Tensor,
    hessian: torch.Tensor,
    count: int,
    structure: Structure,
    blocksize: int = 128,
    mask_blocksize: int | None = None,
    note: Callable[[str], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune ``count`` weights of ``w`` (out x in) given the (damped) H; returns (W_new, keep).

    Columns are processed left to right. Column i: the chosen weights q are zeroed and every row
    compensates on the columns to its right with the OBS update of the fixed order,
        err = (w_i - q_i) / U_ii,    w_{i:} -= err * U_{i, i:},     H^-1 = U^T U,
    applied eagerly inside a block of ``blocksize`` columns and lazily (one matmul per block) to
    the columns after it. The mask is chosen adaptively: at the start of each ``mask_blocksize``
    columns, the weights with the lowest w^2 / U_ii^2 (the OBS error under this order) among the
    block's current (already compensated) values; each mask block prunes its cumulative-rounding
    share of ``count`` so the layer's count is exact. N:M: in each group of M columns, the M-N
    lowest per row.

    The lazy updates without U. All updates together are W_final = W - E U (E: the errors, one
    column per column of W), so the total change D = W - W_final satisfies E = D M with M = U^-1,
    H = M M^T. Block B's current values are then
        W_B - E_{<B} U_{<B,B} = W_B + (D_{<B} M_{<B,B}) U_BB,
    because M U = I gives M_{<B,<B} U_{<B,B} = -M_{<B,B} U_BB. So the solver keeps the running sum
    A = sum of D_B' M_{B',later} (one matmul per block, the reference's lazy update with M in place
    of U) and only inverts the small diagonal blocks U_BB = M_BB^-1: one Cholesky of H replaces the
    reference's Cholesky, cholesky_inverse and Cholesky. M = J L J (``reversed_cholesky``) is used
    through L's blocks directly, with A kept in reversed column order, so nothing d x d is flipped.

    Precision: H arrives in float64; L is computed in the weights' dtype (float32 for a float32
    layer, as in the SparseGPT reference: the damped H is well enough conditioned, and the solve
    stays fast), retried in float64 if the float32 Cholesky fails (reported through ``note``).
    Layout: the work is done on W^T so that each column of W is one contiguous row.
    """
    rows, cols = w.shape
    mask_bs = mask_blocksize or blocksize
    if blocksize % mask_bs:
        raise BrainsurgeonError(f"mask_blocksize={mask_bs} must divide blocksize={blocksize}")
    dtype = torch.float64 if w.dtype == torch.float64 else torch.float32
    try:
        L = reversed_cholesky(hessian, dtype)
    except torch.linalg.LinAlgError:
        if dtype == torch.float64:
            raise
        if note is not None:
            note("float32 Cholesky of H failed; factorised in float64")
        L = reversed_cholesky(hessian, torch.float64).to(dtype)
    Wt = w.to(dtype).T.contiguous()  # (cols, rows): column i of W is Wt[i]
    # acc_r[j] = row (cols-1-j) of A^T: the columns after the first block, in reversed order;
    # its memory then holds the result (fresh pages cost ~25 ms per 64 MB here)
    scratch = torch.empty_like(Wt)
    acc_r = scratch[blocksize:]
    prune_t = torch.empty(cols, rows, dtype=torch.bool, device=w.device)  # every block writes its rows
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        f1, f2 = cols - i2, cols - i1  # the block's columns in L's reversed order
        M1 = L[f1:f2, f1:f2].tril().flip(0, 1)  # M_BB
        U1 = torch.linalg.solve_triangular(M1, torch.eye(i2 - i1, dtype=dtype, device=w.device), upper=True)
        W1 = Wt[i1:i2]  # a view: the block is made current and solved in place
        before = W1.clone() if i2 < cols else None
        if i1 > 0:
            W1.addmm_(U1.T, acc_r[f1:f2].flip(0))  # (A_B U_BB)^T
        with one_thread():
            _sweep(W1, U1, prune_t[i1:i2], i1, count, cols, structure, mask_bs)
        if before is not None:
            # the lazy update, right-looking as in the reference: A_later += D_B M_{B,later}, with
            # D_B = W_B - W_final,B from the block's original values (making it current is part of
            # D_B). In L's order: M_{B,later} reversed on both axes is L[f1:f2, :f1], so the
            # update of acc_r[:f1] is L[f1:f2, :f1]^T (D_B reversed). Right-looking measured 1.4x
            # faster than the left-looking form (a matmul of inner dimension i1 per block).
            d_rev = before.sub_(W1).flip(0)
            if i1 == 0:
                torch.mm(L[f1:f2, :f1].T, d_rev, out=acc_r)  # the first update initialises A
            else:
                acc_r[:f1].addmm_(L[f1:f2, :f1].T, d_rev)
    return scratch.view(rows, cols).copy_(Wt.T), prune_t.logical_not_().T.contiguous()


@register("sparsegpt")
class SparseGPT(LayerwiseMethod):
    """SparseGPT (Frantar & Alistarh 2023), layer by layer on H = (2/N) X X^T.

    An approximation of OBC that uses one fixed column order, so that a single upper Cholesky
    factor U of H^-1 (H^-1 = U^T U) holds every OBS downdate the order needs: for column i the
    chosen weights are removed with the OBS update ``w_{i:} -= (w_i / U_ii) U_{i,i:}`` and the error
    ``w_i^2 / U_ii^2``; updates are batched lazily per ``blocksize`` columns (one matmul per block);
    the mask is chosen adaptively per ``mask_blocksize`` columns from the compensated weights; N:M
    patterns choose per group of M. H is damped by ``percdamp`` (default 1%) of its mean diagonal.
    The count per layer is exact (each mask block prunes its cumulative-rounding share).

    Options: ``blocksize`` (128), ``mask_blocksize`` (default = blocksize; must divide it),
    ``percdamp`` (default: the run's ``damping``, else 0.01), ``global_saliency`` (see layerwise),
    ``error_correction`` (default "auto": on with global allocation; True: each layer is fitted
    to the dense network's outputs; False: to its own outputs on the pruned inputs, as the
    SparseGPT reference does; see layerwise).
    """

    summary = "SparseGPT (Frantar & Alistarh 2023): fixed-order OBS with one Cholesky factor, lazy block updates."
    supports_nm: ClassVar[bool] = True

    def __init__(
        self, blocksize: int = 128, mask_blocksize: int | None = None, percdamp: float | None = None,
        global_saliency: str = "relative", error_correction: bool | str = "auto",
        calibration_path: str = "auto", activations_dtype=None, owl_m: float | None = None,
        owl_lambda: float | None = None, lockstep: bool | str = "auto", compute_dtype=None,
    ) -> None:
        super().__init__(
            percdamp=percdamp, global_saliency=global_saliency, error_correction=error_correction, calibration_path=calibration_path,
            activations_dtype=activations_dtype, owl_m=owl_m, owl_lambda=owl_lambda, lockstep=lockstep,
            compute_dtype=compute_dtype,
        )
        for name, value in (("blocksize", blocksize), ("mask_blocksize", mask_blocksize)):
            if value is None and name == "mask_blocksize":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise BrainsurgeonError(f"{name} must be a positive integer, got {value!r}")
        if mask_blocksize is not None and blocksize % mask_blocksize:
            raise BrainsurgeonError(
                f"mask_blocksize={mask_blocksize} must divide blocksize={blocksize} (mask blocks sit inside "
                "the lazy-update blocks)"
            )
        self.blocksize = blocksize
        self.mask_blocksize = mask_blocksize

    def validate(self, ctx) -> None:
        super().validate(ctx)
        s = ctx.options.structure
        if s.is_nm and self.blocksize % s.m:
            # an N:M group must not straddle two lazy-update blocks
            raise BrainsurgeonError(f"blocksize={self.blocksize} must be a multiple of M={s.m} for the {s} pattern")

    def run(self, ctx) -> dict[str, torch.Tensor]:
        masks = super().run(ctx)
        # which column sweep ran (the same arithmetic; sums in another order): CPU layers use the
        # compiled one where it built, the torch loop otherwise
        why = sweep_kernel.why_not()
        ctx.extra_report["column_sweep"] = "compiled (CPU float32/float64 layers)" if why is None else f"torch loop: {why}"
        return masks

    def solve(self, w: torch.Tensor, stats: LayerInputStats, count: int, structure: Structure, note=None):
        return sparsegpt_prune(w, stats.hessian, count, structure, self.blocksize, self.mask_blocksize, note)

