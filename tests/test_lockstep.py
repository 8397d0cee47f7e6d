"""brainsurgeon.lockstep: batches advanced pause by pause, one thread running at a time."""
import os
import threading

import pytest
import torch
from torch import nn

from brainsurgeon.errors import BrainsurgeonError
from brainsurgeon.lockstep import Lockstep


class Two(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 3)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def _run_with_pauses(model, xs, on_pause):
    with Lockstep(len(xs), lambda i: model(xs[i])) as steps:
        hs = [m.register_forward_pre_hook(lambda mod, args, k=k: steps.pause(k, args[0])) for k, m in enumerate((model.a, model.b))]
        try:
            for k in range(2):
                seen = []
                steps.advance(k, lambda i, x: seen.append((i, x.clone())), "not reached")
                on_pause(k, seen)
            return steps.finish("forward")
        finally:
            for h in hs:
                h.remove()


def test_every_batch_pauses_in_order_and_sees_changes_made_while_paused():
    torch.manual_seed(0)
    model = Two()
    xs = [torch.randn(2, 3) for _ in range(4)]
    inputs_b = []

    def on_pause(k, seen):
        assert [i for i, _ in seen] == [0, 1, 2, 3]  # index order
        if k == 0:
            with torch.no_grad():
                model.a.weight.mul_(0.5)  # "solved" while every batch waits before a
        else:
            inputs_b.extend(x for _, x in seen)

    outs = _run_with_pauses(model, xs, on_pause)
    with torch.no_grad():
        for x, y, xb in zip(xs, outs, inputs_b):
            assert torch.equal(xb, torch.relu(model.a(x)))  # b's input came from the changed a
            assert torch.equal(y, model(x))
    assert not outs[0].requires_grad  # grad mode is off in the workers
    assert not [t for t in threading.enumerate() if t.name.startswith("lockstep-")]


def test_an_error_in_a_worker_is_raised_in_the_caller_and_the_others_unwind():
    model = Two()
    xs = [torch.randn(2, 3), torch.randn(2, 4), torch.randn(2, 3)]  # batch 1 does not fit layer a
    with pytest.raises(RuntimeError):
        _run_with_pauses(model, xs, lambda k, seen: None)
    assert not [t for t in threading.enumerate() if t.name.startswith("lockstep-")]


def test_a_pause_that_is_never_reached_is_a_clear_error():
    model = Two()
    xs = [torch.randn(2, 3) for _ in range(2)]
    with Lockstep(len(xs), lambda i: model(xs[i])) as steps:
        with pytest.raises(BrainsurgeonError, match="layer x is missing"):
            steps.advance("never", lambda i, x: None, "layer x is missing")
    assert not [t for t in threading.enumerate() if t.name.startswith("lockstep-")]


def test_pause_outside_a_worker_does_nothing():
    steps = Lockstep(1, lambda i: i)
    steps.pause("k", None)  # the caller's thread: no effect, no hang
    with steps:
        assert steps.finish("run") == [0]


def _native_thread_counts() -> tuple[int, int]:
    """OpenMP's and MKL's own thread counts for the calling thread, read from the libraries torch
    loaded (torch.get_num_threads() reports the process setting, not what a new thread will use)."""
    import ctypes

    lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    gomp = ctypes.CDLL(os.path.join(lib, "libgomp.so.1"))
    mkl = ctypes.CDLL(os.path.join(lib, "libtorch_cpu.so"))
    return gomp.omp_get_max_threads(), mkl.mkl_get_max_threads()


def test_workers_use_the_callers_thread_count():
    """A new thread starts with OpenMP's and MKL's process defaults (every core): without the
    worker's own set_num_threads, one forward per worker thread would oversubscribe the machine."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        plain = []
        t = threading.Thread(target=lambda: plain.append(_native_thread_counts()))
        t.start()
        t.join()
        seen = Lockstep(3, lambda i: _native_thread_counts())
        with seen:
            counts = seen.finish("run")
    finally:
        torch.set_num_threads(old)
    if (os.cpu_count() or 1) > 1:
        assert plain[0] != (1, 1)  # the hazard is real here: a bare thread ignores the setting
    assert counts == [(1, 1)] * 3
