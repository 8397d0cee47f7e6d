"""One block over every cached batch in lockstep: each batch's forward pauses at chosen points.

Block-sequential calibration (``brainsurgeon.sequential``) solves a group of layers (q, k, v; gate
and up; ...) on the statistics of ALL the calibration batches, and the layers after the group must
see it solved. Running the block batch by batch up to a group's input and stopping there costs one
partial block pass per group, and then a full pass for the block's outputs: on a Llama block (four
input groups) about 2.4 block passes. Here each batch's forward runs in a coroutine of its own
(a greenlet) that pauses at every group's first input: the caller takes the rows of batch after
batch, solves the group, and lets every batch run on to the next pause. The block then runs exactly
ONCE per batch, its outputs are the next block's inputs, and the arithmetic is that of the partial
passes (the same calls on the same values, statistics added in the same batch order), so the
results are bit-identical to them.

Why greenlets and not threads (the first version ran a thread per batch, handing over through
semaphores): every forward then runs on the caller's OS thread, so

- there is one OpenMP team (a new thread gets a team of its own, which starts from the process
  default of every core unless it is told otherwise) and nothing to hand over;
- every buffer comes from the caller's glibc arena. A thread allocates from an arena of its own,
  so the memory one batch's step freed was never reused by the next batch's step: it had to be
  trimmed after every step (or it piled up) and faulted in afresh by the next.

Measured, sparsegpt 50% on SmolLM2-135M, 32 x 512 tokens, 2 threads (time; RSS increase of the
call), the heap trimmed after every step: threads 64.5 s, +834 MB; greenlets 58.2 s, +816 MB.

The workers run with grad mode off; the caller's own grad mode (thread-local state, shared by the
greenlets of one thread) is set back whenever a worker hands back. While a group is solved every
batch's forward is suspended with its live intermediates (e.g. the residual stream and the FFN's
hidden activations), which is the memory this saving costs.
"""
from __future__ import annotations

from typing import Callable

import greenlet
import torch

from .errors import BrainsurgeonError


class _Abort(BaseException):
    """Raised inside a paused worker when the run is abandoned (a BaseException, so that a model's
    own ``except Exception`` does not swallow it)."""


class Lockstep:
    """``count`` calls of ``run(i)``, each in its own greenlet, advanced together pause by pause.

    Pauses are announced by :meth:`pause` (call it from a forward hook: it does nothing outside
    the workers, and only the first time a worker reaches a given key). :meth:`advance` runs every
    batch, in index order, to its next pause; :meth:`finish` runs them to the end and returns the
    results. ``after_step`` is called each time a worker hands back. Use as a context manager: on
    leaving, unfinished workers are unwound."""

    def __init__(self, count: int, run: Callable[[int], object], after_step: Callable[[], None] | None = None) -> None:
        self._run = run
        self._after_step = after_step
        self._count = count
        self._workers = [greenlet.greenlet(self._body) for _ in range(count)]
        self._index = {g: i for i, g in enumerate(self._workers)}
        self._seen: list[set] = [set() for _ in range(count)]
        self._caller: greenlet.greenlet | None = None
        self._aborting = False
        self._results: list[object] = [None] * count

    # ------------------------------------------------------------------ inside the workers
    def _body(self, i: int) -> tuple:
        try:
            return ("done", self._run(i))
        except _Abort:
            return ("aborted",)
        except greenlet.GreenletExit:
            raise
        except BaseException as exc:  # handed to the caller, which raises it
            return ("error", exc)

    def pause(self, key, payload) -> None:
        """In a worker, the first time at ``key``: hand ``payload`` to the caller and wait."""
        i = self._index.get(greenlet.getcurrent())
        if i is None or key in self._seen[i]:
            return  # not a worker (e.g. a probing pass in the caller), or a later call
        self._seen[i].add(key)
        self._caller.switch(("pause", key, payload))
        if self._aborting:
            raise _Abort

    # ------------------------------------------------------------------ the caller's side
    def _switch(self, i: int) -> tuple:
        """Run worker ``i`` until it hands back; its report."""
        grad = torch.is_grad_enabled()
        torch.set_grad_enabled(False)
        self._caller = greenlet.getcurrent()
        worker = self._workers[i]
        worker.parent = self._caller  # where its return value goes
        try:
            return worker.switch() if worker else worker.switch(i)  # started: resume; else: start it
        finally:
            torch.set_grad_enabled(grad)

    def _step(self, i: int) -> tuple:
        report = self._switch(i)
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
        self._aborting = True
        for i, worker in enumerate(self._workers):
            if worker:  # started and paused: let it unwind (never started: nothing to unwind)
                self._switch(i)
