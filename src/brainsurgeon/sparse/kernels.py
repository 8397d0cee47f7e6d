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

    def vector_fn(self, state: Any):
        """A fast path for one input row: ``x`` (in,) contiguous float32 -> ``W @ x`` (out,); None if none."""
        return None

    #: True for engines whose states of layers with the same input width can be stacked by rows and
    #: sliced back without copies (they then provide ``stack(states)`` and ``row_slice(state, start,
    #: stop)``): what a decode group needs
    stackable = False


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
        want = torch.get_num_threads()
        n = max(1, min(want, numba.config.NUMBA_NUM_THREADS))
        if numba.get_num_threads() != n:
            numba.set_num_threads(n)
        if torch.get_num_threads() != want:
            # numba's OpenMP layer, when it starts, resets the OpenMP thread count torch shares with it
            torch.set_num_threads(want)
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


def nm_pattern_of(csr: CSR, group_sizes=(4, 8, 16)) -> tuple[int, int] | None:
    """``(N, M)``, both powers of two with N <= M / 2, if every group of M inputs holds at most N non-zeros."""
    if csr.nnz == 0:
        return None
    nz = csr.to_dense() != 0
    for m in group_sizes:
        if csr.shape[1] % m:
            continue
        n = int(nz.reshape(csr.shape[0], -1, m).sum(-1).max())
        n = 1 << max(n - 1, 0).bit_length()  # round up to a power of two (the kernel shifts instead of dividing)
        if n <= m // 2:
            return n, m
    return None


@dataclass
class NumbaNM:
    values: np.ndarray  # (rows, in / M * N) float32
    offsets: np.ndarray  # (rows, in / M * N) uint8: each value's offset in its group of M
    shift_n: int
    shift_m: int
    rows: int


class NumbaNMEngine(NumbaCSREngine):
    """Packed N:M (2:4, 4:8, ...): N values and N one-byte offsets per group of M inputs, no row pointers.

    5 bytes per kept float32 weight against CSR's 6 (uint16 columns) and no row-pointer reads; the
    column of value k is computed with two shifts. Threads as :class:`NumbaCSREngine`.
    """

    def supports(self, csr: CSR):
        return None if nm_pattern_of(csr) else "not an N:M pattern (N, M powers of two, N <= M/2)"

    def prepare(self, csr: CSR):
        from . import _numba_kernels  # noqa: F401  (compile or load the cache now)

        n, m = nm_pattern_of(csr)
        groups = csr.to_dense().reshape(csr.shape[0], -1, m)
        # stable sort puts each group's non-zeros first in column order; zeros pad the group up to N
        order = torch.argsort((groups == 0).to(torch.int8), dim=-1, stable=True)[..., :n]
        values = torch.gather(groups, -1, order).reshape(csr.shape[0], -1)
        return NumbaNM(np.ascontiguousarray(values.numpy(), dtype=np.float32),
                       np.ascontiguousarray(order.reshape(csr.shape[0], -1).numpy().astype(np.uint8)),
                       n.bit_length() - 1, m.bit_length() - 1, csr.shape[0])

    def apply(self, state: NumbaNM, xt):
        from . import _numba_kernels as k

        xt_np = xt.contiguous().numpy()
        n, chunks = xt_np.shape[1], self._chunks()
        args = (state.shift_n, state.shift_m)
        if n == 1:
            y = np.empty(state.rows, dtype=np.float32)
            if chunks == 1:
                k.nm_spmv_rows(state.values, state.offsets, xt_np.reshape(-1), y, *args, 0, state.rows)
            else:
                k.nm_spmv(state.values, state.offsets, xt_np.reshape(-1), y, *args, chunks)
            return torch.from_numpy(y).reshape(-1, 1)
        yt = np.empty((state.rows, n), dtype=np.float32)
        if chunks == 1:
            k.nm_spmm_rows(state.values, state.offsets, xt_np, yt, *args, 0, state.rows)
        else:
            k.nm_spmm(state.values, state.offsets, xt_np, yt, *args, chunks)
        return torch.from_numpy(yt)


