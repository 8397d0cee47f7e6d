"""Optimal Brain Damage with a modern diagonal curvature estimate."""
from __future__ import annotations

import torch

from ..context import PruneContext
from ..curvature.diagonal import check_fisher_loss, diagonal_curvature
from ..curvature.per_sample import check_curvature
from ..errors import BrainsurgeonError
from ..validation import check_loss_weights
from ..registry import register
from .base import SaliencyMethod


@register("obd")
class OBD(SaliencyMethod):
    """Optimal Brain Damage (LeCun, Denker & Solla 1990, "Optimal Brain Damage", NIPS 2).

    Second-order Taylor expansion of the loss at a trained minimum (gradient ~ 0) with the Hessian
    taken diagonal (weights act independently); deleting weight q (dw_q = -w_q) costs

        saliency_q = 1/2 H_qq w_q^2.

    LeCun et al. back-propagate the Gauss-Newton diagonal; here H_qq is, by ``curvature``:
    ``"ggn"`` (default) the exact generalized Gauss-Newton diagonal, ``"empirical"`` the empirical
    Fisher diagonal (mean squared per-sample gradients), ``"fisher"`` a Monte-Carlo true Fisher
    diagonal (labels sampled from the model; cross-entropy only). The saliencies are loss
    increases, comparable across layers (``allocation="global"``). No weight is updated.

    Weights the layer hooks cannot see once per forward pass (a tied weight, a module called twice,
    ``nn.MultiheadAttention``'s in_proj_weight and out_proj) get the same diagonal from per-sample
    gradients through ``torch.func``, which differentiates through every use. A loss that cannot
    run under ``vmap`` is evaluated sample by sample, recorded in ``numerics.fallbacks``.
    A class-weighted cross-entropy counts each sample with its class weight, normalised over the
    calibration set as torch normalises a batch (``validation.calibrated_loss``).
    """

    summary = "Optimal Brain Damage (LeCun et al. 1990): 1/2 H_qq w_q^2, diagonal GGN or Fisher."

    def __init__(self, curvature: str = "ggn"):
        if not isinstance(curvature, str):
            raise BrainsurgeonError(f"curvature must be a string, one of 'ggn', 'empirical', 'fisher'; got {curvature!r}")
        self.curvature = check_curvature(curvature)

    def validate(self, ctx: PruneContext) -> None:
        check_fisher_loss(self.curvature, ctx.loss_fn)
        check_loss_weights(ctx.loss_fn)

    def scores(self, ctx: PruneContext) -> dict[str, torch.Tensor]:
        noted: set[str] = set()

        def note(what: str) -> None:  # once per kind of fallback, not once per batch
            if what not in noted:
                noted.add(what)
                ctx.numerics.fallback("obd", what)

        diag = diagonal_curvature(
            ctx.model, ctx.targets, ctx.calib, ctx.loss_fn, self.curvature, ctx.generator, track=ctx.track, note=note
        )
        return {t.name: 0.5 * diag[t.name] * t.weight.detach().double() ** 2 for t in ctx.targets}
