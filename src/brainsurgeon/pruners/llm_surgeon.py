"""LLM Surgeon (van der Ouderaa, Nagel, van Baalen, Asano & Blankevoort 2024, "The LLM Surgeon",
ICLR 2024, arXiv:2312.17244): multi-shot OBS on the Kronecker-factored Fisher of the whole model,
with one global threshold over all layers and correlated weight updates within each layer.

Curvature. Per layer z = W a (+ b), the Fisher block of the model's loss is F ~ G (x) A (K-FAC:
A = E[a a^T] over the layer's inputs, G = E[g g^T] over the loss gradients at its outputs; for
sequences the tokens are the positions of the KFC convention, see
:mod:`brainsurgeon.curvature.kfac`, where G is called S). The paper uses the empirical Fisher
(data labels); ``fisher`` chooses. Damping is relative and pi-corrected (:func:`~brainsurgeon.
curvature.kfac.damped`), so F^-1 = G_d^-1 (x) A_d^-1 in closed form.

Costs (the loss increase of removing a set Q and optimally updating the rest of the layer),

    L_Q = 1/2 w_Q^T ([F^-1]_QQ)^-1 w_Q,

have closed forms under the Kronecker structure:

    single weight W_ij:  L = W_ij^2 / (2 [G^-1]_ii [A^-1]_jj)
    row i (output):      L = W_i A W_i^T / (2 [G^-1]_ii)          ([F^-1]_QQ = [G^-1]_ii A^-1)
    column j (input):    L = W_:j^T G W_:j / (2 [A^-1]_jj)        ([F^-1]_QQ = [A^-1]_jj G^-1)

with the undamped-sense A, G replaced by their damped versions. The correlated update of the layer
for the removed set Q is

    dW = -F^-1 E_Q (E_Q^T F^-1 E_Q)^-1 E_Q^T w,

in closed form for a set of rows R, dW = -G^-1[:, R] ([G^-1]_RR)^-1 W_R, and for a set of columns
C, dW = -W_:C ([A^-1]_CC)^-1 A^-1[C, :]; for scattered single weights it is the minimiser of the
K-FAC quadratic 1/2 tr(G_d dW A_d dW^T) with W_Q = 0, solved by preconditioned conjugate gradients
(:func:`~brainsurgeon.pruners.kfac.constrained_refit`, exact in the limit; the report gives the
residual). ``granularity`` is "weights" (default: unstructured), "rows" or "columns" (whole
rows / columns of each weight matrix, zeroed in place: the sparsity then counts weights and is
reached by the fewest lowest-cost structures that remove at least the target).

Multi-shot. The target is reached in ``shots`` steps (sparsity s * k / shots at shot k, the last
exactly s); at every shot the K-FAC factors are re-estimated on the current, already pruned and
updated model (one forward and backward pass per calibration batch), the costs of the remaining
weights / structures are computed with them, one global threshold over all layers (or the
per-layer count with ``allocation="uniform"``) picks what is removed, and each layer receives its
correlated update, centred at its current weights. Removed weights stay removed. The optional
low-rank first-order correction of the paper is not implemented.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch

from ..allocation import global_counts, lowest_k_mask, num_pruned, uniform_count
from ..context import PruneContext
from ..curvature.kfac import DEFAULT_DAMPING, DampedFactor, damped, kfac_factors, weight_with_bias
from ..errors import BrainsurgeonError
from ..registry import register
from .base import PruningMethod
from .kfac import _check_fisher_option, _validate_kfac, constrained_refit, obs_saliency

GRANULARITIES = ("weights", "rows", "columns")


# ----------------------------------------------------------------------------- closed forms
def weight_costs(w: torch.Tensor, g: DampedFactor, a: DampedFactor) -> torch.Tensor:
    """L_ij = W_ij^2 / (2 [G^-1]_ii [A^-1]_jj) for the (out, n) weight columns of [W | b]."""
    return obs_saliency(w, g, a)


def row_costs(w: torch.Tensor, g: DampedFactor, a: DampedFactor) -> torch.Tensor:
    """L_i = W_i A W_i^T / (2 [G^-1]_ii) for each row of [W | b] (the whole row, bias included)."""
    return ((w @ a.matrix) * w).sum(1) / (2 * torch.diagonal(g.inverse))


def column_costs(w: torch.Tensor, g: DampedFactor, a: DampedFactor, n: int) -> torch.Tensor:
    """L_j = W_:j^T G W_:j / (2 [A^-1]_jj) for each of the first ``n`` (weight) columns."""
    wn = w[:, :n]
    return ((g.matrix @ wn) * wn).sum(0) / (2 * torch.diagonal(a.inverse)[:n])


def rows_update(w: torch.Tensor, rows: torch.Tensor, g: DampedFactor) -> torch.Tensor:
    """[W | b] after removing the rows ``rows`` (indices) jointly: W - G^-1[:, R] ([G^-1]_RR)^-1 W_R."""
    if rows.numel() == 0:
        return w.clone()
    g_inv = g.inverse
    coef = torch.linalg.solve(g_inv[rows][:, rows], w[rows])
    out = w - g_inv[:, rows] @ coef
    out[rows] = 0.0  # exactly, not up to rounding
    return out


def columns_update(w: torch.Tensor, cols: torch.Tensor, a: DampedFactor) -> torch.Tensor:
    """[W | b] after removing the columns ``cols`` jointly: W - W_:C ([A^-1]_CC)^-1 A^-1[C, :]."""
    if cols.numel() == 0:
        return w.clone()
    a_inv = a.inverse
    coef = torch.linalg.solve(a_inv[cols][:, cols], a_inv[cols])
    out = w - w[:, cols] @ coef
    out[:, cols] = 0.0
    return out


def quadratic_increase(dw: torch.Tensor, g: DampedFactor, a: DampedFactor) -> float:
    """1/2 vec(dW)^T (G_d (x) A_d) vec(dW) = 1/2 tr(G_d dW A_d dW^T): the predicted loss increase."""
    return 0.5 * float(((g.matrix @ dw @ a.matrix) * dw).sum())


# ----------------------------------------------------------------------------- the method
@dataclass
class _Shot:
    """One layer's curvature and weights at the start of a shot."""

    w: torch.Tensor  # [W | b] float64
    g: DampedFactor
    a: DampedFactor
    n: int  # weight columns (the rest is the bias)


