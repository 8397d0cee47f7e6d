"""Compile one of brainsurgeon's own C sources for this CPU, cache the library, load it with ctypes.

Used by the bitmask kernels (``sparse/native.py``), the AMX Gram kernel
(``curvature/gram_kernel.py``) and SparseGPT's column sweep (``pruners/sweep_kernel.py``). Only the
sources shipped inside the package are built: the path is the caller's constant, never read from a
file or a model.

Build: ``$CC`` (default ``cc``) with ``-O3 -march=native`` and ``-fopenmp``, linked against the
OpenMP runtime torch already loaded, so that the kernels' threads are torch's threads (two runtimes
in one process spin against each other). Libraries are cached under ``$BRAINSURGEON_CACHE`` (default
``$XDG_CACHE_HOME/brainsurgeon`` or ``~/.cache/brainsurgeon``) ``/kernels``, keyed by the source, the
compiler, the flags, the runtime and the CPU's feature flags; each is built in a temporary directory
and renamed into place, so a concurrent or interrupted build never leaves a partial library.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Callable

#: the flags of every build (a caller may pass others, e.g. a portable build in the tests)
CFLAGS = ["-O3", "-march=native", "-fPIC", "-std=gnu11"]


def cache_dir() -> Path:
    root = os.environ.get("BRAINSURGEON_CACHE")
    if root:
        return Path(root) / "kernels"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "brainsurgeon" / "kernels"


def cpu_flags() -> str:
    """The CPU's feature flags (``/proc/cpuinfo``), or the platform's processor name elsewhere."""
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


def compiler() -> str | None:
    return shutil.which(os.environ.get("CC", "cc"))


def build(source: Path, cc: str, omp: str | None, target: Path, cflags: list[str]) -> None:
    """Compile ``source`` into the shared library ``target`` (temporary directory, then rename)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        obj, lib = Path(tmp) / (source.stem + ".o"), Path(tmp) / target.name
        compile_cmd = [cc, *cflags, *(["-fopenmp"] if omp else []), "-c", str(source), "-o", str(obj)]
        link_cmd = [cc, "-shared", str(obj), "-o", str(lib)]
        if omp:  # the runtime torch uses, by path: its soname is then the one already in the process
            link_cmd += [omp, f"-Wl,-rpath,{os.path.dirname(omp)}"]
        for cmd in (compile_cmd, link_cmd):
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                first = next((ln for ln in proc.stderr.splitlines() if "error" in ln), proc.stderr.strip()[:200])
                raise OSError(f"{os.path.basename(cmd[0])} failed: {first.strip()[:240]}")
        os.replace(lib, target)


def key(source: Path, cc: str, omp: str | None, cflags: list[str]) -> str:
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    h = hashlib.sha256()
    for part in (source.read_bytes(), repr(version).encode(), repr(cflags).encode(), repr(omp).encode(),
                 cpu_flags().encode()):
        h.update(part)
    return h.hexdigest()[:20]


def load(source: Path, cflags: list[str] | None = None) -> tuple[ctypes.CDLL | None, str | None]:
    """(the library built from ``source`` for this CPU, None) or (None, why it cannot be)."""
    cc = compiler()
    if cc is None:
        return None, f"no C compiler ({os.environ.get('CC', 'cc')} not found): install gcc or set CC"
    flags = list(CFLAGS if cflags is None else cflags)
    omp = openmp_runtime()
    target = cache_dir() / f"{source.stem}-{key(source, cc, omp, flags)}.so"
    try:
        if not target.exists():
            build(source, cc, omp, target, flags)
        return ctypes.CDLL(str(target)), None
    except OSError as e:
        return None, f"the {source.stem} kernels did not build: {e}"


class Kernel:
    """One of our C sources, built and loaded on first use, once per process.

    ``prepare(lib)`` declares the functions' argument types and returns None, or why the library
    cannot be used here (e.g. the CPU lacks an instruction set the source checks for at run time);
    ``requires()``, checked before anything is built, returns None or why not to build at all;
    ``cflags``: the build's flags (default :data:`CFLAGS`)."""

    def __init__(self, source: Path, prepare: Callable[[ctypes.CDLL], str | None],
                 requires: Callable[[], str | None] | None = None, cflags: list[str] | None = None) -> None:
        self.source, self.prepare, self.requires, self.cflags = source, prepare, requires, cflags
        self._lib: ctypes.CDLL | None = None
        self._why_not: str | None = None

    def lib(self) -> ctypes.CDLL | None:
        """The loaded library, or None (then :meth:`why_not` says why)."""
        if self._lib is None and self._why_not is None:
            self._why_not = self.requires() if self.requires is not None else None
            if self._why_not is None:
                lib, self._why_not = load(self.source, self.cflags)
                if lib is not None:
                    self._why_not = self.prepare(lib)
                    self._lib = lib if self._why_not is None else None
        return self._lib

    def available(self) -> bool:
        return self.lib() is not None

    def why_not(self) -> str | None:
        """Why the kernel is not used here (None when it is)."""
        self.lib()
        return self._why_not