# ----------------------------------------------------------------------------- our C bitmask kernel
@dataclass
class Bitmask:
    """A weight in the bitmask layout of ``csrc/bitmask.c`` (arrays kept alive; their addresses cached)."""

    rowptr: np.ndarray  # int64 (rows + 1)
    masks: np.ndarray  # uint16 (rows, nchunks)
    values: np.ndarray  # float32 (nnz,)
    rows: int
    nchunks: int

    def __post_init__(self):
        # the arrays live as long as this object: their addresses are read once, not per product
        self.pointers = (self.rowptr.ctypes.data, self.masks.ctypes.data, self.values.ctypes.data)

    def rows_view(self, start: int, stop: int) -> "Bitmask":
        """Rows ``start:stop`` without a copy: ``rowptr`` holds offsets into the whole ``values``."""
        return Bitmask(self.rowptr[start: stop + 1], self.masks[start:stop], self.values, stop - start, self.nchunks)


def stack_bitmasks(parts: list[Bitmask]) -> Bitmask:
    """One matrix of the rows of ``parts`` in order (same ``nchunks``): their products in one call."""
    if len({p.nchunks for p in parts}) != 1:
        raise ValueError("stacked bitmask weights need the same number of columns")
    rowptrs, base = [np.zeros(1, dtype=np.int64)], 0
    for p in parts:  # each part's offsets, shifted past the values of the parts before it
        rowptrs.append(p.rowptr[1:] - p.rowptr[0] + base)
        base += int(p.rowptr[-1] - p.rowptr[0])
    values = np.concatenate([p.values[p.rowptr[0]: p.rowptr[-1]] for p in parts])
    return Bitmask(np.concatenate(rowptrs), np.ascontiguousarray(np.concatenate([p.masks for p in parts])),
                   np.ascontiguousarray(values, dtype=np.float32), sum(p.rows for p in parts), parts[0].nchunks)


