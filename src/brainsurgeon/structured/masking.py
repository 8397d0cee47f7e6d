"""Masked mode: keep the architecture, zero every parameter slice of the removed units.

Zeroing the producer's rows and bias, the BatchNorm's scale and shift, and the consumers' input
columns makes each removed unit contribute exactly nothing, whatever lies between producer and
consumer (even a non-zero-preserving activation), so a masked model computes what the compact
model computes.
"""
from __future__ import annotations

import torch

from .compact import dropped_positions
from .groups import GroupSet


def apply_masks(groups: GroupSet, keep: dict[str, torch.Tensor]) -> None:
    """Zero the removed units' slices in place."""
    with torch.no_grad():
        for (_, axis), (module, drop) in dropped_positions(groups, keep).items():
            if getattr(module, "weight", None) is None:
                continue  # an affine=False norm: the consumers' zeroed columns already drop the unit
            idx = torch.tensor(sorted(drop), dtype=torch.long, device=module.weight.device)
            module.weight.index_fill_(axis, idx, 0.0)
            if axis == 0 and getattr(module, "bias", None) is not None:
                module.bias.index_fill_(0, idx, 0.0)


def unit_state(groups: GroupSet) -> dict[str, torch.Tensor]:
    """A snapshot of every parameter a group touches, to undo trial masks (random search)."""
    saved = {}
    for g in groups:
        for m in g.members:
            for attr in ("weight", "bias"):
                p = getattr(m.module, attr, None)
                if p is not None:
                    saved[f"{id(m.module)}.{attr}"] = p.detach().clone()
    return saved


def restore_state(groups: GroupSet, saved: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for g in groups:
            for m in g.members:
                for attr in ("weight", "bias"):
                    p = getattr(m.module, attr, None)
                    if p is not None:
                        p.copy_(saved[f"{id(m.module)}.{attr}"])
