"""glibc heap controls: the lockstep pass raises the mmap threshold for its duration, and the public
calls leave the threshold they found (the user's process is not left mapping every large buffer)."""
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
    assert libc.lib.calls == [(-3, 16 << 20), (-3, _Glibc.GLIBC_DYNAMIC_CEILING)]


def test_without_glibc_nothing_happens():
    libc = _Glibc()
    libc.lib = None
    with libc.heap_buffers_below(16 << 20):
        pass
    libc.map_large_buffers()
    libc.trim()
    assert libc.threshold is None


def test_a_lockstep_pass_runs_with_the_raised_threshold(monkeypatch):
    """The threshold seen by the block's forward is LOCKSTEP_HEAP_BUFFERS; after the call, the one before it."""
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
    monkeypatch.setattr(LIBC, "threshold", 3 << 20)  # as if the user's process had set one
    res = bs.prune(model, data, "sparsegpt", 0.5, batch_size=8, lockstep=True)
    assert res.report["calibration"]["lockstep_blocks"] >= 1
    assert sequential.LOCKSTEP_HEAP_BUFFERS in seen
    assert LIBC.threshold == 3 << 20


def test_a_call_restores_the_threshold_it_found():
    """Calls that map large buffers while they run (1 MiB) leave the threshold as they found it: the
    one set before, or glibc's dynamic ceiling where none was (mallopt cannot restore the dynamic one)."""
    libc = _Glibc()
    libc.lib = FakeLibc()

    @libc.restored_after()
    def call(fail=False):
        libc.map_large_buffers()
        if fail:
            raise RuntimeError("bad input")
        return "result"

    assert call() == "result"
    assert libc.lib.calls == [(-3, 1 << 20), (-3, _Glibc.GLIBC_DYNAMIC_CEILING)]
    libc.lib.calls.clear()
    with pytest.raises(RuntimeError):
        call(fail=True)
    assert libc.lib.calls == [(-3, 1 << 20), (-3, _Glibc.GLIBC_DYNAMIC_CEILING)]
    libc.lib.calls.clear()
    libc._set_threshold(4 << 20)
    call()
    assert libc.lib.calls == [(-3, 4 << 20), (-3, 1 << 20), (-3, 4 << 20)]
    libc.lib.calls.clear()

    @libc.restored_after()
    def untouched():
        return None

    untouched()
    assert libc.lib.calls == []  # nothing set, nothing restored


@pytest.mark.parametrize("structured", [False, True])
def test_bs_prune_leaves_the_process_threshold_as_it_found_it(monkeypatch, structured):
    import torch
    from torch import nn

    import brainsurgeon as bs
    from brainsurgeon.memory import LIBC

    if LIBC.lib is None:
        pytest.skip("not glibc: the heap controls do nothing here")
    monkeypatch.setattr(LIBC, "threshold", 2 << 20)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    data = (torch.randn(32, 8), torch.randint(0, 4, (32,)))
    seen = []
    model[0].register_forward_pre_hook(lambda m, a: seen.append(LIBC.threshold))
    if structured:
        bs.prune(model, data, "l1-norm", 0.25, structure="channel", batch_size=8)
    else:
        bs.prune(model, data, "magnitude", 0.5, batch_size=8)
    assert 1 << 20 in seen  # the call ran with large buffers mapped
    assert LIBC.threshold == 2 << 20


class TrimCounter:
    def __init__(self):
        self.trims = 0

    def trim(self):
        self.trims += 1


def test_heap_ceiling_trims_only_above_the_highest_post_trim_size_plus_slack(monkeypatch):
    """The ceiling starts at the resident size plus the slack, and rises to each trim's result plus
    the slack: pages freed below it stay resident for the next step."""
    from brainsurgeon import memory

    rss = [100]
    monkeypatch.setattr(memory, "resident_bytes", lambda: rss[0])
    libc = TrimCounter()
    trim = memory.HeapCeiling(libc, slack=10)
    for size in (105, 110):  # under or at the ceiling (110): no trim
        rss[0] = size
        trim()
    assert libc.trims == 0

    def trimmed():  # the trim brings the resident size down to the live memory, here 150
        libc.trims += 1
        rss[0] = 150

    libc.trim = trimmed
    rss[0] = 170
    trim()
    assert libc.trims == 1 and trim.ceiling == 160
    for size in (155, 160, 120):  # under the raised ceiling
        rss[0] = size
        trim()
    assert libc.trims == 1
    rss[0] = 161
    trim()
    assert libc.trims == 2 and trim.ceiling == 160  # never lowered


def test_heap_ceiling_without_proc_trims_every_time(monkeypatch):
    from brainsurgeon import memory

    monkeypatch.setattr(memory, "resident_bytes", lambda: None)
    libc = TrimCounter()
    trim = memory.HeapCeiling(libc, slack=10)
    for _ in range(3):
        trim()
    assert libc.trims == 3


def test_resident_bytes_reads_this_process():
    import psutil

    import os

    from brainsurgeon import memory

    if not os.path.exists("/proc/self/statm"):
        pytest.skip("no /proc/self/statm here (not Linux)")
    rss = memory.resident_bytes()
    assert rss is not None and abs(rss - psutil.Process().memory_info().rss) < 64 << 20
