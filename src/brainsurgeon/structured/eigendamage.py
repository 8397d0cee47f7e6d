"""EigenDamage: structured pruning in the Kronecker-factored eigenbasis (Wang, Grosse, Fidler &
Zhang 2019, arXiv:1905.05934), with the EKFAC eigenvalues of George et al. 2018 (arXiv:1806.03884)
as an option.

Per layer z = W a (+ b), K-FAC gives F ~ S (x) A with A = E[a a^T] (inputs) and S = E[s s^T]
(output gradients). With the eigendecompositions A = Q_A diag(lambda_A) Q_A^T and
S = Q_S diag(lambda_S) Q_S^T, reparametrize W = Q_S W' Q_A^T, i.e.

    W' = Q_S^T W Q_A.

In these coordinates the K-FAC Fisher is exactly diagonal, diag(lambda_S (x) lambda_A), so OBD is
accurate there: the importance of W'_ij is

    I_ij = 1/2 (W'_ij)^2 lambda_S_i lambda_A_j          (K-FAC eigenvalues), or
    I_ij = 1/2 (W'_ij)^2 lambda_ij,  lambda_ij = E[((Q_S^T s)(Q_A^T a)^T)_ij^2]   (``ekfac=True``),

the EKFAC re-estimate of the diagonal in the eigenbasis (for a conv, of every kernel tap:
the per-sample gradient G_n = sum_t s_nt a_nt^T rotated per tap). A row i of W' (an output
eigen-direction) scores sum_j I_ij, a column j (an input eigen-direction) sum_i I_ij. One global
percentile over all rows and columns of all layers, each side of a layer capped at
``max_layer_sparsity`` of its directions (never all), removes the least important; the layer
becomes

    Q_A^T (in -> r_A) -> W'_kept (r_A -> r_S) -> Q_S (r_S -> out)

(Linear: three Linears; Conv2d: a 1x1 conv, the k x k conv, a 1x1 conv; the original bias sits
on the last one). Where that is not the smallest exact form of the pruned layer, Q_A or Q_S is
multiplied into W' (two layers) or all three are (one dense layer): the cheapest of the four is
used, so a layer only changes form when that lowers its parameter count. The global percentile
is found by bisection so that the target layers' weights shrink by ``sparsity`` (counted in the
final model, rotations included).

Departures from the paper, and why: (1) for a conv the input factor is over *channels*, as in
the paper's conv decomposition into 1x1 - kxk - 1x1 convolutions: A = the per-tap average of KFC's
patch factor, (1/N) sum_n sum_t (1/(kh kw)) sum_k x_ntk x_ntk^T over the patches at the output
positions t (as the reference normalises its patches by spatial and patch size; see
:func:`channel_inputs`), with the KFC convention of :mod:`brainsurgeon.curvature.kfac` for S (mean
over output positions), so a conv's importances are on the scale of its Fisher. (2) the bias is
kept outside the rotation (no homogeneous coordinate in A): the first projection then has no
bias, so it commutes with the next convolution's padding and the decomposition is exact.
(3) one-shot: the paper iterates prune / fine-tune / recompute.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from ..batchnorm import batchnorm_notes, choose_batchnorm_statistics
from ..curvature.diagonal import (
    LayerTaps,
    _accumulate_squared_grads,
    backprop_signals,
    check_fisher_loss,
    layer_inputs,
    layer_output_grads,
)
from ..curvature.kfac import _SIGNAL, check_fisher_kind, check_kfac_layer, factor_sums
from ..errors import BrainsurgeonError
from ..memory import LIBC
from ..registry import register
from ..targets import Target
from .groups import WholeModelMethod

FORMS = ("dense", "merge-A", "merge-S", "three")


# ----------------------------------------------------------------------------- statistics
@dataclass
class EigenBasis:
    """One layer's K-FAC eigenbasis: A = Q_A diag(lam_A) Q_A^T (inputs / input channels),
    S = Q_S diag(lam_S) Q_S^T (outputs), and optionally the EKFAC eigenvalues ``lam`` shaped like
    the weight."""

    q_a: torch.Tensor
    lam_a: torch.Tensor
    q_s: torch.Tensor
    lam_s: torch.Tensor
    ekfac: torch.Tensor | None = None


def channel_inputs(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Rows whose sum of outer products is the layer's input factor (times N): for a Linear the
    inputs, (B * positions, in); for a conv the input channels of every tap of every patch the
    kernel sees at the *output* positions (padding included), scaled by 1/sqrt(kh * kw), so that

        A_ch = (1/N) sum_n sum_t (1/(kh kw)) sum_k x_ntk x_ntk^T        (C_in x C_in),

    the per-tap average of the diagonal blocks of KFC's patch factor A = (1/N) sum_n sum_t a a^T
    (exactly: tr(A) = kh kw tr(A_ch)). Summing over the H_in W_in input positions instead would
    inflate a conv's importances by about H_in W_in / (H_out W_out) (5x for stride 2)."""
    if isinstance(module, nn.Conv2d):
        patches = layer_inputs(module, x)  # (B, T_out, C_in * kh * kw), channel-major
        taps = module.weight[0, 0].numel()
        rows = patches.reshape(*patches.shape[:2], x.shape[1], taps).transpose(2, 3)  # (B, T, taps, C_in)
        return rows.reshape(-1, x.shape[1]) / math.sqrt(taps)
    return x.reshape(-1, x.shape[-1])


