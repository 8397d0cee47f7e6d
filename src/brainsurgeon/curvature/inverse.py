"""Inverses of damped outer-product curvatures, built without ever inverting a dense matrix.

Every curvature here has the form

    C = lam * I + (1/N) sum_i v_i v_i^T,

an average of rank-one terms (per-sample gradients or Gauss-Newton vectors, see
:mod:`brainsurgeon.curvature.per_sample`) plus damping. Its inverse is built by the recursion of
Hassibi & Stork (1993, eq. 8) and Singh & Alistarh (2020, WoodFisher, eq. 11), starting from
C_0^-1 = lam^-1 I and adding one term at a time (Sherman-Morrison):

    C_{k+1}^-1 = C_k^-1 - (C_k^-1 v v^T C_k^-1) / (N + v^T C_k^-1 v).

Adding r terms V (r x d) at once is the Woodbury identity, the same matrix as r successive
Sherman-Morrison steps:

    C^-1  <-  C^-1 - U (N I_r + V U)^-1 U^T,    U = C^-1 V^T.

We group the terms into rank-r updates because r rank-one steps each stream the whole inverse
through memory, while one rank-r step is a matrix product (BLAS-3); ``rank=1`` is literally the
Sherman-Morrison recursion. All matrices are batched: ``inv`` is (..., d, d), one inverse per block
(WoodFisher's block-diagonal Fisher) or a single (d, d) one (full OBS).
"""
from __future__ import annotations

from typing import Iterable

import torch

from ..context import Numerics


def init_inverse(damping: torch.Tensor, dim: int) -> torch.Tensor:
    """C_0^-1 = lam^-1 I for each block: ``damping`` is (nb,), the result (nb, dim, dim), float64."""
    lam = damping.to(torch.float64).reshape(-1)
    # one (nb, dim, dim) allocation: this is the largest array of woodfisher (1.8 GB for one
    # SmolLM2-135M block at block size 64), so no intermediate copy of it is made
    return torch.diag_embed((1.0 / lam).unsqueeze(1).expand(lam.numel(), dim).contiguous())


def triangular_inverse(chol: torch.Tensor) -> torch.Tensor:
    """L^-1 of batched lower-triangular factors."""
    eye = torch.eye(chol.shape[-1], dtype=chol.dtype, device=chol.device).expand_as(chol)
    return torch.linalg.solve_triangular(chol, eye, upper=False)


def woodbury_update_(inv: torch.Tensor, vectors: torch.Tensor, num_samples: int, rank: int = 64) -> torch.Tensor:
    """Add (1/num_samples) sum_k v_k v_k^T to the matrix whose inverse is ``inv``, in place.

    Args:
        inv: (nb, d, d) float64 inverses, updated in place (and returned).
        vectors: (nb, k, d) the k new rank-one terms of each block (rows).
        num_samples: N, the normaliser of the average.
        rank: how many terms one Woodbury step adds; 1 gives the Sherman-Morrison recursion.
    """
    vectors = vectors.to(inv.dtype)
    n = float(num_samples)
    for start in range(0, vectors.shape[-2], rank):
        v = vectors[..., start : start + rank, :]  # (..., r, d)
        u = inv @ v.transpose(-1, -2)  # (..., d, r) = C^-1 V^T
        inner = v @ u  # V C^-1 V^T, symmetric PSD
        inner = 0.5 * (inner + inner.transpose(-1, -2))
        inner.diagonal(dim1=-2, dim2=-1).add_(n)  # N I + V C^-1 V^T: eigenvalues >= N, so Cholesky is safe
        chol = torch.linalg.cholesky(inner)
        # C^-1 -= U inner^-1 U^T = (L^-1 U^T)^T (L^-1 U^T). L^-1 is formed (r x r, cheap) and applied
        # by a batched matmul: batched triangular solves with d right-hand sides are far slower on CPU.
        half = triangular_inverse(chol) @ u.transpose(-1, -2)  # (..., r, d)
        inv.baddbmm_(half.transpose(-1, -2), half, alpha=-1.0)
    return inv


def outer_product_inverse(
    chunks: Iterable[torch.Tensor],
    damping: torch.Tensor,
    dim: int,
    num_samples: int,
    to_blocks=lambda v: v.unsqueeze(0),
    rank: int = 64,
) -> torch.Tensor:
    """(lam_b I + (1/N) sum_i v_i v_i^T)^-1 per block b, built from a stream of vector chunks.

    ``to_blocks`` maps one chunk (k, n) to the per-block layout (nb, k, dim); by default the whole
    vector is one block. Returns (nb, dim, dim) float64.
    """
    inv = init_inverse(damping, dim)
    for v in chunks:
        woodbury_update_(inv, to_blocks(v), num_samples, rank)  # converted to float64 there
    # the recursion keeps symmetry only up to rounding; restore it once at the end, a group of
    # blocks at a time (a whole-array 0.5 (X + X^T) would double the peak memory)
    for lo in range(0, inv.shape[0], 1024):
        part = inv[lo : lo + 1024]
        part.copy_(0.5 * (part + part.transpose(-1, -2)))
    return inv


def solve_spd(matrix: torch.Tensor, rhs: torch.Tensor, numerics: Numerics, where: str) -> torch.Tensor:
    """Solve ``matrix @ x = rhs`` for a batch (nb, q, q) of symmetric positive (semi)definite matrices.

    Cholesky first. A block that is numerically singular (a joint OBS block [H^-1]_QQ of nearly
    dependent weights) falls back to the least-squares minimum-norm solution via the
    pseudo-inverse: finite, never NaN, and recorded in ``numerics``.
    """
    chol, info = torch.linalg.cholesky_ex(matrix)
    bad = info != 0
    if not bad.any():
        return _cholesky_apply(chol, rhs)
    out = torch.empty_like(rhs)
    good = ~bad
    if good.any():
        out[good] = _cholesky_apply(chol[good], rhs[good])
    out[bad] = torch.linalg.pinv(matrix[bad], hermitian=True) @ rhs[bad]
    numerics.fallback(where, f"{int(bad.sum())} singular joint block(s) solved by pseudo-inverse instead of Cholesky")
    return out


def _cholesky_apply(chol: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """(L L^T)^-1 rhs as L^-T (L^-1 rhs), by matmuls (see :func:`woodbury_update_` on why)."""
    linv = triangular_inverse(chol)
    return linv.transpose(-1, -2) @ (linv @ rhs)
