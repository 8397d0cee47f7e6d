"""SparseGPT's column sweep inside a block, compiled (``csrc/sweep.c``).

Why a C kernel: the sweep is sequential over columns (each column's error depends on every earlier
column's), so torch runs it as two small kernels per column from a Python loop: about 25 us per
column, 4 s of a sparsegpt call on SmolLM2-135M (150,000 columns) whatever the number of
calibration tokens, and more at N:M, where the mask of every group of M columns is chosen inside
the loop. The kernel does the same arithmetic (left-looking: w_j -= sum_{i<j} U_ij err_i, then
err_j = w_j p_j / U_jj) in one pass per column. Sums are formed in another order than torch's
matrix-vector product, so results agree to rounding, not bit for bit.

Used where a C compiler builds it (``cbuild``); elsewhere :func:`why_not` says why and the torch
loop runs.
"""
from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from .. import cbuild

SOURCE = Path(__file__).with_name("csrc") / "sweep.c"
SUFFIX = {torch.float32: "f32", torch.float64: "f64"}
MAX_M = 16  # sweep.c holds one group's scores in a stack array of 16


def _prepare(lib: ctypes.CDLL) -> None:
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    for suf in SUFFIX.values():
        getattr(lib, f"sweep_columns_{suf}").argtypes = [p, p, p, p, i64, i64, i64, i64]
        getattr(lib, f"sweep_nm_{suf}").argtypes = [p, p, p, p, p, i64, i64, i64, i64]


KERNEL = cbuild.Kernel(SOURCE, _prepare)


def available() -> bool:
    return KERNEL.available()


def why_not() -> str | None:
    """Why the kernel is not used here (None when it is)."""
    return KERNEL.why_not()


def applies(*tensors: torch.Tensor) -> bool:
    """The kernel runs on these: built here, CPU, contiguous, one dtype it has (float32/float64)."""
    first = tensors[0]
    return (first.dtype in SUFFIX and available()
            and all(t.device.type == "cpu" and t.is_contiguous() and t.dtype == first.dtype for t in tensors))


def fits_nm(n: int, m: int) -> bool:
    """Whether :func:`sweep_nm` takes a block of ``n`` columns at N:``m`` (groups of at most 16,
    whole groups only)."""
    return m <= MAX_M and n % m == 0


def sweep_columns(W1: torch.Tensor, err: torch.Tensor, Ut: torch.Tensor, scale: torch.Tensor,
                  w0: int, w1: int) -> None:
    """Columns [w0, w1) of the block in place: W1, err (n x R), Ut (n x n), scale (w1 - w0, R)."""
    n, R = W1.shape
    if err.shape != (n, R) or Ut.shape != (n, n) or scale.shape != (w1 - w0, R) or not 0 <= w0 <= w1 <= n:
        raise ValueError("sweep_columns: shapes do not match the block")
    if not applies(W1, err, Ut, scale):  # raw pointers: anything else would be read out of bounds
        raise ValueError("sweep_columns: needs contiguous CPU tensors of one dtype (float32/float64) and the kernel")
    fn = getattr(KERNEL.lib(), f"sweep_columns_{SUFFIX[W1.dtype]}")
    fn(W1.data_ptr(), err.data_ptr(), Ut.data_ptr(), scale.data_ptr(), n, R, w0, w1)


def sweep_nm(W1: torch.Tensor, err: torch.Tensor, Ut: torch.Tensor, dinv: torch.Tensor, P1: torch.Tensor,
             keep: int, m: int) -> None:
    """The whole block at ``keep``:``m`` (m <= 16, m divides the block's columns); writes P1 (bool)."""
    n, R = W1.shape
    if (err.shape != (n, R) or Ut.shape != (n, n) or dinv.shape != (n,) or P1.shape != (n, R)
            or P1.dtype != torch.bool or not P1.is_contiguous() or not 0 < keep < m or not fits_nm(n, m)):
        raise ValueError("sweep_nm: shapes or pattern do not match the block")
    if not applies(W1, err, Ut, dinv) or P1.device.type != "cpu":
        raise ValueError("sweep_nm: needs contiguous CPU tensors of one dtype (float32/float64) and the kernel")
    fn = getattr(KERNEL.lib(), f"sweep_nm_{SUFFIX[W1.dtype]}")
    fn(W1.data_ptr(), err.data_ptr(), Ut.data_ptr(), dinv.data_ptr(), P1.data_ptr(), n, R, keep, m)
