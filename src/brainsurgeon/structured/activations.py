"""Unit activations (and their loss gradients) as the group's consumers read them.

One pass over the calibration batches with forward pre-hooks on one consumer per group; each
group's positions are gathered right in the hook, so only ``(N, units, S)`` per group is kept.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # pragma: no cover
    from .groups import Group, StructuredContext


def gather_units(group: "Group", member, x: torch.Tensor) -> torch.Tensor:
    """``x`` (a consumer's input, ``(N, C, ...)``) at the group's positions: ``(N, units, S)``."""
    picked = x.index_select(1, member.positions.to(x.device))  # ordered by unit, then position
    return picked.reshape(x.shape[0], group.num_units, -1)


def collect_activations(sctx: "StructuredContext", with_grads: bool):
    """``({group: activations}, {group: per-sample gradients} | None)``, float64 on the CPU.

    Gradients are of the per-sample loss: the engine's loss is a batch mean, so dL/da is scaled by
    the batch size (dl_n/da_n = B * dL/da_n).
    """
    ctx = sctx.ctx
    readers = {}
    for g in sctx.groups:
        if not g.consumers:  # output groups are never prunable, so this is a bug
            raise RuntimeError(f"group {g.name} has no consumer layer")
        readers[g.name] = g.consumers[0]
    by_module: dict[int, list] = {}
    for g in sctx.groups:
        by_module.setdefault(id(readers[g.name].module), []).append(g)
    acts: dict[str, list[torch.Tensor]] = {g.name: [] for g in sctx.groups}
    grads: dict[str, list[torch.Tensor]] = {g.name: [] for g in sctx.groups}
    pending: dict[str, torch.Tensor] = {}
    batch_size = [1]

    def make_hook(groups):
        def hook(module, args):
            x = args[0]
            for g in groups:
                a = gather_units(g, readers[g.name], x)
                acts[g.name].append(a.detach().to("cpu", torch.float64))
                if with_grads and x.requires_grad:
                    def keep_grad(grad, name=g.name, member=readers[g.name], group=g):
                        pending[name] = gather_units(group, member, grad).detach() * batch_size[0]
                    x.register_hook(keep_grad)
        return hook

    handles = [
        readers[gs[0].name].module.register_forward_pre_hook(make_hook(gs)) for gs in by_module.values()
    ]
    model = sctx.model
    try:
        for x, y in ctx.track(ctx.calib.batches, "activations", total=len(ctx.calib.batches)):
            batch_size[0] = len(x)
            if with_grads:
                with torch.enable_grad():
                    xin = x.detach().clone().requires_grad_(x.is_floating_point())
                    loss = ctx.loss_fn(model(xin), y)
                    pending.clear()
                    loss.backward()
                model.zero_grad(set_to_none=True)
                for g in sctx.groups:
                    if g.name not in pending:
                        raise RuntimeError(f"no gradient reached the units of {g.name}")
                    grads[g.name].append(pending[g.name].to("cpu", torch.float64))
            else:
                with torch.no_grad():
                    model(x)
    finally:
        for h in handles:
            h.remove()
    out_acts = {k: torch.cat(v) for k, v in acts.items()}
    out_grads = {k: torch.cat(v) for k, v in grads.items()} if with_grads else None
    return out_acts, out_grads
