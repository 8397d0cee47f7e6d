"""Physical removal: slice every member of every group so the network really shrinks.

Each module is cut once along each axis with the union of the positions its groups drop (a
consumer after a ``torch.cat`` loses columns from several groups). The model's interface is
unchanged: only producers' outputs and the matching consumer inputs are cut.
"""
from __future__ import annotations

import torch
from torch import nn

from .groups import NORM_TYPES, GroupSet


def dropped_positions(groups: GroupSet, keep: dict[str, torch.Tensor]) -> dict[tuple[int, int], tuple[nn.Module, set[int]]]:
    """``{(id(module), axis): (module, positions to drop)}`` over all groups."""
    drops: dict[tuple[int, int], tuple[nn.Module, set[int]]] = {}
    for g in groups:
        gone = ~keep[g.name]
        if not gone.any():
            continue
        for m in g.members:
            entry = drops.setdefault((id(m.module), m.axis), (m.module, set()))
            entry[1].update(m.positions_of(gone).tolist())
    return drops


def _kept(size: int, drop: set[int], device) -> torch.Tensor:
    return torch.tensor([i for i in range(size) if i not in drop], dtype=torch.long, device=device)


def _replace(module: nn.Module, attr: str, value: torch.Tensor) -> None:
    old = getattr(module, attr)
    if isinstance(old, nn.Parameter):
        setattr(module, attr, nn.Parameter(value.contiguous(), requires_grad=old.requires_grad))
    else:
        setattr(module, attr, value.contiguous())  # a buffer (running stats)


def slice_module(module: nn.Module, axis: int, drop: set[int]) -> None:
    """Remove ``drop`` along ``axis`` (0: outputs / channels, 1: inputs) of one module."""
    if isinstance(module, NORM_TYPES):  # affine=False norms have running stats but no weight
        keep = _kept(module.num_features, drop, next(iter(module.buffers()), torch.empty(0)).device)
        with torch.no_grad():
            for attr in ("weight", "bias", "running_mean", "running_var"):
                if getattr(module, attr, None) is not None:
                    _replace(module, attr, getattr(module, attr)[keep])
        module.num_features = len(keep)
        return
    w = module.weight
    keep = _kept(w.shape[axis], drop, w.device)
    with torch.no_grad():
        _replace(module, "weight", w.index_select(axis, keep))
        if axis == 0 and module.bias is not None:
            _replace(module, "bias", module.bias[keep])
    n = len(keep)
    if isinstance(module, nn.Linear):
        if axis == 0:
            module.out_features = n
        else:
            module.in_features = n
    elif isinstance(module, nn.Conv2d):
        if module.groups > 1:  # depthwise: its in and out channels are the same units
            module.in_channels = module.out_channels = module.groups = n
        elif axis == 0:
            module.out_channels = n
        else:
            module.in_channels = n


def compact(groups: GroupSet, keep: dict[str, torch.Tensor]) -> None:
    """Slice the model the groups were built on in place (the engine passes its working copy).

    Tied weights (one tensor held by several modules) are sliced identically in every holder
    (``build_groups`` holds other ties fixed) and tied again afterwards: still one parameter."""
    modules = {id(m.module): m.module for g in groups for m in g.members}
    ties: dict[int, list[nn.Module]] = {}
    for m in modules.values():
        if isinstance(getattr(m, "weight", None), torch.Tensor):
            ties.setdefault(id(m.weight), []).append(m)
    for (_, axis), (module, drop) in dropped_positions(groups, keep).items():
        slice_module(module, axis, drop)
    for holders in ties.values():
        for other in holders[1:]:
            if not torch.equal(other.weight, holders[0].weight):  # a bug: build_groups checks the slices
                raise RuntimeError("a tied weight was sliced differently in its holders")
            other.weight = holders[0].weight
