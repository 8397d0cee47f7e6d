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
