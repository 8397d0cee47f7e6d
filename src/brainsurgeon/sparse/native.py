"""The bitmask kernels of ``csrc/bitmask.c``: compiled on first use for this CPU, cached, loaded with ctypes.

Why a C kernel: a decoded token multiplies every pruned weight by one vector, and that product is
bound by the bytes read. The bitmask layout reads 4 bytes per kept weight plus 2 bits per position,
and AVX-512's expand-load (with AVX2: a masked load and a lane permutation) puts the packed values
back at their columns without a gather, so the product runs at the speed of its bytes. Numba cannot
emit the expand-load (measured on SmolLM2's 210 block linears at 70%, 1 thread: numba CSR 76 ms per
token against 28 ms for this kernel and 82-106 ms for dense torch). On a Zen 4 EPYC, 1 thread, the
same layers: AVX-512 10.5 ms, the AVX2 path 13.6 ms, the scalar loops 69 ms, dense torch 36 ms.

Build and cache: :mod:`brainsurgeon.cbuild` (``$CC`` with ``-O3 -march=native -fopenmp``, linked against
the OpenMP runtime torch already loaded, cached under ``~/.cache/brainsurgeon/kernels`` keyed by the
source, compiler, flags and CPU). Without a compiler the engine reports itself unavailable, with the
reason, and ``to_sparse`` does not offer it.
"""
from __future__ import annotations

import ctypes
from pathlib import Path

from .. import cbuild
from ..cbuild import cache_dir, openmp_runtime  # noqa: F401 (part of this module's interface)

SOURCE = Path(__file__).with_name("csrc") / "bitmask.c"
CFLAGS = list(cbuild.CFLAGS)

def _compiler() -> str | None:
    return cbuild.compiler()


def _build(cc: str, omp: str | None, target: Path) -> None:
    cbuild.build(SOURCE, cc, omp, target, CFLAGS)


def _prepare(lib: ctypes.CDLL) -> None:
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.bm_spmv.argtypes = [p, p, p, p, p, i64, i64, i32]
    lib.bm_spmm.argtypes = [p, p, p, p, p, i64, i64, i64, i32]
    lib.bm_spmv.restype = lib.bm_spmm.restype = None
    lib.bm_isa.restype = ctypes.c_int


KERNEL = cbuild.Kernel(SOURCE, _prepare, cflags=CFLAGS)


def load() -> ctypes.CDLL | None:
    """The compiled kernels (built now if not cached); None, with :func:`error` set, if they cannot be."""
    return KERNEL.lib()


def error() -> str | None:
    """Why :func:`load` returned None."""
    return KERNEL.why_not()


def isa() -> str:
    """"avx512" (expand-load), "avx2" (masked load + lane permutation) or "scalar": the path compiled."""
    lib = load()
    return {512: "avx512", 256: "avx2"}.get(lib.bm_isa() if lib is not None else 0, "scalar")