def rotate_channels(module: nn.Module, x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """x with its channel / feature axis multiplied by q^T: Q^T a for every input vector a."""
    if isinstance(module, nn.Conv2d):
        return torch.einsum("bc...,ca->ba...", x, q)
    return x @ q


def kfac_channel_factors(model, targets: list[Target], calib, loss_fn, kind: str, generator, track):
    """{name: (A, S)} in float64: A over input channels (conv) / inputs (Linear), S over outputs."""
    return factor_sums(
        model, targets, calib, loss_fn, kind, generator, track,
        lambda t, x: channel_inputs(t.module, x).double(),
    )


def eigenbasis(a: torch.Tensor, s: torch.Tensor) -> EigenBasis:
    """Eigendecompositions of the (PSD) factors; round-off negative eigenvalues are set to zero."""
    lam_a, q_a = torch.linalg.eigh(a)
    lam_s, q_s = torch.linalg.eigh(s)
    return EigenBasis(q_a=q_a, lam_a=lam_a.clamp_min(0), q_s=q_s, lam_s=lam_s.clamp_min(0))


def ekfac_eigenvalues(model, targets: list[Target], bases: dict[str, EigenBasis], calib, loss_fn, kind, generator, track):
    """lambda = (1/N) sum_n sum_k (Q_S^T G_nk Q_A)^2 per weight entry (per tap for a conv), float64:
    the per-sample gradients are formed from rotated inputs and rotated output gradients."""
    acc = {t.name: torch.zeros(t.weight.shape[0], t.weight[0].numel(), dtype=torch.float64) for t in targets}
    taps = LayerTaps(targets)
    for x, y in track(calib.batches, "EKFAC eigenvalues", len(calib.batches)):
        with torch.enable_grad(), taps:
            out = model(x)
        rotated = {
            t.name: layer_inputs(t.module, rotate_channels(t.module, taps.inputs[t.name].double(), bases[t.name].q_a))
            for t in targets
        }
        signals = backprop_signals(loss_fn, out, y, kind, generator)
        for k in range(signals.shape[0]):
            grads = taps.output_grads(out, signals[k].to(out.dtype), retain_graph=k < signals.shape[0] - 1)
            for t in targets:
                s = layer_output_grads(t.module, grads[t.name]).double() @ bases[t.name].q_s
                _accumulate_squared_grads(t.module, rotated[t.name], s, acc[t.name])
    return {t.name: (acc[t.name] / calib.num_samples).reshape(t.weight.shape) for t in targets}


# ----------------------------------------------------------------------------- the eigenbasis
def to_eigenbasis(w: torch.Tensor, basis: EigenBasis) -> torch.Tensor:
    """W' = Q_S^T W Q_A (for a conv, per kernel tap)."""
    return torch.einsum("oi...,os,ia->sa...", w.double(), basis.q_s, basis.q_a)


def from_eigenbasis(w_rot: torch.Tensor, q_s: torch.Tensor, q_a: torch.Tensor) -> torch.Tensor:
    """W = Q_S W' Q_A^T (per tap); with column subsets of Q the pruned layer's dense weight."""
    return torch.einsum("sa...,os,ia->oi...", w_rot, q_s, q_a)


def importance(w_rot: torch.Tensor, basis: EigenBasis) -> torch.Tensor:
    """I = 1/2 W'^2 lam (EKFAC) or 1/2 W'^2 lam_S_i lam_A_j (K-FAC), summed over kernel taps:
    (out, in)."""
    if basis.ekfac is not None:
        imp = 0.5 * w_rot**2 * basis.ekfac
    else:
        lam = torch.outer(basis.lam_s, basis.lam_a)
        imp = 0.5 * w_rot**2 * lam.reshape(*lam.shape, *([1] * (w_rot.dim() - 2)))
    return imp.reshape(imp.shape[0], imp.shape[1], -1).sum(-1)


# ----------------------------------------------------------------------------- decomposition
def form_params(module: nn.Module, r_s: int, r_a: int) -> dict[str, int]:
    """Weight parameters of each exact form of the pruned layer (r_s rows, r_a columns kept)."""
    out, cin = module.weight.shape[:2]
    kk = module.weight[0, 0].numel()
    return {
        "dense": out * cin * kk,
        "merge-A": cin * r_s * kk + r_s * out,
        "merge-S": cin * r_a + r_a * out * kk,
        "three": cin * r_a + r_a * r_s * kk + r_s * out,
    }


def cheapest_form(module: nn.Module, r_s: int, r_a: int) -> tuple[str, int]:
    """The form with the fewest weights (ties: fewer layers)."""
    counts = form_params(module, r_s, r_a)
    best = min(FORMS, key=lambda f: (counts[f], FORMS.index(f)))
    return best, counts[best]


def _linear(weight: torch.Tensor, bias: torch.Tensor | None, dtype) -> nn.Linear:
    # built directly in the model's dtype: float64 weights must not pass through float32
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=dtype, device=weight.device)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


