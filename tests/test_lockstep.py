"""brainsurgeon.lockstep: batches advanced pause by pause, all on the caller's thread."""
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


def _run_with_pauses(model, xs, on_pause, after_step=None):
    with Lockstep(len(xs), lambda i: model(xs[i]), after_step=after_step) as steps:
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
        assert torch.is_grad_enabled()  # the caller's grad mode, between the workers' steps
        if k == 0:
            with torch.no_grad():
                model.a.weight.mul_(0.5)  # "solved" while every batch waits before a
        else:
            inputs_b.extend(x for _, x in seen)

    steps = []
    outs = _run_with_pauses(model, xs, on_pause, after_step=lambda: steps.append(threading.get_ident()))
    with torch.no_grad():
        for x, y, xb in zip(xs, outs, inputs_b):
            assert torch.equal(xb, torch.relu(model.a(x)))  # b's input came from the changed a
            assert torch.equal(y, model(x))
    assert not outs[0].requires_grad  # grad mode is off in the workers
    assert torch.is_grad_enabled()
    assert len(steps) == 3 * 4  # after every hand-back: two pauses and the end, for each batch
    assert set(steps) == {threading.get_ident()}  # no thread of its own: one OpenMP team, one glibc arena


def test_an_error_in_a_worker_is_raised_in_the_caller_and_the_others_unwind():
    model = Two()
    xs = [torch.randn(2, 3), torch.randn(2, 4), torch.randn(2, 3)]  # batch 1 does not fit layer a
    unwound = []

    class Watch(nn.Module):
        def forward(self, x):
            try:
                return model(x)
            finally:
                unwound.append(x.shape)

    watch = Watch()
    with pytest.raises(RuntimeError):
        with Lockstep(len(xs), lambda i: watch(xs[i])) as steps:
            h = model.b.register_forward_pre_hook(lambda mod, args: steps.pause("b", args[0]))
            try:
                steps.advance("b", lambda i, x: None, "not reached")
            finally:
                h.remove()
    assert len(unwound) == 2  # batch 1 (the error) and batch 0 (paused at b, unwound on leaving); batch 2 never ran
    assert torch.is_grad_enabled()


def test_a_pause_that_is_never_reached_is_a_clear_error():
    model = Two()
    xs = [torch.randn(2, 3) for _ in range(2)]
    with Lockstep(len(xs), lambda i: model(xs[i])) as steps:
        with pytest.raises(BrainsurgeonError, match="layer x is missing"):
            steps.advance("never", lambda i, x: None, "layer x is missing")


def test_pause_outside_a_worker_does_nothing():
    steps = Lockstep(1, lambda i: i)
    steps.pause("k", None)  # the caller: no effect, no hang
    with steps:
        assert steps.finish("run") == [0]


def test_the_callers_grad_mode_is_its_own():
    with torch.no_grad():
        with Lockstep(2, lambda i: torch.is_grad_enabled()) as steps:
            assert steps.finish("run") == [False, False]
        assert not torch.is_grad_enabled()
    with Lockstep(2, lambda i: torch.is_grad_enabled()) as steps:
        assert steps.finish("run") == [False, False]
    assert torch.is_grad_enabled()
