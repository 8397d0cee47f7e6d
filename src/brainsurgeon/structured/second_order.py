"""Second-order structured criteria: C-OBD (diagonal curvature) and C-OBS (K-FAC), as named by
Wang et al. 2019 (EigenDamage, arXiv:1905.05934, section 2/3) for the structured forms of
Optimal Brain Damage (LeCun, Denker & Solla 1990) and Optimal Brain Surgeon (Hassibi & Stork 1993).

The user-facing names are the unstructured ones: ``bs.prune(model, data, method="obd",
structure="channel")`` runs :class:`StructuredOBD`, ``method="kfac-obs"`` runs
:class:`StructuredKFACOBS` (see :data:`STRUCTURED_VARIANTS`).

C-OBD: removing a unit deletes every parameter of its group; OBD's diagonal assumption makes the
loss increase a sum of independent per-parameter terms,

    L_u = sum_{q in group(u)} 1/2 H_qq w_q^2,

H_qq the exact generalized Gauss-Newton diagonal (or an empirical / Monte-Carlo Fisher diagonal).
The group of unit u is *all* parameters that disappear with it: the producer's row (Linear
neuron / conv filter) and bias, the per-channel BatchNorm weight and bias, a depthwise conv's
channel, and every consumer's input columns of u. All of them are deleted by structured pruning,
so all are counted (LeCun et al. delete a unit by deleting its weights; leaving out the consumer
columns would miss the term that measures what the rest of the network loses).

C-OBS: under the K-FAC block of a producer, F ~ S (x) A for the row-major [W | b] (S: out x out
output-gradient factor, A: input factor incl. the bias column), removing unit i sets the whole
row w_i = [W | b]_i to zero. The OBS problem with the constraints E_Q^T (w + dw) = 0, Q = row i:

    min_dw 1/2 dw^T F dw  s.t.  dw_Q = -w_i
    =>  dw = -F^-1 E_Q (E_Q^T F^-1 E_Q)^-1 w_i,    L = 1/2 w_i^T (E_Q^T F^-1 E_Q)^-1 w_i.

With F^-1 = S^-1 (x) A^-1, the rows-Q block is E_Q^T F^-1 E_Q = [S^-1]_ii A^-1, so

    L_i  = w_i^T A w_i / (2 [S^-1]_ii)
    dW   = -S^-1[:, i] w_i^T / [S^-1]_ii           (every row moves along S^-1's column i;
                                                    row i becomes exactly zero)

and for a set R of rows removed jointly, L_R = 1/2 tr(W_R^T ([S^-1]_RR)^-1 W_R A) and
dW = -S^-1[:, R] ([S^-1]_RR)^-1 W_R. Removing rows one at a time, each time downdating S^-1 by
one Gaussian-elimination step (S^-1 <- S^-1 - S^-1[:, i] S^-1[i, :] / [S^-1]_ii, the inverse of
the problem with row i fixed at zero, as in OBC, Frantar & Alistarh 2022), gives exactly the joint
solution, and lets each next removal be chosen greedily with the updated weights. Across a
residual sum a unit is a row of several producers; their K-FAC blocks are independent, so the
losses add and each producer is compensated with its own factors.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..curvature.diagonal import (
    LayerTaps,
    _accumulate_squared_grads,
    backprop_signals,
    check_fisher_loss,
    layer_inputs,
    layer_output_grads,
)
from ..curvature.kfac import DEFAULT_DAMPING, _SIGNAL, check_fisher_kind, check_kfac_layer, damped, kfac_factors, weight_with_bias
from ..curvature.per_sample import check_curvature
from ..registry import register_variant
from ..distributed import all_reduce_count, all_reduce_sum
from ..errors import BrainsurgeonError
from ..targets import Target
from .groups import NORM_TYPES, Group, Member, StructuredContext, StructuredMethod


# ----------------------------------------------------------------------------- shared helpers
def unit_slices(group: Group, member: Member, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` (shaped like the member's weight) cut per unit like :meth:`Group.unit_weights`:
    ``(num_units, k)``, row u = the entries of unit u."""
    t = tensor.transpose(0, 1) if member.axis == 1 else tensor
    return t[member.positions].reshape(group.num_units, -1)