def _conv(like: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor | None, dtype, pointwise: bool) -> nn.Conv2d:
    kw = {"bias": bias is not None, "dtype": dtype, "device": weight.device}  # no float32 detour
    if pointwise:
        layer = nn.Conv2d(weight.shape[1], weight.shape[0], 1, **kw)
        weight = weight.reshape(*weight.shape[:2], 1, 1)
    else:
        layer = nn.Conv2d(
            weight.shape[1], weight.shape[0], like.kernel_size, like.stride, like.padding, like.dilation,
            padding_mode=like.padding_mode, **kw,
        )
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


def decompose_layer(
    module: nn.Module, w_rot: torch.Tensor, basis: EigenBasis, keep_rows: torch.Tensor, keep_cols: torch.Tensor,
    form: str,
) -> nn.Module:
    """The pruned layer in ``form`` (see :data:`FORMS`): exact for the kept rows/columns of W'."""
    q_s, q_a = basis.q_s[:, keep_rows], basis.q_a[:, keep_cols]
    w_sub = w_rot[keep_rows][:, keep_cols]
    bias = module.bias.detach().double() if module.bias is not None else None
    dtype = module.weight.dtype
    conv = isinstance(module, nn.Conv2d)

    def layer(weight, b, spatial):
        if conv:
            return _conv(module, weight, b, dtype, pointwise=not spatial)
        return _linear(weight.reshape(weight.shape[0], weight.shape[1]), b, dtype)

    eye_s = torch.eye(q_s.shape[1], dtype=q_s.dtype, device=q_s.device)
    eye_a = torch.eye(q_a.shape[1], dtype=q_a.dtype, device=q_a.device)
    if form == "dense":
        return layer(from_eigenbasis(w_sub, q_s, q_a), bias, True)
    if form == "merge-A":  # (W' Q_A^T) then Q_S
        return nn.Sequential(layer(from_eigenbasis(w_sub, eye_s, q_a), None, True), layer(q_s, bias, False))
    if form == "merge-S":  # Q_A^T then (Q_S W')
        return nn.Sequential(layer(q_a.T, None, False), layer(from_eigenbasis(w_sub, q_s, eye_a), bias, True))
    if form == "three":
        return nn.Sequential(layer(q_a.T, None, False), layer(w_sub, None, True), layer(q_s, bias, False))
    raise ValueError(f"unknown form {form!r}")


# ----------------------------------------------------------------------------- selection
@dataclass
class _LayerPlan:
    target: Target
    basis: EigenBasis
    w_rot: torch.Tensor
    row_scores: torch.Tensor
    col_scores: torch.Tensor
    keep_rows: torch.Tensor = field(default=None)
    keep_cols: torch.Tensor = field(default=None)

    @property
    def original_params(self) -> int:
        return self.target.weight.numel()

    def params(self) -> tuple[str, int]:
        return cheapest_form(self.target.module, int(self.keep_rows.sum()), int(self.keep_cols.sum()))


def _side_cap(n: int, cap: float) -> int:
    return min(math.floor(cap * n + 1e-9), n - 1)


def _candidates(plans: list[_LayerPlan], cap: float):
    """Every prunable row/column, lowest score first, each side of a layer within its cap."""
    scores, owners = [], []
    for li, p in enumerate(plans):
        for side, s in ((0, p.row_scores), (1, p.col_scores)):
            order = torch.argsort(s, stable=True)[: _side_cap(len(s), cap)]
            scores.append(s[order])
            owners.append(torch.stack([torch.full_like(order, li), torch.full_like(order, side), order], 1))
    scores = torch.cat(scores)
    owners = torch.cat(owners)
    return owners[torch.argsort(scores, stable=True)]


