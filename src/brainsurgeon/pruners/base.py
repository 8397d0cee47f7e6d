"""What a pruning method is.

A method gets a :class:`~brainsurgeon.context.PruneContext` (a working copy of the model, the
calibration data and the options) and returns keep-masks (``True`` = kept) for every target layer.
It may change the kept weights (compensation); the engine zeroes the pruned ones exactly.

Two shapes cover the literature:

* :class:`SaliencyMethod`: one score per weight, comparable across layers (magnitude, OBD, K-FAC,
  ...); the engine's allocation turns scores into masks (uniform, global with a cap, or N:M).
* methods that prune and compensate in their own loop (OBS, WoodFisher, OBC, SparseGPT) override
  :meth:`PruningMethod.run` directly.
"""
from __future__ import annotations

import inspect
from typing import ClassVar

import torch

from ..allocation import allocate_masks
from ..context import PruneContext
from ..errors import BrainsurgeonError
from ..memory import LIBC


class PruningMethod:
    """Base class. Subclasses set ``summary``, document paper and formula, and implement ``run``."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    #: whether the method can produce N:M patterns (``structure="2:4"``)
    supports_nm: ClassVar[bool] = False
    #: True where the method writes nothing but its targets' weights and runs no backward pass: the
    #: engine's working copy then reads the user's embedding tables until the end (engine.unshare)
    writes_only_targets: ClassVar[bool] = False
    #: the structures this method handles besides "unstructured"/N:M (the structured issue adds "channel")
    structures: ClassVar[tuple[str, ...]] = ("unstructured",)

    def __init__(self) -> None:  # subclasses take their own keyword options
        pass

    @classmethod
    def create(cls, **options) -> "PruningMethod":
        """Instantiate with method-specific options, naming the accepted ones on a mistake."""
        params = {
            n: p for n, p in inspect.signature(cls.__init__).parameters.items()
            if n != "self" and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
        }
        unknown = set(options) - set(params)
        if unknown:
            accepted = ", ".join(sorted(params)) or "none"
            raise BrainsurgeonError(
                f"method {cls.name!r} does not take option(s) {sorted(unknown)}; its options are: {accepted}"
            )
        return cls(**options)

    def options(self) -> dict:
        """The method's own options, for the report."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    def validate(self, ctx: PruneContext) -> None:
        """Checks that must fail before any long work (memory budgets, unsupported layers)."""

    def run(self, ctx: PruneContext) -> dict[str, torch.Tensor]:
        raise NotImplementedError  # abstract: every registered method overrides it


class SaliencyMethod(PruningMethod):
    """A method defined by per-weight saliencies: lowest saliency is pruned first.

    Scores must be comparable across layers (the estimated loss increase, or a documented proxy)
    so that ``allocation="global"`` is meaningful.
    """

    supports_nm: ClassVar[bool] = True

    def scores(self, ctx: PruneContext) -> dict[str, torch.Tensor]:
        raise NotImplementedError  # abstract

    def run(self, ctx: PruneContext) -> dict[str, torch.Tensor]:
        with ctx.timer("statistics"):
            scores = self.scores(ctx)
        with ctx.timer("solve"):
            o = ctx.options
            masks = allocate_masks(scores, o.sparsity, o.allocation, o.max_layer_sparsity, o.structure)
        del scores
        LIBC.trim()  # the scores' memory back to the system before the next stage
        return masks
