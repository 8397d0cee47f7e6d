"""Channel pruning by output reconstruction (ThiNet, Luo, Wu & Lin 2017, arXiv:1707.06342; He,
Zhang & Sun 2017, "Channel Pruning for Accelerating Very Deep Neural Networks", arXiv:1707.06168).

A unit u of a group is read by its consumers as the input columns ``cols(u)`` of their weight
matrices (a Linear's inputs; a conv's ``kh*kw`` patch entries of channel u). A consumer computes
z = W a (+ b) from its inputs a (patches for a conv, over every output position), so removing
the set T of units changes its output by

    dz = -sum_{u in T} W_{:, cols(u)} a_{cols(u)},
    E||dz||^2 = sum_{u, v in T} G_uv,   G_uv = sum_{a in cols(u), b in cols(v)} (X^T X)_ab (W^T W)_ab,

with X^T X = (1/N) sum over samples and positions of a a^T (float64). G sums over all consumers
of the group. ThiNet's greedy selection adds, one at a time, the unit whose removal increases
E||dz||^2 least (f(T + u) = f(T) + G_uu + 2 sum_{v in T} G_uv), so units whose contributions
cancel are removed together. Then every consumer refits its remaining columns and its bias by
least squares to reproduce its original output on the calibration data:

    min_{W'_K, b'} (1/N) sum ||W'_K a_K + b' - (W a + b)||^2 + lam ||[W'_K | b']||^2,

solved from the same second moments: [W'_K | b']^T = (C_KK + lam I)^-1 C_K: [W | b]^T, C the
second moment of [a; 1] and lam = ``damping`` times C_KK's mean diagonal (default 1e-4: the
ridge keeps dead inputs finite; recorded in the report). Adding the constant input lets the bias
absorb the mean of what was removed (ReLU outputs are not centred). Statistics are collected on
the unpruned network (one pass; ThiNet's layer-by-layer re-collection is not done).
"""
from __future__ import annotations


import torch
from torch import nn

from ..curvature.diagonal import layer_inputs
from ..errors import BrainsurgeonError
from ..registry import register
from .groups import Group, Member, StructuredContext, StructuredMethod

#: relative ridge of the least-squares refit when the run gives no ``damping``
DEFAULT_RIDGE = 1e-4


def weight_columns(member: Member) -> torch.Tensor:
    """The columns of a consumer's ``weight.reshape(out, -1)`` at each of its positions
    ``(P, k)``: a Linear input is one column, a conv input channel its ``kh*kw`` patch entries."""
    module = member.module
    per_channel = module.weight[0, 0].numel() if isinstance(module, nn.Conv2d) else 1
    pos = member.positions
    cols = pos.unsqueeze(1) * per_channel + torch.arange(per_channel)
    return cols


def input_moments(model: nn.Module, modules: dict[str, nn.Module], calib, track) -> dict[str, torch.Tensor]:
    """C = (1/N) sum over samples and positions of [a; 1][a; 1]^T for every module (float64)."""
    acc: dict[str, torch.Tensor] = {}

    def make_hook(name):
        def hook(module, args):
            a = layer_inputs(module, args[0].detach()).double()
            a = torch.cat([a, torch.ones_like(a[..., :1])], dim=-1).reshape(-1, a.shape[-1] + 1)
            acc[name] = acc.get(name, 0) + a.T @ a
        return hook

    handles = [m.register_forward_pre_hook(make_hook(n)) for n, m in modules.items()]
    try:
        with torch.no_grad():
            for x, _ in track(calib.batches, "input moments", len(calib.batches)):
                model(x)
    finally:
        for h in handles:
            h.remove()
    return {n: c / calib.num_samples for n, c in acc.items()}


def contribution_gram(group: Group, moments: dict[str, torch.Tensor]) -> torch.Tensor:
    """G (num_units x num_units): G_uv = E<dz_u, dz_v> summed over the group's consumers."""
    gram = torch.zeros(group.num_units, group.num_units, dtype=torch.float64)
    for m in group.consumers:
        w = m.module.weight.detach().double().reshape(m.module.weight.shape[0], -1)
        cols = weight_columns(m)  # (units * positions_per_unit, k)
        cols = cols.reshape(group.num_units, -1)  # every column of each unit
        flat = cols.reshape(-1)
        c = moments[m.name][flat][:, flat].cpu()
        ww = (w[:, flat].T @ w[:, flat]).cpu()
        per = cols.shape[1]
        gram += (c * ww).reshape(group.num_units, per, group.num_units, per).sum((1, 3))
    return gram


def greedy_removal(gram: torch.Tensor, count: int) -> torch.Tensor:
    """ThiNet's greedy: the keep-mask after removing ``count`` units, each time the one that
    increases sum_{u,v in T} G_uv least (ties: lowest index)."""
    n = gram.shape[0]
    keep = torch.ones(n, dtype=torch.bool)
    cross = torch.zeros(n, dtype=torch.float64)  # sum_{v in T} G_uv
    diag = torch.diagonal(gram)
    for _ in range(count):
        increase = (diag + 2 * cross).masked_fill(~keep, float("inf"))
        u = int(torch.argmin(increase))
        keep[u] = False
        cross += gram[:, u]
    return keep