def _check_int(name: str, value, top: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not (1 <= value <= top):
        raise BrainsurgeonError(f"{name} must be an integer in [1, {top}], got {value!r}")
    return int(value)


@register("llm-surgeon")
class LLMSurgeon(PruningMethod):
    """The LLM Surgeon (van der Ouderaa et al. 2024, arXiv:2312.17244): K-FAC Fisher F ~ G (x) A
    of the model's loss per layer, OBS costs L_Q = 1/2 w_Q^T ([F^-1]_QQ)^-1 w_Q (single weights:
    W_ij^2 / (2 [G^-1]_ii [A^-1]_jj); rows: W_i A W_i^T / (2 [G^-1]_ii); columns:
    W_:j^T G W_:j / (2 [A^-1]_jj)), one global threshold over all layers, correlated updates
    dW = -F^-1 E_Q (E_Q^T F^-1 E_Q)^-1 E_Q^T w within each layer, in ``shots`` steps with the
    curvature re-estimated on the pruned model at every shot. The formulas are in the module
    docstring.

    Options: ``shots`` (default 5), ``fisher`` ("empirical" as in the paper, "true": sampled
    labels, "exact"), ``granularity`` ("weights", "rows", "columns"), ``cg_iters`` (conjugate-
    gradient iterations of the unstructured correlated update per shot, default 50). Damping:
    the run's ``damping`` relative to the Kronecker product's mean diagonal (default 1e-2, i.e.
    0.1 of each factor's mean diagonal). Use ``allocation="global"`` for the paper's global
    threshold; ``"uniform"`` prunes each layer to the same fraction at every shot.
    """

    summary = "LLM Surgeon (van der Ouderaa et al. 2024): multi-shot K-FAC OBS, global threshold, correlated updates."

    def __init__(self, shots: int = 5, fisher: str = "empirical", granularity: str = "weights", cg_iters: int = 50):
        self.shots = _check_int("shots", shots, 100)
        self.fisher = _check_fisher_option(fisher)
        if granularity not in GRANULARITIES:
            raise BrainsurgeonError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
        self.granularity = granularity
        self.cg_iters = _check_int("cg_iters", cg_iters, 100000)

    def validate(self, ctx: PruneContext) -> None:
        _validate_kfac(ctx, self.fisher)

    def run(self, ctx: PruneContext) -> dict[str, torch.Tensor]:
        pruned = {t.name: torch.zeros_like(t.weight_matrix(), dtype=torch.bool) for t in ctx.targets}
        log = []
        for shot in ctx.track(range(1, self.shots + 1), "LLM Surgeon shots", self.shots):
            fraction = ctx.options.sparsity if shot == self.shots else ctx.options.sparsity * shot / self.shots
            with ctx.timer("statistics"):  # the curvature of the model as it is now
                factors = kfac_factors(
                    ctx.model, ctx.targets, ctx.calib, ctx.loss_fn, self.fisher, ctx.generator, ctx.track
                )
            with ctx.timer("solve"):
                log.append(self._shot(ctx, factors, pruned, fraction))
            del factors
        masks = {t.name: (~pruned[t.name]).reshape(t.weight.shape) for t in ctx.targets}
        ctx.extra_report["target_sparsity"] = {n: float((~m).sum()) / m.numel() for n, m in masks.items()}
        ctx.extra_report["llm_surgeon"] = {
            "shots": log, "fisher": self.fisher, "granularity": self.granularity,
            "damping_relative": ctx.options.damping or DEFAULT_DAMPING,
        }
        return masks

    def _layer(self, ctx: PruneContext, t, factors) -> _Shot:
        """The damped factors of one layer, built when needed: only the raw factors of all layers
        are held (2.4 GB in float64 for SmolLM2-135M's 210 linears; damped matrices and inverses
        of all layers at once would add twice that)."""
        f = factors[t.name]
        a, g = damped(f, ctx.options.damping or DEFAULT_DAMPING, ctx.numerics)
        return _Shot(w=weight_with_bias(t), g=g, a=a, n=f.num_weight_inputs)

    def _costs(self, ctx: PruneContext, factors) -> dict[str, torch.Tensor]:
        """Per layer: single-weight costs (out, n), or row (out,) / column (n,) costs."""
        out = {}
        for t in ctx.targets:
            l = self._layer(ctx, t, factors)
            if self.granularity == "weights":
                out[t.name] = weight_costs(l.w[:, : l.n], l.g, l.a)
            elif self.granularity == "rows":
                out[t.name] = row_costs(l.w, l.g, l.a)
            else:
                out[t.name] = column_costs(l.w, l.g, l.a, l.n)
        return out

    def _shot(self, ctx: PruneContext, factors, pruned: dict, fraction: float) -> dict:
        """Costs, the threshold for ``fraction``, the correlated updates; returns the shot's log."""
        costs = self._costs(ctx, factors)
        if self.granularity == "weights":
            chosen = self._choose_weights(ctx, costs, pruned, fraction)
        else:
            chosen = self._choose_structures(ctx, costs, pruned, fraction)
        predicted, worst_residual = 0.0, 0.0
        for t in ctx.targets:
            new = chosen[t.name]
            if torch.equal(new, pruned[t.name]):
                continue
            l = self._layer(ctx, t, factors)
            w_new, residual = self._update(l, new)
            predicted += quadratic_increase(w_new - l.w, l.g, l.a)
            worst_residual = max(worst_residual, residual)
            pruned[t.name] = new
            _write_back(t, w_new, l.n)
        total = sum(p.numel() for p in pruned.values())
        return {
            "target_sparsity": fraction, "sparsity": sum(int(p.sum()) for p in pruned.values()) / total,
            "predicted_loss_increase": predicted, "cg_relative_residual": worst_residual,
        }

    def _choose_weights(self, ctx, costs, pruned, fraction) -> dict[str, torch.Tensor]:
        scores = {n: c.masked_fill(pruned[n], float("-inf")) for n, c in costs.items()}
        o = ctx.options
        if o.allocation == "global":
            counts = global_counts(scores, fraction, o.max_layer_sparsity)
        else:
            counts = {n: uniform_count(s.numel(), fraction, o.max_layer_sparsity) for n, s in scores.items()}
        return {n: ~lowest_k_mask(s, counts[n]) for n, s in scores.items()}

    def _choose_structures(self, ctx, costs, pruned, fraction) -> dict[str, torch.Tensor]:
        """The fewest lowest-cost rows (columns) removing at least ``fraction`` of the weights: over
        all layers (global) or per layer (uniform); a layer keeps at least one row (column) and at
        most ``max_layer_sparsity`` of its rows (columns) are removed."""
        rows = self.granularity == "rows"
        cands = []  # (cost, layer, index, size)
        for li, (name, cost) in enumerate(costs.items()):
            done = pruned[name].all(1 if rows else 0)
            size = pruned[name].shape[1 if rows else 0]
            cap = min(int(ctx.options.max_layer_sparsity * len(cost) + 1e-9), len(cost) - 1)
            order = torch.argsort(cost.masked_fill(done, float("-inf")), stable=True)[:cap]
            cands += [(float("-inf") if done[i] else float(cost[i]), li, int(i), size) for i in order]
        names = list(costs)
        total = sum(p.numel() for p in pruned.values())
        if ctx.options.allocation == "global":
            need = {None: num_pruned(total, fraction)}
        else:
            need = {name: num_pruned(pruned[name].numel(), fraction) for name in names}
        got = dict.fromkeys(need, 0)
        out = {n: torch.zeros_like(p) for n, p in pruned.items()}
        for cost, li, i, size in sorted(cands, key=lambda c: c[0]):
            key = None if None in need else names[li]
            if got[key] >= need[key]:
                continue
            if rows:
                out[names[li]][i] = True
            else:
                out[names[li]][:, i] = True
            got[key] += size
        return out

    def _update(self, l: _Shot, new: torch.Tensor) -> tuple[torch.Tensor, float]:
        """The correlated update of one layer removing the pruned set ``new`` (out, n)."""
        if self.granularity == "rows":
            return rows_update(l.w, new.all(1).nonzero().squeeze(1), l.g), 0.0
        if self.granularity == "columns":
            return columns_update(l.w, new.all(0).nonzero().squeeze(1), l.a), 0.0
        full = torch.zeros_like(l.w, dtype=torch.bool)
        full[:, : l.n] = new
        res = constrained_refit(l.w, l.w, full, l.g, l.a, self.cg_iters)
        return res.weight, res.relative_residual


def _write_back(t, w: torch.Tensor, n: int) -> None:
    with torch.no_grad():
        t.weight.copy_(w[:, :n].reshape(t.weight.shape).to(t.weight.dtype))
        if n < w.shape[1]:
            t.module.bias.copy_(w[:, n].to(t.module.bias.dtype))
