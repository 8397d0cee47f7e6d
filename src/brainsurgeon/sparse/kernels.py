"""Sparse matrix products on CPU, one ``Engine`` per implementation (ALGORITHMS.md section 1, step 5).

Every engine computes ``Y^T = W X^T`` for a pruned weight ``W`` (out x in, given as CSR) and a
block of inputs stored transposed, ``X^T`` (in x n): a sparse matrix times a dense one, the form
every sparse BLAS offers. ``to_sparse`` times them on each layer and keeps the fastest.

* ``torch_csr`` / ``torch_bsr``: torch's sparse CSR and block-sparse (BSR) tensors.
* ``mkl``: Intel MKL's sparse BLAS through ``sparse_dot_mkl`` (needs the ``mkl`` runtime).
* ``numba_csr``: our own kernel. Why it wins at batch 1: a sparse matrix-vector product is bound by
  the bytes read per non-zero; torch's generic CSR reads int64 indices (12 bytes per non-zero with
  float32 values). Ours reads uint16 column indices when the layer has <= 65536 inputs (6 bytes per
  non-zero), runs the rows in parallel, and lets the compiler vectorise the gather (fastmath
  re-association; the sum order differs from dense, within float32 rounding). With n > 1 it walks
  each row's non-zeros once and updates a whole contiguous row of ``Y^T`` per non-zero (SpMM), so
  ``X^T``'s rows are streamed, not gathered element by element.
"""
from __future__ import annotations

import glob
import os
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import BrainsurgeonError


@dataclass
class CSR:
    """A pruned weight as canonical CSR arrays (int64 row pointers, int32 columns, float32 values)."""

    indptr: torch.Tensor
    indices: torch.Tensor
    values: torch.Tensor
    shape: tuple[int, int]

    @classmethod
    def from_dense(cls, w: torch.Tensor) -> "CSR":
        w = w.detach().reshape(w.shape[0], -1).to(torch.float32).cpu()
        nz = w != 0
        indptr = torch.zeros(w.shape[0] + 1, dtype=torch.int64)
        indptr[1:] = torch.cumsum(nz.sum(1), 0)
        return cls(indptr, nz.nonzero()[:, 1].to(torch.int32).contiguous(), w[nz].contiguous(), tuple(w.shape))

    def to_dense(self) -> torch.Tensor:
        out = torch.zeros(self.shape, dtype=self.values.dtype)
        rows = torch.repeat_interleave(torch.arange(self.shape[0]), self.indptr[1:] - self.indptr[:-1])
        out[rows, self.indices.long()] = self.values
        return out

    @property
    def nnz(self) -> int:
        return int(self.values.numel())

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nnz / max(self.shape[0] * self.shape[1], 1)


