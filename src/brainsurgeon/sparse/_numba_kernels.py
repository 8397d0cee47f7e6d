"""Numba CSR kernels (imported lazily: compiling, or loading from the on-disk cache, takes a moment).

Rows are split into ``nchunks`` contiguous blocks, one per thread (``prange``); the ``*_serial``
twins run the same loops without a thread pool, which wins for small layers and on a busy CPU
where waking a second thread costs more than it saves. ``to_sparse`` times both.
"""
import numpy as np
from numba import njit, prange

# Lanes of the partial sums in SpMV: 16 float32 fill one AVX-512 register (two AVX2 ones), so the
# compiler turns the inner loop into a vector gather + FMA instead of a latency-bound scalar chain.
LANES = 16


def _spmv_rows(indptr, indices, values, x, y, start, stop):  # pragma: no cover - compiled
    acc = np.zeros(LANES, np.float32)
    for i in range(start, stop):
        acc[:] = 0.0
        k, end = indptr[i], indptr[i + 1]
        while k + LANES <= end:
            for j in range(LANES):
                acc[j] += values[k + j] * x[indices[k + j]]
            k += LANES
        tail = np.float32(0.0)
        while k < end:
            tail += values[k] * x[indices[k]]
            k += 1
        y[i] = acc.sum() + tail


def _spmm_rows(indptr, indices, values, xt, yt, start, stop):  # pragma: no cover - compiled
    n = xt.shape[1]
    for i in range(start, stop):
        row = yt[i]
        row[:] = 0.0
        for k in range(indptr[i], indptr[i + 1]):
            v = values[k]
            src = xt[indices[k]]
            for j in range(n):  # contiguous in both: vectorised
                row[j] += v * src[j]


spmv_rows = njit(fastmath=True, cache=True, nogil=True)(_spmv_rows)
spmm_rows = njit(fastmath=True, cache=True, nogil=True)(_spmm_rows)


@njit(parallel=True, cache=True, nogil=True)
def spmv(indptr, indices, values, x, y, nchunks):  # pragma: no cover - compiled
    rows = indptr.shape[0] - 1
    for c in prange(nchunks):
        spmv_rows(indptr, indices, values, x, y, c * rows // nchunks, (c + 1) * rows // nchunks)


@njit(parallel=True, cache=True, nogil=True)
def spmm(indptr, indices, values, xt, yt, nchunks):  # pragma: no cover - compiled
    rows = indptr.shape[0] - 1
    for c in prange(nchunks):
        spmm_rows(indptr, indices, values, xt, yt, c * rows // nchunks, (c + 1) * rows // nchunks)