def unit_vector_slices(group: Group, member: Member, vector: torch.Tensor) -> torch.Tensor:
    """A per-channel vector (bias, BN weight) of a non-consumer member cut per unit ``(num_units, k)``."""
    return vector[member.positions].reshape(group.num_units, -1)


def loss_scale_counts(
    scores: dict[str, torch.Tensor], ratio: float, cap: float
) -> tuple[dict[str, int], list[str]]:
    """Global allocation on scores that are loss increases (comparable across layers as they are):
    one threshold, ``round(ratio * total)`` units overall, at most ``floor(cap * n)`` and never all
    ``n`` units of a group."""
    total = sum(s.numel() for s in scores.values())
    caps = {name: min(math.floor(cap * s.numel() + 1e-9), s.numel() - 1) for name, s in scores.items()}
    k = int(round(ratio * total))
    if k > sum(caps.values()):
        raise BrainsurgeonError(
            f"removing {ratio:g} of the {total} units needs {k} units but the cap max_layer_sparsity={cap} "
            f"(and keeping one unit per layer) allows {sum(caps.values())}; lower the sparsity or raise the cap"
        )
    names = list(scores)
    eligible = [torch.sort(scores[n].double(), stable=True).values[: caps[n]] for n in names]
    owners = torch.cat([torch.full((len(e),), i, dtype=torch.long) for i, e in enumerate(eligible)])
    chosen = owners[torch.argsort(torch.cat(eligible), stable=True)[:k]]
    per_group = torch.bincount(chosen, minlength=len(names))
    counts = {n: int(per_group[i]) for i, n in enumerate(names)}
    capped = [n for n, c in counts.items() if c > 0 and c >= caps[n]]
    return counts, capped


# ----------------------------------------------------------------------------- diagonal curvature
@dataclass(frozen=True)
class ParamDiagonals:
    """Diagonal curvature of every parameter of the given modules: ``diag[module][param]`` is shaped
    like the parameter (``"weight"``, ``"bias"``), float64."""

    diag: dict[str, dict[str, torch.Tensor]]
    num_samples: int