def refit_consumer(w_full: torch.Tensor, moment: torch.Tensor, kept_cols: torch.Tensor, ridge: float):
    """Least squares: the [W'_K | b'] (out x (|K| + 1)) reproducing [W | b] [a; 1] from [a_K; 1].

    ``w_full`` is [W | b] (a zero bias column if the layer has none), ``moment`` the second moment of
    [a; 1]; returns (weights, absolute ridge)."""
    d = moment.shape[0]
    idx = torch.cat([kept_cols, torch.tensor([d - 1])])
    c_kk = moment[idx][:, idx]
    lam = ridge * float(torch.diagonal(c_kk).mean())
    lhs = c_kk + lam * torch.eye(len(idx), dtype=c_kk.dtype)
    rhs = moment[idx] @ w_full.T
    return torch.linalg.solve(lhs, rhs).T, lam


@register("reconstruction")
class Reconstruction(StructuredMethod):
    """Channel pruning by reconstruction (ThiNet, Luo et al. 2017; He et al. 2017): greedily remove
    the units whose removal changes the consumers' outputs least,

        T* = argmin_T E|| sum_{u in T} W_{:, cols(u)} a_{cols(u)} ||^2   (greedy, one unit at a time),

    then refit each consumer's remaining weights and bias by (ridge-damped) least squares so it
    reproduces its original output on the calibration data. A unit's stand-alone importance (for
    ``allocation="global"``) is E||W_{:, cols(u)} a_{cols(u)}||^2. ``damping`` is the relative ridge
    (default 1e-4 of the mean diagonal). Formula details in :mod:`brainsurgeon.structured.reconstruction`.
    """

    summary = "ThiNet / He et al. 2017: greedy least-change channel selection + least-squares refit."
    needs = ("activations",)

    def __init__(self, refit: bool = True):
        if not isinstance(refit, bool):
            raise BrainsurgeonError(f"refit must be True or False, got {refit!r}")
        self.refit = refit
        self._moments: dict[str, torch.Tensor] | None = None
        self._grams: dict[str, torch.Tensor] = {}

    def _stats(self, sctx: StructuredContext) -> dict[str, torch.Tensor]:
        if self._moments is None:
            ctx = sctx.ctx
            consumers = {m.name: m.module for g in sctx.groups for m in g.consumers}
            with ctx.timer("statistics"):
                self._moments = input_moments(ctx.model, consumers, ctx.calib, ctx.track)
        return self._moments

    def _gram(self, group: Group, sctx: StructuredContext) -> torch.Tensor:
        if group.name not in self._grams:
            self._grams[group.name] = contribution_gram(group, self._stats(sctx))
        return self._grams[group.name]

    def importance(self, group: Group, sctx: StructuredContext) -> torch.Tensor:
        return torch.diagonal(self._gram(group, sctx)).clamp_min(0).clone()

    def select(self, sctx: StructuredContext, counts: dict[str, int]) -> dict[str, torch.Tensor]:
        return {g.name: greedy_removal(self._gram(g, sctx), counts[g.name]) for g in sctx.groups}

    def compensate(self, sctx: StructuredContext, keep: dict[str, torch.Tensor]) -> None:
        if not self.refit:
            return
        ridge = sctx.ctx.options.damping or DEFAULT_RIDGE
        moments = self._stats(sctx)
        removed: dict[str, tuple[nn.Module, list[torch.Tensor]]] = {}
        for g in sctx.groups:
            for m in g.consumers:
                cols = weight_columns(m).reshape(g.num_units, -1)[~keep[g.name]].reshape(-1)
                removed.setdefault(m.name, (m.module, []))[1].append(cols)
        with torch.no_grad():
            for name, (module, cols) in sctx.ctx.track(removed.items(), "least-squares refit", len(removed)):
                self._refit(sctx, name, module, torch.cat(cols), moments[name].cpu(), ridge)

    @staticmethod
    def _refit(sctx, name, module, removed_cols, moment, ridge) -> None:
        w = module.weight.detach().double().reshape(module.weight.shape[0], -1).cpu()
        bias = module.bias.detach().double().cpu() if module.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
        kept = torch.ones(w.shape[1], dtype=torch.bool)
        kept[removed_cols] = False
        kept_cols = torch.nonzero(kept).squeeze(1)
        # without a bias the constant input cannot be used: switch it off
        m = moment if module.bias is not None else _no_constant(moment)
        new, lam = refit_consumer(torch.cat([w, bias.unsqueeze(1)], 1), m, kept_cols, ridge)
        sctx.ctx.numerics.damp(f"{name}.refit", lam)
        w_new = torch.zeros_like(w)
        w_new[:, kept_cols] = new[:, :-1]
        module.weight.copy_(w_new.reshape(module.weight.shape).to(module.weight))
        if module.bias is not None:
            module.bias.copy_(new[:, -1].to(module.bias))


def _no_constant(moment: torch.Tensor) -> torch.Tensor:
    """The second moment with the constant input switched off (its row/column zero, its diagonal
    one so the system stays regular): the refit then has no bias to use."""
    m = moment.clone()
    m[-1, :] = 0
    m[:, -1] = 0
    m[-1, -1] = 1
    return m
