"""One block over every cached batch in lockstep: each batch's forward pauses at chosen points.

Block-sequential calibration (``brainsurgeon.sequential``) solves a group of layers (q, k, v; gate
and up; ...) on the statistics of ALL the calibration batches, and the layers after the group must
see it solved. Running the block batch by batch up to a group's input and stopping there costs one
partial block pass per group, and then a full pass for the block's outputs: on a Llama block (four
input groups) about 2.4 block passes. Here each batch's forward runs in a thread of its own that
pauses at every group's first input: the caller takes the rows of batch after batch, solves the
group, and lets every batch run on to the next pause. The block then runs exactly ONCE per batch,
its outputs are the next block's inputs, and the arithmetic is that of the partial passes (the same
calls on the same values, statistics added in the same batch order), so the results are
bit-identical to them.

Only one thread runs at a time (a hand-off through semaphores): torch's intra-op thread pool is
never shared by two forwards, and nothing depends on the OS scheduler's order. torch's grad mode is
thread-local and is switched off in each worker. While a group is solved every batch's forward is
suspended with its live intermediates (e.g. the residual stream and the FFN's hidden activations),
which is the memory this saving costs.
"""
from __future__ import annotations

import threading
from typing import Callable

import torch

from .errors import BrainsurgeonError


class _Abort(BaseException):
    """Raised inside a paused worker when the run is abandoned (a BaseException, so that a model's
    own ``except Exception`` does not swallow it)."""


class Lockstep:
    """``count`` calls of ``run(i)``, each in its own thread, advanced together pause by pause.

    Pauses are announced by :meth:`pause` (call it from a forward hook: it does nothing outside
    the workers, and only the first time a worker reaches a given key). :meth:`advance` runs every
    batch, in index order, to its next pause; :meth:`finish` runs them to the end and returns the
    results. Use as a context manager: on leaving, unfinished workers are unwound."""

    def __init__(self, count: int, run: Callable[[int], object], after_step: Callable[[], None] | None = None) -> None:
        self._run = run
        self._after_step = after_step  # called in the caller's thread each time a worker hands back
        self._count = count
        self._local = threading.local()
        self._resume = [threading.Semaphore(0) for _ in range(count)]
        self._handed_back = threading.Semaphore(0)
        self._report: tuple = ()
        self._aborting = False
        self._finished = [False] * count  # set by the worker itself, as its last act
        self._results: list[object] = [None] * count
        self._threads = [threading.Thread(target=self._worker, args=(i,), daemon=True, name=f"lockstep-{i}")
                         for i in range(count)]
        self._started = False
        self._threads_setting = torch.get_num_threads()

    # ------------------------------------------------------------------ inside the workers
    def _worker(self, i: int) -> None:
        self._local.index, self._local.seen = i, set()
        # OpenMP's thread count is per thread: a new thread starts from the process default (all
        # cores), whatever torch.set_num_threads said in the caller, while torch.get_num_threads()
        # reports the caller's value (measured: with 1 thread set, a 2048^3 matmul loop in a new
        # thread took 2.8 s of CPU in 1.7 s of wall time; 3.0 s in 3.4 s after this call)
        torch.set_num_threads(self._threads_setting)
        self._resume[i].acquire()
        if self._aborting:
            self._report = ("aborted",)
        else:
            try:
                with torch.no_grad():
                    self._report = ("done", self._run(i))
            except _Abort:
                self._report = ("aborted",)
            except BaseException as exc:  # handed to the caller's thread, which raises it
                self._report = ("error", exc)
        self._finished[i] = True
        self._handed_back.release()

    def pause(self, key, payload) -> None:
        """In a worker, the first time at ``key``: hand ``payload`` to the caller and wait."""
        seen = getattr(self._local, "seen", None)
        if seen is None or key in seen:
            return  # not a worker (e.g. a probing pass in the caller's thread), or a later call
        seen.add(key)
        self._report = ("pause", key, payload)
        self._handed_back.release()
        self._resume[self._local.index].acquire()
        if self._aborting:
            raise _Abort

    # ------------------------------------------------------------------ the caller's side
    def _step(self, i: int) -> tuple:
        if not self._started:
            for t in self._threads:
                t.start()
            self._started = True
        self._resume[i].release()
        self._handed_back.acquire()
        report = self._report
        if self._after_step is not None:
            self._after_step()
        if report[0] == "error":
            raise report[1]
        return report

    def advance(self, key, take: Callable[[int, object], None], missing: str) -> None:
        """Run every batch to its pause at ``key``, calling ``take(i, payload)`` in index order.
        ``missing`` is the error when a batch ends or pauses elsewhere first."""
        for i in range(self._count):
            report = self._step(i)
            if report[0] != "pause" or report[1] != key:
                raise BrainsurgeonError(f"{missing} (calibration batch {i})")
            take(i, report[2])

    def finish(self, what: str) -> list[object]:
        """Run every batch to the end of its forward; its return values in index order."""
        for i in range(self._count):
            report = self._step(i)
            if report[0] != "done":
                raise BrainsurgeonError(f"{what}: calibration batch {i} paused again at {report[1]!r}")
            self._results[i] = report[1]
        return self._results

    def __enter__(self) -> "Lockstep":
        return self

    def __exit__(self, *exc) -> None:
        if not self._started:
            return
        self._aborting = True
        for i in range(self._count):
            if not self._finished[i]:  # paused, or not yet begun: let it unwind
                self._resume[i].release()
                self._handed_back.acquire()
        for t in self._threads:
            t.join()