def _apply(plans: list[_LayerPlan], chosen: torch.Tensor) -> int:
    """Set the keep-masks from the chosen candidates; return the total weights of the result."""
    for p in plans:
        p.keep_rows = torch.ones(len(p.row_scores), dtype=torch.bool)
        p.keep_cols = torch.ones(len(p.col_scores), dtype=torch.bool)
    for li, side, idx in chosen.tolist():
        (plans[li].keep_rows if side == 0 else plans[li].keep_cols)[idx] = False
    return sum(p.params()[1] for p in plans)


def choose_directions(plans: list[_LayerPlan], sparsity: float, cap: float) -> int:
    """The fewest lowest-importance directions whose removal shrinks the layers' weights by at
    least ``sparsity`` (bisection: the weight count only falls as more directions go)."""
    cands = _candidates(plans, cap)
    total = sum(p.original_params for p in plans)
    budget = (1.0 - sparsity) * total
    if _apply(plans, cands) > budget:
        raise BrainsurgeonError(
            f"EigenDamage cannot remove {sparsity:g} of the weights with max_layer_sparsity={cap}: removing every "
            "allowed eigen-direction still leaves too many; lower the sparsity or raise max_layer_sparsity"
        )
    lo, hi = 0, len(cands)  # _apply(cands[:hi]) meets the budget
    while lo < hi:
        mid = (lo + hi) // 2
        if _apply(plans, cands[:mid]) <= budget:
            hi = mid
        else:
            lo = mid + 1
    _apply(plans, cands[:hi])
    return hi


# ----------------------------------------------------------------------------- the method
def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


@LIBC.restored_after()
def eigendamage(
    model: nn.Module,
    data,
    sparsity: float,
    *,
    ekfac: bool = False,
    fisher: str = "true",
    max_layer_sparsity: float = 0.9,
    loss_fn=None,
    num_samples: int = 1024,
    layers=None,
    seed: int = 0,
    device="cpu",
    batch_size: int = 128,
    progress: bool | None = None,
    recalibrate_bn: bool | str = "auto",
):
    """Prune a copy of ``model`` with EigenDamage to remove ``sparsity`` of the target layers'
    weights (counted in the decomposed model); returns a :class:`~brainsurgeon.engine.PruneResult`
    whose model has the pruned layers replaced by their (smaller) eigenbasis decompositions.
    ``recalibrate_bn``: re-estimate BatchNorm statistics afterwards (True, False or "auto"; see
    ``batchnorm.choose_batchnorm_statistics``)."""
    from ..engine import PruneResult, build_options, resolve_loss, working_context
    from ..structured.latency import count_params
    from ..targets import find_targets

    t0 = time.perf_counter()
    opts = build_options("eigendamage", sparsity, "unstructured", "global", max_layer_sparsity, num_samples, None, seed, device, batch_size)
    if not isinstance(ekfac, bool):
        raise BrainsurgeonError(f"ekfac must be True or False, got {ekfac!r}")
    if not isinstance(fisher, str):
        raise BrainsurgeonError(f"fisher must be one of 'true', 'empirical', 'exact'; got {fisher!r}")
    kind = _SIGNAL[check_fisher_kind(fisher)]
    if not isinstance(model, nn.Module):
        raise BrainsurgeonError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    loss_fn = resolve_loss(loss_fn)
    check_fisher_loss(kind, loss_fn, instead="fisher='exact' or 'empirical'")
    for t in find_targets(model, layers):
        check_kfac_layer(t)
    ctx = working_context(model, data, opts, layers, loss_fn, progress)
    work, targets, calib = ctx.model, ctx.targets, ctx.calib
    params_before = count_params(work)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(opts.seed)
        with ctx.timer("statistics"):
            factors = kfac_channel_factors(work, targets, calib, loss_fn, kind, ctx.generator, ctx.track)
            bases = {n: eigenbasis(a, s) for n, (a, s) in factors.items()}
            if ekfac:
                lam = ekfac_eigenvalues(work, targets, bases, calib, loss_fn, kind, ctx.generator, ctx.track)
                for n, b in bases.items():
                    b.ekfac = lam[n]
    with ctx.timer("solve"):
        plans = []
        for t in targets:
            w_rot = to_eigenbasis(t.weight.detach(), bases[t.name])
            imp = importance(w_rot, bases[t.name])
            plans.append(_LayerPlan(t, bases[t.name], w_rot, imp.sum(1), imp.sum(0)))
        removed = choose_directions(plans, opts.sparsity, opts.max_layer_sparsity)
        layer_rep = {}
        for p in plans:
            form, n_params = p.params()
            rows, cols = int(p.keep_rows.sum()), int(p.keep_cols.sum())
            pruned = rows < len(p.keep_rows) or cols < len(p.keep_cols)
            if pruned:
                new = decompose_layer(p.target.module, p.w_rot, p.basis, p.keep_rows, p.keep_cols, form)
                _set_module(work, p.target.name, new)
            layer_rep[p.target.name] = {
                "form": form if pruned else "unchanged", "rows_kept": rows, "rows": len(p.keep_rows),
                "cols_kept": cols, "cols": len(p.keep_cols),
                "weights_before": p.original_params, "weights_after": n_params if pruned else p.original_params,
            }
    bn_report = choose_batchnorm_statistics(work, calib, loss_fn, recalibrate_bn)
    with ctx.timer("measure"):  # the cost record every structured result has (params, FLOPs, latency)
        from .latency import compare

        sample = calib.batches[0][0]
        dense = copy.deepcopy(model).to(opts.device)
        cost_before, cost_after, speedup = compare(dense, work, tuple(sample.shape[1:]), opts.device, sample.dtype)
        del dense
    w_before = sum(r["weights_before"] for r in layer_rep.values())
    w_after = sum(r["weights_after"] for r in layer_rep.values())
    work.train(model.training)
    report = {
        "method": "eigendamage",
        "method_options": {"ekfac": ekfac, "fisher": fisher},
        "options": {
            "sparsity": opts.sparsity, "structure": "eigenbasis", "max_layer_sparsity": opts.max_layer_sparsity,
            "num_samples": calib.num_samples, "layers": layers, "seed": opts.seed, "device": str(opts.device),
            "recalibrate_bn": recalibrate_bn,
        },
        "batchnorm": bn_report,
        "notes": batchnorm_notes(bn_report, calib.num_samples),
        "overall": {
            "target_sparsity": opts.sparsity, "achieved_sparsity": 1 - w_after / w_before,
            "weights_before": w_before, "weights_after": w_after, "directions_removed": removed,
            "params_before": params_before, "params_after": count_params(work),
        },
        "layers": layer_rep,
        "cost": {"before": cost_before, "after": cost_after, "speedup": speedup},
        "timings": {**{f"{k}_s": v for k, v in ctx.timer.seconds.items()}, "total_s": time.perf_counter() - t0},
        "numerics": {"damping": ctx.numerics.damping, "fallbacks": ctx.numerics.fallbacks},
    }
    return PruneResult(model=work, report=report, masks={})


