"""The bitmask kernels of ``csrc/bitmask.c``: compiled on first use for this CPU, cached, loaded with ctypes.

Why a C kernel: a decoded token multiplies every pruned weight by one vector, and that product is
bound by the bytes read. The bitmask layout reads 4 bytes per kept weight plus 2 bits per position,
and AVX-512's expand-load puts the packed values back at their columns without a gather, so the
product runs at the speed of its bytes. Numba cannot emit the expand-load (measured on SmolLM2's
210 block linears at 70%, 1 thread: numba CSR 76 ms per token against 28 ms for this kernel and
82-106 ms for dense torch).

Build: ``$CC`` (default ``cc``) with ``-O3 -march=native -fopenmp``, linked against the OpenMP
runtime torch already loaded, so that the kernels' threads are torch's threads (two runtimes in one
process spin against each other). The library is cached under
``$BRAINSURGEON_CACHE`` (default ``$XDG_CACHE_HOME/brainsurgeon`` or ``~/.cache/brainsurgeon``)
``/kernels``, keyed by the source, the compiler, the flags and the CPU's feature flags; it is built
in a temporary directory and renamed into place. Without a compiler the engine reports itself
unavailable, with the reason, and ``to_sparse`` does not offer it.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

SOURCE = Path(__file__).with_name("csrc") / "bitmask.c"
CFLAGS = ["-O3", "-march=native", "-fPIC", "-std=gnu11"]

_LIB: ctypes.CDLL | None = None
_ERROR: str | None = None


def cache_dir() -> Path:
    root = os.environ.get("BRAINSURGEON_CACHE")
    if root:
        return Path(root) / "kernels"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "brainsurgeon" / "kernels"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def openmp_runtime() -> str | None:
    """The OpenMP library torch loaded (libgomp / libiomp5 / libomp), as a path; None if none."""
    import torch  # its OpenMP runtime is the one to share

    try:
        maps = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return None
    found = []
    for line in maps:
        path = line.split()[-1] if len(line.split()) >= 6 else ""
        name = os.path.basename(path)
        if name.startswith(("libgomp", "libiomp5", "libomp")) and ".so" in name and path not in found:
            found.append(path)
    # other wheels bring their own copies (scikit-learn's libgomp-<hash>): torch's is the one to share
    torch_dir = os.path.dirname(os.path.realpath(torch.__file__))
    ours = [p for p in found if os.path.realpath(p).startswith(torch_dir + os.sep)]
    return (ours or found or [None])[0]


def _compiler() -> str | None:
    cc = os.environ.get("CC", "cc")
    return shutil.which(cc)


def _build(cc: str, omp: str | None, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        obj, lib = Path(tmp) / "bitmask.o", Path(tmp) / target.name
        compile_cmd = [cc, *CFLAGS, *(["-fopenmp"] if omp else []), "-c", str(SOURCE), "-o", str(obj)]
        link_cmd = [cc, "-shared", str(obj), "-o", str(lib)]
        if omp:  # the runtime torch uses, by path: its soname is then the one already in the process
            link_cmd += [omp, f"-Wl,-rpath,{os.path.dirname(omp)}"]
        for cmd in (compile_cmd, link_cmd):
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                first = next((ln for ln in proc.stderr.splitlines() if "error" in ln), proc.stderr.strip()[:200])
                raise OSError(f"{os.path.basename(cmd[0])} failed: {first.strip()[:240]}")
        os.replace(lib, target)


def _key(cc: str, omp: str | None) -> str:
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    h = hashlib.sha256()
    for part in (SOURCE.read_bytes(), repr(version).encode(), repr(CFLAGS).encode(), repr(omp).encode(),
                 _cpu_flags().encode()):
        h.update(part)
    return h.hexdigest()[:20]


def load() -> ctypes.CDLL | None:
    """The compiled kernels (built now if not cached); None, with :func:`error` set, if they cannot be."""
    global _LIB, _ERROR
    if _LIB is not None or _ERROR is not None:
        return _LIB
    cc = _compiler()
    if cc is None:
        _ERROR = f"no C compiler ({os.environ.get('CC', 'cc')} not found): install gcc or set CC"
        return None
    omp = openmp_runtime()
    target = cache_dir() / f"bitmask-{_key(cc, omp)}.so"
    try:
        if not target.exists():
            _build(cc, omp, target)
        lib = ctypes.CDLL(str(target))
    except OSError as e:
        _ERROR = f"the bitmask kernels did not build: {e}"
        return None
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.bm_spmv.argtypes = [p, p, p, p, p, i64, i64, i32]
    lib.bm_spmm.argtypes = [p, p, p, p, p, i64, i64, i64, i32]
    lib.bm_spmv.restype = lib.bm_spmm.restype = None
    lib.bm_isa.restype = ctypes.c_int
    _LIB = lib
    return lib


def error() -> str | None:
    """Why :func:`load` returned None (after it was called)."""
    return _ERROR


def isa() -> str:
    """"avx512" when the expand-load path was compiled, else "scalar"."""
    lib = load()
    return "avx512" if lib is not None and lib.bm_isa() == 512 else "scalar"
