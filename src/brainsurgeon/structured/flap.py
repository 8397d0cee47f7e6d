"""FLAP: fluctuation-based structured pruning with bias compensation (An, Zhao, Yu, Tang & Wang
2024, "Fluctuation-based Adaptive Structured Pruning for Large Language Models", AAAI,
arXiv:2312.11983). Training-free: one forward pass over the calibration data.

For an input channel j of the output projection W (o for heads, down for neurons) with inputs x_j
over the calibration tokens, removing j and adding its mean contribution to the bias changes the
output by W_{:,j} (x_j - E x_j): the *fluctuation*

    S_j = Var(x_j) * ||W_{:,j}||^2,        b' = b + sum_{j removed} W_{:,j} E[x_j].

A head's score is the sum over its columns. FLAP's adaptive structure search standardizes the
scores of each unit type over the whole model, z = (S - mean) / std (heads and neurons
separately), and removes units in ascending z, whatever they cost, until the budget is met
(``search="order"``); the scores handed to the allocation are z - min z (same order, >= 0).
A projection without a bias gets one (zeros plus the compensation).
"""
from __future__ import annotations

import torch
from torch import nn

from ..registry import register
from .transformer_engine import TransformerContext, TransformerMethod
from .transformer_stats import flat, frozen


def input_moments(tctx: TransformerContext) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{projection name: (mean, variance)} of o's and down's input channels (float64)."""
    mods = {}
    for u in tctx.layers:
        mods[u.o.name], mods[u.mlp_out.name] = u.o.module, u.mlp_out.module
    acc: dict[str, list] = {}

    def hook(name):
        def f(module, args):
            x = flat(args[0].detach())
            s = acc.setdefault(name, [0, torch.zeros(x.shape[1], dtype=torch.float64), torch.zeros(x.shape[1], dtype=torch.float64)])
            s[0] += x.shape[0]
            s[1] += x.sum(0).cpu()
            s[2] += x.pow(2).sum(0).cpu()
        return f

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in mods.items()]
    try:
        with torch.no_grad(), frozen(tctx.model):
            for x, _ in tctx.track(tctx.calib.batches, "FLAP statistics", len(tctx.calib.batches)):
                tctx.view(x)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for n, (count, s1, s2) in acc.items():
        mean = s1 / count
        out[n] = (mean, (s2 / count - mean.pow(2)).clamp_min(0) * count / max(count - 1, 1))
    return out


@register("flap")
class FLAP(TransformerMethod):
    """FLAP (An et al. 2024, arXiv:2312.11983): fluctuation S_j = Var(x_j) ||W_{:,j}||^2 of each
    input channel of o / down (a head sums its columns), removed channels' mean contribution
    added to the bias: b' = b + sum_{j removed} W_{:,j} E[x_j]. Training-free, one forward pass."""

    summary = "An et al. 2024 (FLAP): fluctuation Var(x_j)||W_:,j||^2 of o/down inputs + bias compensation."
    search = "order"

    def __init__(self, compensate_bias: bool = True):
        if not isinstance(compensate_bias, bool):
            from ..errors import BrainsurgeonError

            raise BrainsurgeonError(f"flap: compensate_bias must be True or False, got {compensate_bias!r}")
        self.compensate_bias = compensate_bias
        self._moments = None

    def scores(self, tctx: TransformerContext) -> dict[str, torch.Tensor]:
        self._moments = input_moments(tctx)
        out = {}
        for u in tctx.layers:
            for proj, key, per in ((u.o, u.heads_key, u.q_heads_per_unit * u.head_dim), (u.mlp_out, u.neurons_key, 1)):
                w2 = proj.weight_oi().detach().double().pow(2).sum(0).cpu()
                s = self._moments[proj.name][1] * w2
                out[key] = s.view(-1, per).sum(1)
        return standardized(out)

    def compensate(self, tctx: TransformerContext, keep: dict[str, torch.Tensor]) -> None:
        if not self.compensate_bias:
            return
        with torch.no_grad():
            for u in tctx.layers:
                for proj, key, per in ((u.o, u.heads_key, u.q_heads_per_unit * u.head_dim), (u.mlp_out, u.neurons_key, 1)):
                    dead = (~keep[key]).repeat_interleave(per)
                    if not dead.any():
                        continue
                    w = proj.weight_oi().detach().double().cpu()
                    delta = w[:, dead] @ self._moments[proj.name][0][dead]
                    ensure_bias(proj.module)
                    proj.module.bias.add_(delta.to(proj.module.bias))


def standardized(scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per unit type (keys ending in ``.heads`` / ``.neurons``) z-scores over the whole model,
    shifted together so the smallest is 0 (FLAP's standardization; the order is what counts)."""
    out = {}
    for kind in (".heads", ".neurons"):
        keys = [k for k in scores if k.endswith(kind)]
        allv = torch.cat([scores[k] for k in keys])
        mean, std = allv.mean(), allv.std() if allv.numel() > 1 else torch.ones(())
        std = std if std > 0 else torch.ones(())
        out.update({k: (scores[k] - mean) / std for k in keys})
    low = min(float(v.min()) for v in out.values())
    return {k: v - low for k, v in out.items()}


def ensure_bias(module: nn.Module) -> None:
    """Give a projection without a bias a zero bias (nn.Linear reads ``self.bias``)."""
    if getattr(module, "bias", None) is None:
        out = module.weight.shape[0] if isinstance(module, nn.Linear) else module.weight.shape[1]
        module.bias = nn.Parameter(torch.zeros(out, dtype=module.weight.dtype, device=module.weight.device))