def bitmask_from_csr(csr: CSR) -> Bitmask:
    """16-column chunks, one uint16 of presence bits each; values in row-major, column-ascending order."""
    rows, cols = csr.shape
    nchunks = max(1, -(-cols // 16))
    counts = csr.indptr[1:] - csr.indptr[:-1]
    row_of = torch.repeat_interleave(torch.arange(rows), counts)
    col = csr.indices.long()
    order = torch.argsort(row_of * cols + col, stable=True)  # CSR need not list a row's columns in order
    row_of, col, values = row_of[order], col[order], csr.values[order]
    bits = torch.zeros(rows * nchunks, dtype=torch.int32)
    bits.index_add_(0, row_of * nchunks + col // 16, torch.ones_like(col, dtype=torch.int32) << (col % 16).int())
    return Bitmask(csr.indptr.numpy().astype(np.int64), np.ascontiguousarray(bits.numpy().astype(np.uint16)
                   .reshape(rows, nchunks)), np.ascontiguousarray(values.numpy(), dtype=np.float32), rows, nchunks)


class BitmaskEngine(Engine):
    """Bitmask layout + AVX-512 expand-load (C, :mod:`.native`): no per-value index, no gather.

    Decode (one input row) is a matrix-vector product bound by bytes: 4 per kept weight plus 2 bits
    per position. Prefill walks the non-zeros and updates 128 tokens per register tile. ``threads=None``
    uses torch's thread count (OpenMP, torch's runtime); ``threads=1`` is the serial twin, timed separately.
    """

    def __init__(self, name: str, threads: int | None):
        self.name, self.threads = name, threads

    def available(self):
        from . import native

        return None if native.load() is not None else native.error()

    def prepare(self, csr: CSR) -> Bitmask:
        return bitmask_from_csr(csr)

    stackable = True

    def stack(self, states: list[Bitmask]) -> Bitmask:
        return stack_bitmasks(states)

    def row_slice(self, state: Bitmask, start: int, stop: int) -> Bitmask:
        return state.rows_view(start, stop)

    def apply(self, state: Bitmask, xt):
        from . import native

        n = xt.shape[1]
        if n == 1:
            return self.vector_fn(state)(xt.reshape(-1).contiguous()).reshape(-1, 1)
        xt, yt = xt.contiguous(), torch.empty(state.rows, n)
        native.load().bm_spmm(*state.pointers, xt.data_ptr(), yt.data_ptr(), state.rows, state.nchunks, n,
                              self.threads or torch.get_num_threads())
        return yt

    def vector_fn(self, state: Bitmask):
        # A decoded token calls every layer once: at ~20 us of Python per call through apply(), the
        # overhead alone was a third of a 70%-sparse SmolLM2 token. This closure is the whole path.
        from . import native

        spmv, (rowptr, masks, values) = native.load().bm_spmv, state.pointers
        rows, nchunks, fixed = state.rows, state.nchunks, self.threads

        def product(x: torch.Tensor, _keep=state) -> torch.Tensor:  # the arrays live as long as the closure
            y = torch.empty(rows)
            spmv(rowptr, masks, values, x.data_ptr(), y.data_ptr(), rows, nchunks, fixed or torch.get_num_threads())
            return y

        return product


class CudaSemiStructuredEngine(Engine):
    """2:4 on an NVIDIA GPU: ``torch.sparse.to_sparse_semi_structured`` (sparse tensor cores, Ampere+).

    The weight moves to the GPU as a compressed 2:4 tensor; inputs must already be there (the model
    runs on CUDA). Not measured by this project's benchmarks: no GPU is available to them.
    """

    name = "cuda_2to4"

    def available(self):
        if not torch.cuda.is_available():
            return "no CUDA device (torch.cuda.is_available() is False)"
        if torch.cuda.get_device_capability() < (8, 0):
            return "2:4 sparse tensor cores need compute capability 8.0 (Ampere) or newer"
        return None

    def supports(self, csr: CSR):
        if nm_pattern_of(csr, (4,)) not in ((2, 4), (1, 4)):
            return "not a 2:4 pattern"
        if csr.shape[0] % 64 or csr.shape[1] % 64:
            return f"shape {csr.shape} is not a multiple of 64 (the semi-structured kernels' tile)"
        return None

    def prepare(self, csr: CSR):
        from torch.sparse import to_sparse_semi_structured

        return to_sparse_semi_structured(csr.to_dense().to("cuda"))

    def apply(self, state, xt):
        n = xt.shape[1]
        pad = (-n) % 16  # the dense operand's columns: a multiple of the kernel's tile
        xt = torch.nn.functional.pad(xt.to(state.device), (0, pad)) if pad else xt.to(state.device)
        return (state @ xt)[:, :n]


ENGINES: dict[str, Engine] = {e.name: e for e in (
    DenseEngine(), TorchCSREngine(), TorchBSREngine(), MKLEngine(),
    BitmaskEngine("bitmask", None), BitmaskEngine("bitmask_serial", 1),
    NumbaCSREngine("numba_csr", None), NumbaCSREngine("numba_csr_serial", 1),
    NumbaNMEngine("numba_nm", None), NumbaNMEngine("numba_nm_serial", 1), CudaSemiStructuredEngine())}
# The engines to_sparse times by default. numba's parallel engines (numba_csr, numba_nm) are left out:
# numba's OpenMP pool (omppool) links the system's libgomp by file name, so it is a second runtime
# beside torch's, and each pool's threads spin after their work while the other's run. Measured at 2
# threads: 60 dense 1536x576 products interleaved with 60 numba products took 95-100 ms, with 60
# bitmask products (torch's runtime) 44 ms. They stay usable by name (engines=, engine=).
SPARSE_ENGINES = ("bitmask", "bitmask_serial", "numba_csr_serial", "numba_nm_serial", "mkl", "torch_csr", "torch_bsr",
                  "cuda_2to4")


def get_engine(name: str) -> Engine:
    if name not in ENGINES:
        raise BrainsurgeonError(f"unknown sparse engine {name!r}; choose one of {sorted(ENGINES)}")
    return ENGINES[name]


def available_engines(names=SPARSE_ENGINES) -> dict[str, str | None]:
    """Each engine's unavailability reason (None = usable here)."""
    return {n: get_engine(n).available() for n in names}