@register("eigendamage")
class EigenDamage(WholeModelMethod):
    """EigenDamage (Wang, Grosse, Fidler & Zhang 2019, arXiv:1905.05934): structured pruning in the
    Kronecker-factored eigenbasis, W' = Q_S^T W Q_A, importance 1/2 (W'_ij)^2 lambda_S_i lambda_A_j
    (or the EKFAC eigenvalues of George et al. 2018 with ``ekfac=True``), rows and columns of W'
    removed by one global percentile with a per-layer cap; pruned layers become
    Q_A -> W' -> Q_S (or a cheaper exact merge). The formulas and departures are in this module's
    docstring. ``sparsity`` is the fraction of the target layers' weights removed, counted in the
    decomposed model. Options: ``ekfac`` (False), ``fisher`` ("true", "empirical", "exact").
    """

    summary = "EigenDamage (Wang et al. 2019): prune directions of the K-FAC eigenbasis; layers become Q_A-W'-Q_S."

    def __init__(self, ekfac: bool = False, fisher: str = "true"):
        if not isinstance(ekfac, bool):
            raise BrainsurgeonError(f"ekfac must be True or False, got {ekfac!r}")
        if not isinstance(fisher, str):
            raise BrainsurgeonError(f"fisher must be one of 'true', 'empirical', 'exact'; got {fisher!r}")
        self.ekfac = ekfac
        self.fisher = check_fisher_kind(fisher)

    def prune_model(self, model, data, sparsity, *, allocation, damping, **options):
        if allocation != "global":
            raise BrainsurgeonError(
                "eigendamage removes eigen-directions by one global percentile (Wang et al. 2019): "
                "pass allocation='global' (max_layer_sparsity caps each layer)"
            )
        if damping is not None:
            raise BrainsurgeonError("eigendamage inverts nothing (it eigendecomposes A and S): leave damping out")
        return eigendamage(model, data, sparsity, ekfac=self.ekfac, fisher=self.fisher, **options)