class Engine:
    """A way to compute ``W @ X^T``: ``prepare`` once per layer, ``apply`` per call."""

    name = "engine"

    def available(self) -> str | None:
        """None if usable here, else why not."""
        return None

    def supports(self, csr: CSR) -> str | None:
        """None if this layer can use the engine, else why not."""
        return None

    def prepare(self, csr: CSR) -> Any:
        raise NotImplementedError  # abstract: every engine implements it

    def apply(self, state: Any, xt: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError  # abstract: every engine implements it


class DenseEngine(Engine):
    """The dense product (the baseline every sparse engine must beat)."""

    name = "dense"

    def prepare(self, csr: CSR):
        return csr.to_dense()

    def apply(self, state, xt):
        return state @ xt


class TorchCSREngine(Engine):
    name = "torch_csr"

    def prepare(self, csr: CSR):
        import warnings

        with warnings.catch_warnings():  # torch flags sparse CSR as beta on every construction
            warnings.simplefilter("ignore")
            return torch.sparse_csr_tensor(csr.indptr, csr.indices.long(), csr.values, csr.shape,
                                           check_invariants=False)

    def apply(self, state, xt):
        return state @ xt


class TorchBSREngine(Engine):
    """Block-sparse rows: dense blocks are faster to multiply, but every block with one survivor is stored whole."""

    name = "torch_bsr"
    BLOCKS = ((16, 16), (8, 8), (4, 4), (2, 2))

    def _block(self, csr: CSR):
        return next((b for b in self.BLOCKS if csr.shape[0] % b[0] == 0 and csr.shape[1] % b[1] == 0), None)

    def supports(self, csr):
        return None if self._block(csr) else f"no block size of {self.BLOCKS} divides {csr.shape}"

    def prepare(self, csr: CSR):
        import warnings

        with warnings.catch_warnings():  # torch flags BSR as beta on every construction
            warnings.simplefilter("ignore")
            return csr.to_dense().to_sparse_bsr(self._block(csr))

    def apply(self, state, xt):
        return state @ xt


_MKL_ERROR: str | None = None


def _load_mkl():
    """Import sparse_dot_mkl, pointing it at the pip ``mkl`` runtime if that is where libmkl_rt lives."""
    global _MKL_ERROR
    if "MKL_RT" not in os.environ:
        found = sorted(glob.glob(os.path.join(sys.prefix, "lib", "libmkl_rt.so*")))
        if found:
            os.environ["MKL_RT"] = found[0]
    # torch already runs GNU OpenMP in this process; a second (Intel) OpenMP runtime would fight it
    os.environ.setdefault("MKL_THREADING_LAYER", "GNU")
    try:
        import sparse_dot_mkl

        return sparse_dot_mkl
    except (ImportError, OSError) as e:
        _MKL_ERROR = f"sparse_dot_mkl unusable: {str(e).splitlines()[-1][:160]} (pip install sparse-dot-mkl mkl)"
        return None


class MKLEngine(Engine):
    name = "mkl"

    def available(self):
        return None if _load_mkl() is not None else _MKL_ERROR

    def prepare(self, csr: CSR):
        import scipy.sparse as sp

        return sp.csr_matrix((csr.values.numpy(), csr.indices.numpy(), csr.indptr.to(torch.int32).numpy()),
                             shape=csr.shape)

    def apply(self, state, xt):
        out = _load_mkl().dot_product_mkl(state, xt.numpy())
        return torch.from_numpy(np.ascontiguousarray(out))


# ----------------------------------------------------------------------------- our numba kernel
@dataclass
class NumbaCSR:
    indptr: np.ndarray
    indices: np.ndarray
    values: np.ndarray
    rows: int


class NumbaCSREngine(Engine):
    """CSR with the narrowest column index (uint16 up to 65536 inputs) and float32 values.

    ``threads=None`` splits the rows over numba's threads (as many as torch uses); ``threads=1`` is
    the serial twin, registered separately so that ``to_sparse`` can time both.
    """

    def __init__(self, name: str, threads: int | None):
        self.name, self.threads = name, threads

    def available(self):
        try:
            import numba  # noqa: F401
        except ImportError:
            return "numba is not installed (pip install numba)"
        return None

    def prepare(self, csr: CSR):
        from . import _numba_kernels  # noqa: F401  (compile or load the cache now, not on the first call)

        idx_dtype = np.uint16 if csr.shape[1] <= 65536 else np.int32
        ptr_dtype = np.int32 if csr.nnz < 2**31 else np.int64
        return NumbaCSR(csr.indptr.numpy().astype(ptr_dtype), csr.indices.numpy().astype(idx_dtype),
                        csr.values.numpy().astype(np.float32), csr.shape[0])

    def _chunks(self) -> int:
        import numba

        if self.threads is not None:
            return self.threads
        n = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
        numba.set_num_threads(n)
        return n

    def apply(self, state: NumbaCSR, xt):
        from . import _numba_kernels as k

        xt_np = xt.contiguous().numpy()
        n, chunks = xt_np.shape[1], self._chunks()
        if n == 1:
            y = np.empty(state.rows, dtype=np.float32)
            if chunks == 1:
                k.spmv_rows(state.indptr, state.indices, state.values, xt_np.reshape(-1), y, 0, state.rows)
            else:
                k.spmv(state.indptr, state.indices, state.values, xt_np.reshape(-1), y, chunks)
            return torch.from_numpy(y).reshape(-1, 1)
        yt = np.empty((state.rows, n), dtype=np.float32)
        if chunks == 1:
            k.spmm_rows(state.indptr, state.indices, state.values, xt_np, yt, 0, state.rows)
        else:
            k.spmm(state.indptr, state.indices, state.values, xt_np, yt, chunks)
        return torch.from_numpy(yt)


ENGINES: dict[str, Engine] = {e.name: e for e in (
    DenseEngine(), TorchCSREngine(), TorchBSREngine(), MKLEngine(),
    NumbaCSREngine("numba_csr", None), NumbaCSREngine("numba_csr_serial", 1))}
SPARSE_ENGINES = ("numba_csr", "numba_csr_serial", "mkl", "torch_csr", "torch_bsr")


def get_engine(name: str) -> Engine:
    if name not in ENGINES:
        raise BrainsurgeonError(f"unknown sparse engine {name!r}; choose one of {sorted(ENGINES)}")
    return ENGINES[name]


def available_engines(names=SPARSE_ENGINES) -> dict[str, str | None]:
    """Each engine's unavailability reason (None = usable here)."""
    return {n: get_engine(n).available() for n in names}
