"""What a structured pruning buys: parameters, FLOPs and measured CPU latency.

FLOPs come from ``torch.utils.flop_counter.FlopCounterMode`` (counts 2 per multiply-add of
matmuls and convolutions; elementwise ops are not counted). Latency is the median wall time of
repeated forward passes under ``torch.no_grad`` at batch 1 and batch 64, after warm-up runs,
with the process's current thread setting (reported alongside).
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


def median_latency_ms(
    model: nn.Module, sample_shape: tuple[int, ...], batch: int, repeats: int = 15, warmup: int = 3,
    budget_s: float = 0.5, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
) -> float:
    """Median milliseconds of a forward pass at ``batch``; stops early after ``budget_s`` of runs."""
    x = torch.randn(batch, *sample_shape, device=device, dtype=dtype)
    times = []
    with torch.no_grad():
        for _ in range(warmup):
            model(x)
        start = time.perf_counter()
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t0)
            if time.perf_counter() - start > budget_s and len(times) >= 3:
                break
    return 1000.0 * statistics.median(times)


def cost(model: nn.Module, sample_shape: tuple[int, ...], device="cpu", dtype=torch.float32) -> dict:
    """Parameters, FLOPs per sample and median latency at batch 1 and 64 of ``model`` (eval mode),
    on inputs of ``sample_shape`` and ``dtype`` (those of the data)."""
    was_training = model.training
    model.eval()
    try:
        example = torch.zeros(1, *sample_shape, device=device, dtype=dtype)
        return {
            "params": count_params(model),
            "flops": count_flops(model, example),
            "latency_ms": {
                "batch_1": median_latency_ms(model, sample_shape, 1, device=device, dtype=dtype),
                "batch_64": median_latency_ms(model, sample_shape, 64, device=device, dtype=dtype),
            },
            "threads": torch.get_num_threads(),
        }
    finally:
        model.train(was_training)
