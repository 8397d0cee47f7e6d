"""SparseGPT (Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately Pruned
in One-Shot", Algorithm 1)."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, ClassVar

import torch

from ..allocation import Structure, nm_mask
from ..curvature.layer_inputs import LayerInputStats
from ..errors import BrainsurgeonError
from ..registry import register
from .layerwise import LayerwiseMethod


def lower_triangular_inverse(lower: torch.Tensor, base: int = 512) -> torch.Tensor:
    """L^-1 of a lower-triangular L by halves: [[A, 0], [C, B]]^-1 = [[A^-1, 0], [-B^-1 C A^-1, B^-1]].

    The off-diagonal blocks are plain matmuls, which run near the machine's peak, where one
    triangular solve against the identity (trsm) was measured 1.5-3x slower at d = 4096."""
    n = lower.shape[0]
    if n <= base:
        eye = torch.eye(n, dtype=lower.dtype, device=lower.device)
        return torch.linalg.solve_triangular(lower, eye, upper=False)
    k = n // 2
    a_inv = lower_triangular_inverse(lower[:k, :k], base)
    b_inv = lower_triangular_inverse(lower[k:, k:], base)
    out = torch.zeros_like(lower)
    out[:k, :k] = a_inv
    out[k:, k:] = b_inv
    out[k:, :k] = b_inv @ (lower[k:, :k] @ a_inv)
    out[k:, :k].neg_()
    return out


def inverse_cholesky_upper(hessian: torch.Tensor, dtype: torch.dtype = torch.float64, base: int = 512) -> torch.Tensor:
    """U upper triangular with H^-1 = U^T U (the upper Cholesky factor of the inverse), in ``dtype``.

    Row i of U is H_F^-1[0, :] / sqrt([H_F^-1]_00) for F = {i, ..., d-1}: the inverse of H with
    the first i rows/columns removed, i.e. every OBS downdate of a fixed column order at once.

    Computed without forming H^-1: with J the order reversal and J H J = L L^T (Cholesky),
    H^-1 = J L^-T L^-1 J = (J L^-1 J)^T (J L^-1 J), and J L^-1 J is upper triangular with a
    positive diagonal, so it is U (one Cholesky and one triangular inverse instead of the three
    factorisations Cholesky, cholesky_inverse, Cholesky). Raises ``torch.linalg.LinAlgError`` if
    H is not positive definite.
    """
    h = hessian.to(dtype).flip(0, 1)
    lower, info = torch.linalg.cholesky_ex(h)
    del h
    if int(info) != 0:
        raise torch.linalg.LinAlgError(f"H is not positive definite in {dtype} (leading minor {int(info)})")
    return lower_triangular_inverse(lower, base).flip(0, 1)


def block_share(count: int, c0: int, c1: int, cols: int) -> int:
    """Weights to prune among columns [c0, c1): cumulative rounding, so shares sum to ``count``."""
    return (2 * count * c1 + cols) // (2 * cols) - (2 * count * c0 + cols) // (2 * cols)


def lowest_k_select(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the ``k`` lowest ``scores``, ties broken by position: the same choice as
    ``allocation.lowest_k_mask`` (pruned = True here) in O(n) with a selection instead of a sort."""
    flat = scores.reshape(-1)
    chosen = torch.zeros(flat.shape, dtype=torch.bool, device=flat.device)
    if k <= 0:
        return chosen.view_as(scores)
    if k >= flat.numel():
        return ~chosen.view_as(scores)
    threshold = torch.kthvalue(flat, k).values
    chosen = flat < threshold
    need = k - int(chosen.sum())
    ties = torch.nonzero(flat == threshold).flatten()[:need]  # nonzero is in position order
    chosen[ties] = True
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
        err = (w_i - q_i) / U_ii,    w_{i:} -= err * U_{i, i:},
    applied eagerly inside a block of ``blocksize`` columns and lazily (one matmul) to the columns
    after the block. The mask is chosen adaptively: at the start of each ``mask_blocksize`` columns,
    the weights with the lowest w^2 / U_ii^2 (the OBS error under this order) among the block's
    current (already compensated) values; each mask block prunes its cumulative-rounding share of
    ``count`` so the layer's count is exact. N:M: in each group of M columns, the M-N lowest per row.

    Precision: H arrives in float64; U is computed in the weights' dtype (float32 for a float32
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
        U = inverse_cholesky_upper(hessian, dtype)
    except torch.linalg.LinAlgError:
        if dtype == torch.float64:
            raise
        if note is not None:
            note("float32 Cholesky of H failed; factorised in float64")
        U = inverse_cholesky_upper(hessian, torch.float64).to(dtype)
    Wt = w.to(dtype).T.contiguous()  # (cols, rows): column i of W is Wt[i]
    prune_t = torch.zeros(cols, rows, dtype=torch.bool, device=w.device)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = Wt[i1:i2]  # a view: compensated in place
        Err1 = torch.empty_like(W1)
        U1 = U[i1:i2, i1:i2]
        d = torch.diagonal(U1)
        P1 = prune_t[i1:i2]
        with one_thread():
            for i in range(i2 - i1):
                col = i1 + i
                if structure.is_nm:
                    if col % structure.m == 0:
                        s = W1[i : i + structure.m].square() / d[i : i + structure.m, None].square()
                        P1[i : i + structure.m] = ~nm_mask(s.T, structure.n, structure.m).T
                elif col % mask_bs == 0:
                    j = min(i + mask_bs, i2 - i1)
                    s = W1[i:j].square() / d[i:j, None].square()
                    P1[i:j] = lowest_k_select(s, block_share(count, col, i1 + j, cols))
                err = torch.where(P1[i], W1[i], 0.0) / d[i]
                W1[i:].addr_(U1[i, i:], err, alpha=-1.0)
                W1[i].masked_fill_(P1[i], 0.0)  # exactly zero, not a rounding residue
                Err1[i] = err
        if i2 < cols:
            Wt[i2:].addmm_(U[i1:i2, i2:].T, Err1, alpha=-1.0)  # the lazy update of the later columns
    return Wt.T.contiguous(), ~prune_t.T.contiguous()


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
    ) -> None:
        super().__init__(percdamp=percdamp, global_saliency=global_saliency, error_correction=error_correction)
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

    def solve(self, w: torch.Tensor, stats: LayerInputStats, count: int, structure: Structure, note=None):
        return sparsegpt_prune(w, stats.hessian, count, structure, self.blocksize, self.mask_blocksize, note)

