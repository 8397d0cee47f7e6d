"""Numba CSR and packed N:M kernels (imported lazily: compiling, or loading from the on-disk cache, takes a moment).

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


# ----------------------------------------------------------------------------- packed N:M
# A row of an N:M weight (N, M powers of two) is stored as exactly N values per group of M inputs and
# each value's offset in its group (uint8): value k of a row sits in column (k >> log2 N) << log2 M
# plus its offset. No row pointers (every row holds in/M*N values) and one byte of index per value
# instead of CSR's two: 5 bytes per kept float32 weight.
def _nm_spmv_rows(values, offsets, x, y, shift_n, shift_m, start, stop):  # pragma: no cover - compiled
    per_row = values.shape[1]
    acc = np.zeros(LANES, np.float32)
    for i in range(start, stop):
        acc[:] = 0.0
        v, o = values[i], offsets[i]
        k = 0
        while k + LANES <= per_row:
            for j in range(LANES):
                acc[j] += v[k + j] * x[(((k + j) >> shift_n) << shift_m) + o[k + j]]
            k += LANES
        tail = np.float32(0.0)
        while k < per_row:
            tail += v[k] * x[((k >> shift_n) << shift_m) + o[k]]
            k += 1
        y[i] = acc.sum() + tail


def _nm_spmm_rows(values, offsets, xt, yt, shift_n, shift_m, start, stop):  # pragma: no cover - compiled
    n = xt.shape[1]
    per_row = values.shape[1]
    for i in range(start, stop):
        row = yt[i]
        row[:] = 0.0
        for k in range(per_row):
            v = values[i, k]
            src = xt[((k >> shift_n) << shift_m) + offsets[i, k]]
            for j in range(n):
                row[j] += v * src[j]


nm_spmv_rows = njit(fastmath=True, cache=True, nogil=True)(_nm_spmv_rows)
nm_spmm_rows = njit(fastmath=True, cache=True, nogil=True)(_nm_spmm_rows)


@njit(parallel=True, cache=True, nogil=True)
def nm_spmv(values, offsets, x, y, shift_n, shift_m, nchunks):  # pragma: no cover - compiled
    rows = values.shape[0]
    for c in prange(nchunks):
        nm_spmv_rows(values, offsets, x, y, shift_n, shift_m, c * rows // nchunks, (c + 1) * rows // nchunks)


@njit(parallel=True, cache=True, nogil=True)
def nm_spmm(values, offsets, xt, yt, shift_n, shift_m, nchunks):  # pragma: no cover - compiled
    rows = values.shape[0]
    for c in prange(nchunks):
        nm_spmm_rows(values, offsets, xt, yt, shift_n, shift_m, c * rows // nchunks, (c + 1) * rows // nchunks)
