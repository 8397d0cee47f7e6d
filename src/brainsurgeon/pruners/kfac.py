"""Pruning with the Kronecker-factored Fisher: ``kfac-obd`` (saliencies only) and ``kfac-obs``
(saliencies and compensation), after Martens & Grosse 2015, Grosse & Martens 2016 (convolutions),
Zeng & Urtasun 2018 (MLPrune) and Wang et al. 2019 (EigenDamage).

Notation per layer: [W | b] is (out, d), the Fisher block of its row-major flattening is
F ~ S (x) A (see :mod:`brainsurgeon.curvature.kfac`), damped F_d = S_d (x) A_d.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch

from ..allocation import global_counts, lowest_k_mask, uniform_count
from ..context import PruneContext
from ..curvature.diagonal import check_fisher_loss
from ..curvature.sequence import check_empirical_is_informative
from ..curvature.kfac import (
    _SIGNAL,
    DEFAULT_DAMPING,
    DampedFactor,
    check_fisher_kind,
    check_kfac_layer,
    damped,
    kfac_factors,
    weight_with_bias,
)
from ..errors import BrainsurgeonError, MemoryBudgetError
from ..registry import register
from .base import PruningMethod, SaliencyMethod

#: a factor side above this would need more than 2 GiB in float64
MAX_FACTOR_SIDE = 16384


def _validate_kfac(ctx: PruneContext, fisher: str) -> None:
    check_fisher_loss(_SIGNAL[fisher], ctx.loss_fn, instead="fisher='exact' or 'empirical'")
    check_empirical_is_informative(fisher, ctx.loss_fn, "fisher='true' (a Monte-Carlo GGN) or 'exact'")
    for t in ctx.targets:
        check_kfac_layer(t)
        side = max(t.weight.shape[0], t.weight[0].numel() + 1)
        if side > MAX_FACTOR_SIDE:
            raise MemoryBudgetError(
                f"layer {t.name!r} needs a {side}x{side} K-FAC factor ({side * side * 8 / 2**30:.1f} GiB in float64); "
                f"exclude it with layers={{'exclude': [{t.name!r}]}} or use a diagonal method such as 'obd'"
            )


def _check_fisher_option(fisher) -> str:
    if not isinstance(fisher, str):
        raise BrainsurgeonError(f"fisher must be one of 'true', 'empirical', 'exact'; got {fisher!r}")
    return check_fisher_kind(fisher)


def _factors(ctx: PruneContext, fisher: str):
    return kfac_factors(ctx.model, ctx.targets, ctx.calib, ctx.loss_fn, fisher, ctx.generator, track=ctx.track)


@register("kfac-obd")
class KFACOBD(SaliencyMethod):
    """OBD with the diagonal of the K-FAC Fisher (Martens & Grosse 2015; as a pruning criterion in
    Zeng & Urtasun 2018, MLPrune, and Wang et al. 2019, EigenDamage, "KFAC-OBD"):

        saliency_ij = 1/2 S_ii A_jj W_ij^2,

    the OBD saliency 1/2 F_qq w_q^2 with F_qq = [S (x) A]_(ij)(ij) = S_ii A_jj. ``fisher``: ``"true"``
    (labels sampled from the model, default), ``"empirical"`` (data labels) or ``"exact"`` (the
    expectation over the model's labels). Loss increases, comparable across layers.
    """

    summary = "K-FAC OBD (Martens & Grosse 2015 factors): 1/2 S_ii A_jj W_ij^2."

    def __init__(self, fisher: str = "true"):
        self.fisher = _check_fisher_option(fisher)

    def validate(self, ctx: PruneContext) -> None:
        _validate_kfac(ctx, self.fisher)

    def scores(self, ctx: PruneContext) -> dict[str, torch.Tensor]:
        factors = _factors(ctx, self.fisher)
        out = {}
        for t in ctx.targets:
            f = factors[t.name]
            a_diag = torch.diagonal(f.A)[: f.num_weight_inputs]
            fisher_diag = torch.outer(torch.diagonal(f.S), a_diag)
            out[t.name] = (0.5 * fisher_diag * t.weight_matrix().detach().double() ** 2).reshape(t.weight.shape)
        return out


# ----------------------------------------------------------------------------- K-FAC OBS math
def obs_saliency(w: torch.Tensor, s: DampedFactor, a: DampedFactor) -> torch.Tensor:
    """L_ij = W_ij^2 / (2 [S^-1]_ii [A^-1]_jj) for the (out, n) weight columns of [W | b]
    (OBS, Hassibi & Stork 1993, with [F^-1]_(ij)(ij) = [S_d^-1]_ii [A_d^-1]_jj)."""
    n = w.shape[1]
    return w**2 / (2 * torch.outer(torch.diagonal(s.inverse), torch.diagonal(a.inverse)[:n]))


def single_weight_update(w: torch.Tensor, i: int, j: int, s: DampedFactor, a: DampedFactor) -> torch.Tensor:
    """The OBS update of [W | b] for removing W_ij alone:
    dW = -(W_ij / ([S^-1]_ii [A^-1]_jj)) S^-1[:, i] A^-1[j, :]  (= -w_q F^-1 e_q / [F^-1]_qq)."""
    s_inv, a_inv = s.inverse, a.inverse
    return -(w[i, j] / (s_inv[i, i] * a_inv[j, j])) * torch.outer(s_inv[:, i], a_inv[j, :])


@dataclass
class RefitResult:
    weight: torch.Tensor
    iterations: int
    relative_residual: float


def constrained_refit(
    w0: torch.Tensor,
    w_start: torch.Tensor,
    pruned: torch.Tensor,
    s: DampedFactor,
    a: DampedFactor,
    max_iters: int = 100,
    tol: float = 1e-6,
) -> RefitResult:
    """The joint OBS solution under the K-FAC quadratic model: the [W | b] that minimises

        1/2 vec(W - W0)^T (S_d (x) A_d) vec(W - W0) = 1/2 tr(S_d (W - W0) A_d (W - W0)^T)

    subject to W_q = 0 for every pruned q. Its closed form is the block OBS update
    dw = -F_d^-1 E_Q (E_Q^T F_d^-1 E_Q)^-1 w0_Q (Hassibi & Stork 1993), which needs a |Q| x |Q|
    inverse; it is solved here by conjugate gradients on the free entries instead, preconditioned by
    the free block of F_d^-1 = S_d^-1 (x) A_d^-1 (an SPD principal submatrix, so a valid
    preconditioner; exact when one weight is removed). Starting from a feasible ``w_start``, every
    iterate is feasible and lowers the quadratic, so a truncated solve still improves on plain
    zeroing. ``pruned`` is (out, d) bool (False in the bias column: the bias is compensated).
    """
    free = (~pruned).to(w0.dtype)
    w = w_start * free
    s_mat, a_mat, s_inv, a_inv = s.matrix, a.matrix, s.inverse, a.inverse
    r = -(s_mat @ (w - w0) @ a_mat) * free  # minus the gradient, restricted to the free entries
    z = (s_inv @ r @ a_inv) * free
    p = z.clone()
    rz = float((r * z).sum())
    r0 = rz
    it = 0
    while it < max_iters and rz > (tol**2) * r0 and rz > 0:
        ap = (s_mat @ p @ a_mat) * free
        alpha = rz / float((p * ap).sum())
        w = w + alpha * p
        r = r - alpha * ap
        z = (s_inv @ r @ a_inv) * free
        rz_new = float((r * z).sum())
        p = z + (rz_new / rz) * p
        rz = rz_new
        it += 1
    rel = (rz / r0) ** 0.5 if r0 > 0 else 0.0
    return RefitResult(weight=w * free, iterations=it, relative_residual=rel)


@dataclass
class _Layer:
    """One layer's state during K-FAC OBS."""

    w0: torch.Tensor  # [W | b] before pruning (float64)
    w: torch.Tensor  # current [W | b]
    s: DampedFactor
    a: DampedFactor
    n_weight: int  # columns that belong to W (the rest is the bias)
    pruned: torch.Tensor  # (out, n_weight) bool
    iterations: int = 0
    relative_residual: float = 0.0


@register("kfac-obs")
class KFACOBS(PruningMethod):
    """OBS with the Kronecker-factored Fisher (Hassibi & Stork 1993 on K-FAC blocks, Martens &
    Grosse 2015; the KFAC-OBS criterion of Zeng & Urtasun 2018 and Wang et al. 2019).

    Per layer F_d = S_d (x) A_d (pi-corrected damping, relative ``damping``, default 1e-2), so
    F_d^-1 = S_d^-1 (x) A_d^-1 and [F_d^-1]_(ij)(ij) = [S_d^-1]_ii [A_d^-1]_jj:

        L_ij = W_ij^2 / (2 [S_d^-1]_ii [A_d^-1]_jj)                     (saliency = loss increase)
        dW   = -(W_ij / ([S_d^-1]_ii [A_d^-1]_jj)) S_d^-1[:, i] A_d^-1[j, :]   (one weight removed)

    Removing many weights, the one-at-a-time updates summed do not keep earlier removed weights at
    zero. This method uses the joint (block) OBS form instead: after each of ``obs_steps`` steps, with Q
    all weights removed so far, [W | b] is the minimiser of the K-FAC quadratic
    1/2 tr(S_d (W - W0) A_d (W - W0)^T) subject to W_Q = 0 (``constrained_refit``: preconditioned
    conjugate gradients, at most ``cg_iters`` iterations per step; the exact solution of the block
    formula dw = -F^-1 E_Q (E_Q^T F^-1 E_Q)^-1 w_Q, and the single-weight formula above when
    |Q| = 1). The factors are computed once at the trained weights W0, where the quadratic model is
    centred (gradient ~ 0); between steps the saliencies are recomputed from the compensated
    weights, but with the *undowndated* [S_d^-1]_ii [A_d^-1]_jj: the exact OBS loss of removing q
    after Q is w_q^2 / (2 [(F_RR)^-1]_qq) with F_RR the Fisher restricted to the remaining weights
    R, and (F_RR)^-1 = [F^-1]_RR - [F^-1]_RQ ([F^-1]_QQ)^-1 [F^-1]_QR has no Kronecker form for a
    scattered Q. Since [(F_RR)^-1]_qq <= [F^-1]_qq, the saliencies after the first step are lower
    bounds of the true OBS losses (tested). Measured on LeNet-300-100-style (64-24-16-10, digits),
    4 steps to 0.9: the median ratio saliency / true loss per layer is 0.68-0.91 at step 2 and
    0.32-0.45 at step 4 (uniform); under ``allocation="global"`` the layer already pruned hardest
    is underestimated most (step 4: 0.30 for the first layer at 79% against 0.81 for the last at
    11%), which pushes still more of the sparsity into it. More steps keep each step's estimate
    closer (step 2 is within 10% for most weights). The sparsity grows linearly to the target over the steps; with
    ``allocation="global"`` one threshold over all layers' saliencies chooses each step's weights.
    The bias (not pruned) is compensated through its column in A. Each step warm-starts from the
    previous solution; the report's ``kfac_obs.cg`` gives the iterations and the final relative
    (preconditioned) residual per layer (measured on LeNet-300-100's first layer, 90% in one step:
    the K-FAC quadratic is 0.45 after plain zeroing, 0.31 with the summed single-weight updates,
    0.015 after 10 and 0.0034 after 30 conjugate-gradient iterations).
    """

    summary = "K-FAC OBS: Kronecker-factored Fisher OBS saliencies and joint compensation, in steps."

    def __init__(self, fisher: str = "true", obs_steps: int = 4, cg_iters: int = 25):
        self.fisher = _check_fisher_option(fisher)
        for name, value, top in (("obs_steps", obs_steps, 1000), ("cg_iters", cg_iters, 100000)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not (1 <= value <= top):
                raise BrainsurgeonError(f"{name} must be an integer in [1, {top}], got {value!r}")
        self.obs_steps = int(obs_steps)
        self.cg_iters = int(cg_iters)

    def validate(self, ctx: PruneContext) -> None:
        _validate_kfac(ctx, self.fisher)

    def run(self, ctx: PruneContext) -> dict[str, torch.Tensor]:
        with ctx.timer("statistics"):
            factors = _factors(ctx, self.fisher)
        with ctx.timer("solve"):
            layers = self._layers(ctx, factors)
            del factors  # the damped copies replace them (SmolLM2-135M: 2.4 GB of float64 factors)
            for step in ctx.track(range(1, self.obs_steps + 1), "K-FAC OBS steps", self.obs_steps):
                self._step(ctx, layers, step)
            self._write_back(ctx, layers)
        masks = {t.name: (~layers[t.name].pruned).reshape(t.weight.shape) for t in ctx.targets}
        if ctx.options.allocation == "global":
            ctx.extra_report["target_sparsity"] = {n: float((~m).sum()) / m.numel() for n, m in masks.items()}
        ctx.extra_report["kfac_obs"] = {
            "damping_relative": ctx.options.damping or DEFAULT_DAMPING,
            "obs_steps": self.obs_steps,
            "cg": {n: {"iterations": l.iterations, "relative_residual": l.relative_residual} for n, l in layers.items()},
        }
        return masks

    def _layers(self, ctx: PruneContext, factors) -> dict[str, _Layer]:
        gamma = ctx.options.damping or DEFAULT_DAMPING
        layers = {}
        for t in ctx.targets:
            a, s = damped(factors[t.name], gamma, ctx.numerics)
            w0 = weight_with_bias(t)
            n_weight = factors[t.name].num_weight_inputs
            pruned = torch.zeros(w0.shape[0], n_weight, dtype=torch.bool, device=w0.device)
            layers[t.name] = _Layer(w0=w0, w=w0.clone(), s=s, a=a, n_weight=n_weight, pruned=pruned)
        return layers

    def _step_counts(self, ctx: PruneContext, scores: dict[str, torch.Tensor], step: int) -> dict[str, int]:
        o = ctx.options
        fraction = o.sparsity if step == self.obs_steps else o.sparsity * step / self.obs_steps
        if o.allocation == "global":
            return global_counts(scores, fraction, o.max_layer_sparsity)
        return {name: uniform_count(s.numel(), fraction, o.max_layer_sparsity) for name, s in scores.items()}

    def _step(self, ctx: PruneContext, layers: dict[str, _Layer], step: int) -> None:
        scores = {}
        for name, l in layers.items():
            sal = obs_saliency(l.w[:, : l.n_weight], l.s, l.a)
            # removed weights stay removed: they sort first in every later step
            scores[name] = sal.masked_fill(l.pruned, float("-inf"))
        counts = self._step_counts(ctx, scores, step)
        for name, l in layers.items():
            pruned = ~lowest_k_mask(scores[name], counts[name])
            if torch.equal(pruned, l.pruned):
                continue
            l.pruned = pruned
            full = torch.zeros_like(l.w, dtype=torch.bool)
            full[:, : l.n_weight] = pruned
            res = constrained_refit(l.w0, l.w, full, l.s, l.a, self.cg_iters)
            l.w = res.weight
            l.iterations += res.iterations
            l.relative_residual = max(l.relative_residual, res.relative_residual)

    @staticmethod
    def _write_back(ctx: PruneContext, layers: dict[str, _Layer]) -> None:
        with torch.no_grad():
            for t in ctx.targets:
                l = layers[t.name]
                t.weight.copy_(l.w[:, : l.n_weight].reshape(t.weight.shape).to(t.weight.dtype))
                if l.n_weight < l.w.shape[1]:
                    t.module.bias.copy_(l.w[:, l.n_weight].to(t.module.bias.dtype))
