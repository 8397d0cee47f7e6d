"""The baselines every pruning paper compares against."""
from __future__ import annotations

import torch

from ..context import PruneContext
from ..registry import register
from .base import SaliencyMethod


def no_calibration(ctx: PruneContext) -> None:
    """Record that no calibration statistics were computed (``report["calibration"]["path"]``)."""
    cal = ctx.extra_report.get("calibration")
    ctx.extra_report["calibration"] = {**(cal if isinstance(cal, dict) else {}), "path": "none"}


@register("magnitude")
class Magnitude(SaliencyMethod):
    """Magnitude pruning (Han, Pool, Tran & Dally 2015, "Learning both weights and connections").

    saliency_q = |w_q|. With ``allocation="global"`` this is one threshold over all layers.
    """

    writes_only_targets = True
    summary = "Magnitude |w| (Han et al. 2015): the standard baseline."

    def scores(self, ctx: PruneContext) -> dict[str, torch.Tensor]:
        no_calibration(ctx)
        return {t.name: t.weight.detach().abs() for t in ctx.targets}


@register("random")
class Random(SaliencyMethod):
    """Random pruning: saliency_q ~ U(0, 1), drawn from the run's seeded generator.

    The control every criterion must beat (e.g. Blalock et al. 2020, "What is the state of neural
    network pruning?").
    """

    summary = "Uniformly random weights (seeded): the control."

    def scores(self, ctx: PruneContext) -> dict[str, torch.Tensor]:
        no_calibration(ctx)
        return {
            t.name: torch.rand(t.weight.shape, generator=ctx.generator, device=ctx.generator.device).to(t.weight.device)
            for t in ctx.targets
        }
