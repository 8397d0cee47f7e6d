"""What a structured pruning buys: parameters, FLOPs and measured CPU latency.

FLOPs come from ``torch.utils.flop_counter.FlopCounterMode`` (counts 2 per multiply-add of
matmuls and convolutions; elementwise ops are not counted). Latency is the median wall time of
repeated forward passes under ``torch.no_grad`` at batch 1 and batch 64, after warm-up runs,
with the process's current thread setting (reported alongside).

Before/after comparisons (``compare``) time the two models interleaved, in alternating order, and
report the median of the per-round ratios as the speedup: on a shared machine whose speed drifts
over seconds, timing one model after the other compares two different machines.

Measure in a process that has already done some work. In a fresh process glibc hands every
activation of a few MB back to the operating system when it is freed, so each forward pass pays
page faults in proportion to its activation memory (measured: SmallResNet at batch 64 took
21-32 ms in a fresh process, 10-13 ms once a larger block had been freed), which flatters the
smaller model. ``bs.prune`` measures after pruning, when that is no longer the case.
"""
from __future__ import annotations

import statistics
import time

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, example: torch.Tensor) -> int:
    """FLOPs of one forward pass on ``example`` (one sample: pass a batch of 1)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(example)
    return int(counter.get_total_flops())


def paired_latency_ms(
    models: tuple[nn.Module, nn.Module], sample_shape: tuple[int, ...], batch: int, rounds: int = 31,
    warmup: int = 3, budget_s: float = 1.0, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
) -> tuple[float, float, float]:
    """(median ms of ``models[0]``, median ms of ``models[1]``, median of the per-round ratios
    t0 / t1): each round times both on the same input, the order alternating between rounds;
    stops early after ``budget_s`` (at least 5 rounds)."""
    # a private generator: timing must not advance the user's global torch RNG
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(batch, *sample_shape, device=device, dtype=dtype, generator=gen)
    # CUDA kernels run asynchronously: wait for them, or the clock measures only the launches
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    times: tuple[list[float], list[float]] = ([], [])
    with torch.no_grad():
        for _ in range(warmup):
            for m in models:
                m(x)
        sync()
        start = time.perf_counter()
        for r in range(rounds):
            for i in ((0, 1) if r % 2 == 0 else (1, 0)):
                t0 = time.perf_counter()
                models[i](x)
                sync()
                times[i].append(time.perf_counter() - t0)
            if time.perf_counter() - start > budget_s and r >= 4:
                break
    ratio = statistics.median(a / b for a, b in zip(*times))
    return 1000.0 * statistics.median(times[0]), 1000.0 * statistics.median(times[1]), ratio


def compare(
    before: nn.Module, after: nn.Module, sample_shape: tuple[int, ...], device="cpu", dtype=torch.float32,
    rounds: int = 31, budget_s: float = 1.0,
) -> tuple[dict, dict, dict]:
    """``cost`` of both models, the latencies timed interleaved (``paired_latency_ms``); returns
    (before, after, speedup) with speedup = {"batch_1": ..., "batch_64": ...}, the median
    per-round latency ratios before / after."""
    flags = (before.training, after.training)
    before.eval()
    after.eval()
    try:
        example = torch.zeros(1, *sample_shape, device=device, dtype=dtype)
        out = ({"params": count_params(before), "flops": count_flops(before, example), "latency_ms": {}},
               {"params": count_params(after), "flops": count_flops(after, example), "latency_ms": {}})
        speedup = {}
        for batch in (1, 64):
            key = f"batch_{batch}"
            t_before, t_after, speedup[key] = paired_latency_ms(
                (before, after), sample_shape, batch, rounds=rounds, budget_s=budget_s, device=device, dtype=dtype
            )
            out[0]["latency_ms"][key], out[1]["latency_ms"][key] = t_before, t_after
        for c in out:
            c["threads"] = torch.get_num_threads()
        return out[0], out[1], speedup
    finally:
        before.train(flags[0])
        after.train(flags[1])