def _norm_inputs_normalized(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x_hat = (x - running_mean) / sqrt(running_var + eps): what an eval-mode BatchNorm scales by
    its weight, so that d out/d weight = x_hat and d out/d bias = 1."""
    shape = (1, -1) + (1,) * (x.dim() - 2)
    mean = module.running_mean.double().view(shape)
    var = module.running_var.double().view(shape)
    return (x.double() - mean) / torch.sqrt(var + module.eps)


def _check_norm(name: str, module: nn.Module) -> None:
    if module.training or module.running_mean is None:
        raise BrainsurgeonError(
            f"BatchNorm {name!r} has no running statistics (track_running_stats=False): its per-sample "
            "curvature is not defined; use a first-order criterion (e.g. 'l1') for this model"
        )


def parameter_diagonals(
    model: nn.Module, modules: dict[str, nn.Module], calib, loss_fn, curvature: str, generator, track
) -> ParamDiagonals:
    """Exact GGN (``"ggn"``), empirical Fisher (``"empirical"``) or MC Fisher (``"fisher"``) diagonal
    over the weights and biases of Linear/Conv2d modules and the affine parameters of BatchNorms.

    The same per-sample decomposition as :mod:`brainsurgeon.curvature.diagonal`: for a pseudo-loss
    r_ik back-propagated as the signal s at a module's output, the per-sample gradients are
    weight: sum_t s_t a_t^T, bias: sum_t s_t, BN weight: sum_t s_t * x_hat_t, BN bias: sum_t s_t,
    and the diagonal is (1/N) sum_ik (gradient)^2, accumulated in float64.
    """
    kind = check_curvature(curvature)
    check_fisher_loss(kind, loss_fn)
    for name, m in modules.items():
        if isinstance(m, NORM_TYPES):
            _check_norm(name, m)
    acc: dict[str, dict[str, torch.Tensor]] = {}
    for name, m in modules.items():
        entry = {}
        if getattr(m, "weight", None) is not None:
            entry["weight"] = torch.zeros(m.weight.shape[0], m.weight[0].numel(), dtype=torch.float64, device=m.weight.device)
        if getattr(m, "bias", None) is not None:
            entry["bias"] = torch.zeros(m.bias.shape, dtype=torch.float64, device=m.bias.device)
        acc[name] = entry
    taps = LayerTaps([Target(name, m) for name, m in modules.items()])
    for x, y in track(calib.batches, f"group diagonal {kind}", len(calib.batches)):
        with torch.enable_grad(), taps:
            out = model(x)
        signals = backprop_signals(loss_fn, out, y, kind, generator)
        for k in range(signals.shape[0]):
            grads = taps.output_grads(out, signals[k].to(out.dtype), retain_graph=k < signals.shape[0] - 1)
            for name, m in modules.items():
                _accumulate_module(m, taps.inputs[name], grads[name], acc[name])
    n = all_reduce_count(calib.num_samples)  # several ranks: sums over every shard (distributed.py)
    diag = {
        name: {p: (all_reduce_sum(v) / n).reshape(getattr(modules[name], p).shape) for p, v in entry.items()}
        for name, entry in acc.items()
    }
    return ParamDiagonals(diag=diag, num_samples=n)


def _accumulate_module(m: nn.Module, x: torch.Tensor, g: torch.Tensor, acc: dict[str, torch.Tensor]) -> None:
    """Add this batch's squared per-sample gradients of ``m``'s parameters to ``acc``."""
    if isinstance(m, NORM_TYPES):
        s = g.double().reshape(g.shape[0], g.shape[1], -1)  # (B, C, positions)
        if "weight" in acc:
            x_hat = _norm_inputs_normalized(m, x).reshape(s.shape)
            acc["weight"] += ((s * x_hat).sum(-1) ** 2).sum(0).unsqueeze(1)
        if "bias" in acc:
            acc["bias"] += (s.sum(-1) ** 2).sum(0)
        return
    s = layer_output_grads(m, g)  # (B, T, out)
    _accumulate_squared_grads(m, layer_inputs(m, x), s, acc["weight"])
    if "bias" in acc:
        acc["bias"] += (s.double().sum(1) ** 2).sum(0)


def _group_modules(groups) -> dict[str, nn.Module]:
    mods: dict[str, nn.Module] = {}
    for g in groups:
        for m in g.members:
            mods.setdefault(m.name, m.module)
    return mods


def group_obd_saliency(group: Group, diags: ParamDiagonals) -> torch.Tensor:
    """L_u = sum over the group's parameters of unit u of 1/2 H_qq w_q^2 (float64, ``(num_units,)``)."""
    total = torch.zeros(group.num_units, dtype=torch.float64)
    for m in group.members:
        d = diags.diag[m.name]
        w = m.module.weight.detach().double()
        sal = 0.5 * d["weight"].to(w.device) * w**2
        total += unit_slices(group, m, sal).sum(1).cpu()
        if m.role != "in" and "bias" in d:
            b = m.module.bias.detach().double()
            total += unit_vector_slices(group, m, 0.5 * d["bias"].to(b.device) * b**2).sum(1).cpu()
    return total


def _check_option(name: str, value, choices) -> str:
    if not isinstance(value, str) or value not in choices:
        raise BrainsurgeonError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


class LossIncreaseAllocation(StructuredMethod):
    """Structured methods whose unit scores are loss increases: under ``allocation="global"`` they
    are comparable across layers as they are, so one threshold goes over the raw scores (no
    per-layer normalization)."""

    def allocate(self, sctx: StructuredContext):
        o = sctx.ctx.options
        if o.allocation == "global":
            scores = {g.name: self.scores_of(g, sctx) for g in sctx.groups}
            return loss_scale_counts(scores, o.sparsity, o.max_layer_sparsity)
        return super().allocate(sctx)


@register_variant("obd", "channel")
class StructuredOBD(LossIncreaseAllocation):
    """C-OBD: structured Optimal Brain Damage (LeCun, Denker & Solla 1990; the C-OBD baseline of
    Wang et al. 2019, EigenDamage). A unit's saliency is the OBD loss increase of deleting all
    parameters of its group (producer row and bias, BatchNorm weight and bias, consumer columns):

        L_u = sum_{q in group(u)} 1/2 H_qq w_q^2,

    H_qq the exact GGN diagonal (``curvature="ggn"``, default), the empirical Fisher diagonal
    (``"empirical"``) or a Monte-Carlo true Fisher diagonal (``"fisher"``). Scores are loss
    increases, so ``allocation="global"`` uses them unnormalized (one threshold, per-layer cap).
    No weight is updated.
    """

    summary = "C-OBD: structured OBD, sum of 1/2 H_qq w_q^2 (diag GGN) over each unit's group."

    def __init__(self, curvature: str = "ggn"):
        if not isinstance(curvature, str):
            raise BrainsurgeonError(f"curvature must be one of 'ggn', 'empirical', 'fisher'; got {curvature!r}")
        self.curvature = check_curvature(curvature)
        self._diags: ParamDiagonals | None = None

    def validate(self, ctx) -> None:
        check_fisher_loss(self.curvature, ctx.loss_fn)

    def check(self, sctx: StructuredContext) -> None:
        for name, m in _group_modules(sctx.groups).items():
            if isinstance(m, NORM_TYPES):
                _check_norm(name, m)

    def _diagonals(self, sctx: StructuredContext) -> ParamDiagonals:
        if self._diags is None:
            ctx = sctx.ctx
            with ctx.timer("statistics"):
                self._diags = parameter_diagonals(
                    ctx.model, _group_modules(sctx.groups), ctx.calib, ctx.loss_fn, self.curvature,
                    ctx.generator, ctx.track,
                )
        return self._diags

    def importance(self, group: Group, sctx: StructuredContext) -> torch.Tensor:
        return group_obd_saliency(group, self._diagonals(sctx))


# ----------------------------------------------------------------------------- C-OBS
def row_removal_loss(w: torch.Tensor, s_inv: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """L_i = w_i^T A w_i / (2 [S^-1]_ii) for every row i of [W | b] (``(out,)``)."""
    return ((w @ a) * w).sum(1) / (2 * torch.diagonal(s_inv))


def row_removal_update(w: torch.Tensor, s_inv: torch.Tensor, i: int) -> torch.Tensor:
    """dW = -S^-1[:, i] w_i^T / [S^-1]_ii: the OBS compensation of removing row i (row i -> 0)."""
    return -torch.outer(s_inv[:, i], w[i]) / s_inv[i, i]


def joint_rows_removal(w: torch.Tensor, s_inv: torch.Tensor, a: torch.Tensor, rows: torch.Tensor):
    """Block OBS for the rows ``rows`` removed together: ``(dW, L)`` with
    dW = -S^-1[:, R] ([S^-1]_RR)^-1 W_R,  L = 1/2 tr(W_R^T ([S^-1]_RR)^-1 W_R A)."""
    k = torch.linalg.solve(s_inv[rows][:, rows], w[rows])
    return -s_inv[:, rows] @ k, 0.5 * float(((k @ a) * w[rows]).sum())


def downdate_inverse(s_inv: torch.Tensor, i: int) -> torch.Tensor:
    """S^-1 of the problem with row i held at zero: one Gaussian-elimination step."""
    return s_inv - torch.outer(s_inv[:, i], s_inv[i, :]) / s_inv[i, i]


@dataclass
class _Producer:
    """One producer of a group under C-OBS: its [W | b], damped K-FAC factors, and unit rows."""

    member: Member
    w: torch.Tensor  # (out, d) float64, compensated in place
    s_inv: torch.Tensor  # (out, out), downdated as rows are removed
    a: torch.Tensor  # (d, d) damped input factor
    rows: torch.Tensor  # (num_units,) row of each unit

    def losses(self) -> torch.Tensor:
        rows = self.rows
        w = self.w[rows]
        diag = torch.diagonal(self.s_inv)[rows]
        out = ((w @ self.a) * w).sum(1) / (2 * diag.clamp_min(torch.finfo(diag.dtype).tiny))
        return out

    def remove(self, unit: int) -> None:
        i = int(self.rows[unit])
        self.w += row_removal_update(self.w, self.s_inv, i)
        self.s_inv = downdate_inverse(self.s_inv, i)
        # row i and its row/column of the downdated inverse are zero in exact arithmetic; make
        # them exactly zero so later updates leave removed rows untouched
        self.w[i] = 0.0
        self.s_inv[i] = 0.0
        self.s_inv[:, i] = 0.0


@register_variant("kfac-obs", "channel")
class StructuredKFACOBS(LossIncreaseAllocation):
    """C-OBS: structured Optimal Brain Surgeon with the K-FAC Fisher (Hassibi & Stork 1993;
    Martens & Grosse 2015; the C-OBS baseline of Wang et al. 2019, EigenDamage).

    Per producer F ~ S_d (x) A_d (pi-corrected relative damping ``damping``, default 1e-2, as in
    ``kfac-obs``); removing unit i (row i of [W | b]) costs and compensates

        L_i = w_i^T A w_i / (2 [S^-1]_ii),      dW = -S^-1[:, i] w_i^T / [S^-1]_ii

    (derivation in the module docstring). Within each group the units are removed greedily one
    at a time, lowest current L first, each removal followed by its compensation and a downdate of
    S^-1 (together the exact joint OBS solution for the chosen rows); a unit shared by several
    producers (a residual sum) sums their losses. ``fisher``: ``"true"`` (sampled labels,
    default), ``"empirical"`` or ``"exact"``. Scores (the initial L) are loss increases, so
    ``allocation="global"`` compares them unnormalized. The consumers are not changed.
    """

    summary = "C-OBS: structured K-FAC OBS, L = w_i^T A w_i / (2 [S^-1]_ii), rows compensated."

    def __init__(self, fisher: str = "true"):
        if not isinstance(fisher, str):
            raise BrainsurgeonError(f"fisher must be one of 'true', 'empirical', 'exact'; got {fisher!r}")
        self.fisher = check_fisher_kind(fisher)
        self._producers: dict[str, list[_Producer]] | None = None

    def validate(self, ctx) -> None:
        check_fisher_loss(_SIGNAL[self.fisher], ctx.loss_fn, instead="fisher='exact' or 'empirical'")

    def check(self, sctx: StructuredContext) -> None:
        for g in sctx.groups:
            for m in g.producers:
                check_kfac_layer(Target(m.name, m.module))
                rows_per_unit = len(m.positions) // g.num_units
                if rows_per_unit != 1:
                    raise BrainsurgeonError(f"C-OBS needs one output row per unit; {m.name!r} has {rows_per_unit}")

    def _state(self, sctx: StructuredContext) -> dict[str, list[_Producer]]:
        if self._producers is not None:
            return self._producers
        ctx = sctx.ctx
        names = {}
        for g in sctx.groups:
            for m in g.producers:
                names.setdefault(m.name, m.module)
        targets = [Target(n, mod) for n, mod in names.items()]
        with ctx.timer("statistics"):
            factors = kfac_factors(ctx.model, targets, ctx.calib, ctx.loss_fn, self.fisher, ctx.generator, track=ctx.track)
        gamma = ctx.options.damping or DEFAULT_DAMPING
        state = {}
        for g in sctx.groups:
            producers = []
            for m in g.producers:
                a, s = damped(factors[m.name], gamma, ctx.numerics)
                w = weight_with_bias(Target(m.name, m.module))
                producers.append(_Producer(m, w, s.inverse.clone(), a.matrix, m.positions.view(g.num_units)))
            state[g.name] = producers
        self._producers = state
        return state

    def importance(self, group: Group, sctx: StructuredContext) -> torch.Tensor:
        producers = self._state(sctx)[group.name]
        return sum(p.losses() for p in producers).cpu()

    def select(self, sctx: StructuredContext, counts: dict[str, int]) -> dict[str, torch.Tensor]:
        state = self._state(sctx)
        keep = {}
        with sctx.ctx.timer("solve"):
            for g in sctx.ctx.track(sctx.groups, "C-OBS groups", len(sctx.groups)):
                producers = state[g.name]
                alive = torch.ones(g.num_units, dtype=torch.bool)
                for _ in range(counts[g.name]):
                    losses = sum(p.losses() for p in producers).cpu().masked_fill(~alive, float("inf"))
                    u = int(torch.argmin(losses))
                    for p in producers:
                        p.remove(u)
                    alive[u] = False
                keep[g.name] = alive
        return keep

    def compensate(self, sctx: StructuredContext, keep: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for g in sctx.groups:
                for p in self._state(sctx)[g.name]:
                    mod = p.member.module
                    n = mod.weight[0].numel()
                    mod.weight.copy_(p.w[:, :n].reshape(mod.weight.shape).to(mod.weight.dtype))
                    if mod.bias is not None:
                        mod.bias.copy_(p.w[:, n].to(mod.bias.dtype))


#: structured variants of unstructured method names: ``method="obd", structure="channel"``
STRUCTURED_VARIANTS: dict[str, type[StructuredMethod]] = {
    "obd": StructuredOBD,
    "kfac-obs": StructuredKFACOBS,
}
