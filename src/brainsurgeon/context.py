"""The state one pruning run shares with its method: the working copy, data, options and records."""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, TypeVar

import torch
from torch import nn

from .allocation import Structure
from .data import Calibration
from .progress import track
from .targets import Target

T = TypeVar("T")


@dataclass(frozen=True)
class PruneOptions:
    """Validated options common to every method (method-specific ones go to the method)."""

    method: str
    sparsity: float
    structure: Structure
    allocation: str
    max_layer_sparsity: float
    num_samples: int
    damping: float | None
    seed: int
    device: torch.device
    batch_size: int


@dataclass
class Numerics:
    """What the numerics had to do: damping applied and fallbacks taken, per layer."""

    damping: dict[str, float] = field(default_factory=dict)
    fallbacks: list[str] = field(default_factory=list)

    def damp(self, where: str, value: float) -> None:
        self.damping[where] = float(value)

    def fallback(self, where: str, what: str) -> None:
        self.fallbacks.append(f"{where}: {what}")


class Timings:
    """Wall-clock seconds per phase (``statistics``, ``solve``, ...), accumulated."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - t0


@dataclass
class PruneContext:
    model: nn.Module
    targets: list[Target]
    calib: Calibration
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    options: PruneOptions
    generator: torch.Generator
    show_progress: bool = False
    numerics: Numerics = field(default_factory=Numerics)
    timer: Timings = field(default_factory=Timings)
    extra_report: dict = field(default_factory=dict)
    #: what the block-sequential walk does around blocks (``sequential.BlockHooks``: out-of-core
    #: loading and release); None: the blocks are in memory
    block_hooks: object | None = None

    def track(self, iterable: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
        return track(iterable, description, self.show_progress, total)

    @property
    def device(self) -> torch.device:
        return self.options.device

    def target(self, name: str) -> Target:
        for t in self.targets:
            if t.name == name:
                return t
        raise KeyError(name)
