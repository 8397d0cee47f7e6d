"""glibc's heap controls, where the C library is glibc (elsewhere: nothing happens)."""
from __future__ import annotations

import contextlib


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


LIBC = _Glibc()
