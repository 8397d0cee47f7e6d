"""glibc's heap controls, where the C library is glibc (elsewhere: nothing happens)."""
from __future__ import annotations

import contextlib
import os

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


class _Glibc:
    """glibc's heap controls, where the C library is glibc (elsewhere: nothing happens).

    Measured on a 4-block, hidden-2048 Llama (SparseGPT, 2 threads): the default heap kept freed
    blocks' memory and grew about 20 MB per block (24 blocks: peak RSS 2.68 GiB); with large
    buffers (1 MiB and up) always mapped, so that freeing returns them at once, and the heap
    trimmed after each block, the resident memory after a block stays flat and the peak went
    from 1.55 to 1.38 GiB."""

    M_MMAP_THRESHOLD = -3
    #: glibc's threshold is dynamic until mallopt sets one, and mallopt cannot switch that back on:
    #: it starts at 128 KiB and rises to the size of each larger mapped buffer freed, up to this
    #: ceiling (DEFAULT_MMAP_THRESHOLD_MAX, 64-bit), near which a process that frees large tensors
    #: soon has it. A call that found the threshold untouched leaves this one behind.
    GLIBC_DYNAMIC_CEILING = 32 << 20

    def __init__(self) -> None:
        import ctypes
        import ctypes.util

        try:
            self.lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            self.lib.malloc_trim  # noqa: B018 (absent outside glibc)
        except (OSError, AttributeError):
            self.lib = None

    #: the mmap threshold this process last set (None: glibc's own, dynamic, threshold)
    threshold: int | None = None

    def map_large_buffers(self) -> None:
        """Allocations of 1 MiB and more get their own mapping (a process-wide glibc setting: the
        calls that set it run under :meth:`restored_after`, which sets the one before again)."""
        self._set_threshold(1 << 20)

    def _set_threshold(self, nbytes: int) -> None:
        if self.lib is not None:
            self.lib.mallopt(self.M_MMAP_THRESHOLD, nbytes)
            self.threshold = nbytes

    @contextlib.contextmanager
    def heap_buffers_below(self, nbytes: int):
        """Within the block, allocations under ``nbytes`` come from the heap, where freed buffers are
        reused, instead of fresh mappings (each a page-faulted, zeroed allocation); the threshold
        set before is restored after (see :meth:`restored_after`)."""
        with self.restored_after():
            self._set_threshold(nbytes)
            yield

    @contextlib.contextmanager
    def restored_after(self):
        """Whatever threshold the block sets, the one before it is set again after it (glibc's
        dynamic one's ceiling when brainsurgeon had set none). Also a decorator
        (``@LIBC.restored_after()``, a fresh context per call): the public calls run in it, so the
        user's process does not keep mapping every buffer of 1 MiB and more after them."""
        before = self.threshold
        try:
            yield
        finally:
            if self.threshold != before:
                self._set_threshold(before if before is not None else self.GLIBC_DYNAMIC_CEILING)

    def trim(self) -> None:
        if self.lib is not None:
            self.lib.malloc_trim(0)

    def trimmer(self, slack: int) -> "HeapCeiling":
        """A callable that trims the heap only when the resident memory has risen ``slack`` bytes
        over the highest it was right after a trim (see :class:`HeapCeiling`)."""
        return HeapCeiling(self, slack)


def resident_bytes() -> int | None:
    """The process's resident set size from /proc (Linux), or None."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


class HeapCeiling:
    """Trim the heap when the resident memory exceeds a ceiling: the highest resident size seen
    right after a trim (about the live memory at its highest so far) plus ``slack``.

    A trim after every step of a lockstep pass (``brainsurgeon.lockstep``) keeps the resident
    memory at the live memory, but the next step then faults every page of its buffers in again.
    The live memory is highest while the FFN's activations are held; in the other steps the pages
    freed by one batch's step stay resident for the next one's, as long as they fit under the
    ceiling. The peak is then the trimmed run's plus ``slack``. Measured, sparsegpt 50% on
    SmolLM2-135M, 64 x 512 tokens, 2 threads (time; RSS increase of the call): trimmed after every
    step 120.0 s, +1023 MB; under a ceiling with 32 MB of slack 106.1 s, +1039 MB (130 trims in
    1200 steps); never trimmed 90.7 s, +1327 MB. Without /proc, every call trims."""

    def __init__(self, libc: _Glibc, slack: int) -> None:
        self.libc, self.slack = libc, slack
        now = resident_bytes()
        self.ceiling = None if now is None else now + slack

    def __call__(self) -> None:
        now = resident_bytes() if self.ceiling is not None else None
        if now is not None and now <= self.ceiling:
            return
        self.libc.trim()
        after = resident_bytes()
        if after is not None and self.ceiling is not None:
            self.ceiling = max(self.ceiling, after + self.slack)


LIBC = _Glibc()
