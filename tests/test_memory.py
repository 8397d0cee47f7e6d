"""glibc heap controls: the lockstep pass raises the mmap threshold for its duration, and restores it."""
from __future__ import annotations

import pytest

from brainsurgeon.memory import _Glibc


class FakeLibc:
    def __init__(self):
        self.calls = []

    def mallopt(self, param, value):
        self.calls.append((param, value))
        return 1


def test_heap_buffers_below_restores_the_threshold_set_before():
    libc = _Glibc()
    libc.lib = FakeLibc()
    libc.map_large_buffers()
    with libc.heap_buffers_below(16 << 20):
        assert libc.threshold == 16 << 20
    assert libc.threshold == 1 << 20
    assert libc.lib.calls == [(-3, 1 << 20), (-3, 16 << 20), (-3, 1 << 20)]


def test_heap_buffers_below_restores_on_error_and_without_a_threshold_before():
    libc = _Glibc()
    libc.lib = FakeLibc()
    with pytest.raises(RuntimeError):
        with libc.heap_buffers_below(16 << 20):
            raise RuntimeError("a failed forward")
    assert libc.lib.calls == [(-3, 16 << 20), (-3, _Glibc.GLIBC_DEFAULT_THRESHOLD)]


def test_without_glibc_nothing_happens():
    libc = _Glibc()
    libc.lib = None
    with libc.heap_buffers_below(16 << 20):
        pass
    libc.map_large_buffers()
    libc.trim()
    assert libc.threshold is None


def test_a_lockstep_pass_runs_with_the_raised_threshold(monkeypatch):
    """The threshold seen by the block's forward is LOCKSTEP_HEAP_BUFFERS; after the call, 1 MiB again."""
    import torch
    from torch import nn

    import brainsurgeon as bs
    from brainsurgeon import sequential
    from brainsurgeon.memory import LIBC

    if LIBC.lib is None:
        pytest.skip("not glibc: the heap controls do nothing here")
    seen = []
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    model[2].register_forward_pre_hook(lambda m, a: seen.append(LIBC.threshold))
    torch.manual_seed(0)
    data = (torch.randn(32, 8), torch.randint(0, 4, (32,)))
    res = bs.prune(model, data, "sparsegpt", 0.5, batch_size=8, lockstep=True)
    assert res.report["calibration"]["lockstep_blocks"] >= 1
    assert sequential.LOCKSTEP_HEAP_BUFFERS in seen
    assert LIBC.threshold == 1 << 20
