"""Re-estimate BatchNorm running statistics after pruning.

Removing channels changes what every later layer receives, so the running mean and variance a
BatchNorm learnt on the dense network no longer describe its inputs: in eval mode it then shifts and
scales the pruned network's features by the wrong amounts, which can alone bring a ResNet to chance
accuracy. The remedy (Li et al. 2020, "EagleEye: Fast Sub-net Evaluation for Efficient Neural Network
Pruning", adaptive BN; also AdaBN, Li et al. 2016) changes no weight: forward the calibration data
with the BatchNorm layers in training mode and the running statistics reset, using the cumulative
average (``momentum=None``), so that each layer's statistics become

    mu = mean over batches of the batch means,     var = mean over batches of the batch variances

of the inputs it receives in the pruned network.
"""
from __future__ import annotations

import torch
from torch import nn

from .data import Calibration
from .evaluate import evaluate


def batchnorm_layers(model: nn.Module) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    """The BatchNorm layers that keep running statistics (those used in eval mode)."""
    return [
        (name, m) for name, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]


def recalibrate_batchnorm(model: nn.Module, calib: Calibration) -> list[str]:
    """Reset and re-estimate the running statistics of every BatchNorm of ``model`` (in place) on
    ``calib``; every other module runs in eval mode (no dropout). Each module's training flag and
    each BatchNorm's momentum are restored. Returns the names of the recalibrated layers."""
    layers = batchnorm_layers(model)
    if not layers:
        return []
    modes = {m: m.training for m in model.modules()}
    momenta = {bn: bn.momentum for _, bn in layers}
    try:
        model.eval()
        for _, bn in layers:
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average: every calibration batch weighs the same
            bn.train()
        with torch.no_grad():
            for x, _ in calib.batches:
                model(x)
    finally:
        for m, training in modes.items():
            m.training = training
        for bn, momentum in momenta.items():
            bn.momentum = momentum
    return [name for name, _ in layers]


def calibration_loss(model: nn.Module, calib: Calibration, loss_fn) -> float:
    """Mean of ``loss_fn`` over the calibration samples, in eval mode (``evaluate.evaluate``)."""
    return evaluate(model, calib.batches, loss_fn, device=calib.batches[0][0].device)["loss"]


def choose_batchnorm_statistics(model: nn.Module, calib: Calibration, loss_fn, mode: bool | str) -> dict:
    """Apply ``recalibrate_bn`` = ``mode`` to ``model`` (in place); returns what was done, for the report.

    ``True``: recalibrate. ``False``: keep the statistics as they are. ``"auto"``: recalibrate, and
    keep the new statistics only if they lower the loss on the calibration data. Why not always:
    methods that refit the remaining weights by least squares (``reconstruction``, ``energy-aware``)
    reproduce each layer's dense pre-BatchNorm outputs as well as the kept channels allow; the
    dense statistics then map the fit onto the dense scale, while re-estimated ones rescale the fit
    to unit variance and amplify what it could not reproduce (measured on SmallResNet with 75% of
    the last stage removed: energy-aware 79.7% with the dense statistics, 71.2% recalibrated, while
    l1-norm went from 9.0% to 28.1% by recalibrating).
    """
    layers = batchnorm_layers(model)
    if not layers or mode is False:
        return {"mode": mode, "recalibrated": []}
    if mode is True:
        return {"mode": mode, "recalibrated": recalibrate_batchnorm(model, calib)}
    saved = {name: {k: v.clone() for k, v in bn.state_dict().items()} for name, bn in layers}
    stale = calibration_loss(model, calib, loss_fn)
    names = recalibrate_batchnorm(model, calib)
    fresh = calibration_loss(model, calib, loss_fn)
    kept = fresh <= stale
    if not kept:
        for name, bn in layers:
            bn.load_state_dict(saved[name])
    return {
        "mode": mode, "recalibrated": names if kept else [],
        "calibration_loss_stale": stale, "calibration_loss_recalibrated": fresh,
    }


def batchnorm_notes(report: dict, num_samples: int) -> list[str]:
    """Report notes for a ``choose_batchnorm_statistics`` result."""
    if "calibration_loss_stale" in report:
        kept = "re-estimated" if report["recalibrated"] else "kept as they were (re-estimating raised it)"
        return [
            f"BatchNorm statistics {kept}: calibration loss {report['calibration_loss_stale']:.4f} with the "
            f"statistics before, {report['calibration_loss_recalibrated']:.4f} re-estimated on {num_samples} samples"
        ]
    if report["recalibrated"]:
        return [f"BatchNorm statistics re-estimated on the {num_samples} calibration samples ({len(report['recalibrated'])} layers)"]
    return []
