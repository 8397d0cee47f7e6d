"""Kronecker-factored Fisher blocks (K-FAC: Martens & Grosse 2015; KFC for convolutions: Grosse &
Martens 2016), their damping and inverses.

For a layer z_t = W a_t (+ b) at positions t = 1..T (T = 1 for a Linear layer on (B, in) inputs; the
H_out * W_out output locations of a Conv2d, whose a_t are the unfolded input patches), the
per-sample weight gradient is G_i = sum_t s_it a_it^T with s_it = d l_i/d z_it (the per-sample loss,
not the batch mean). K-FAC approximates the Fisher block E[vec(G) vec(G)^T] by

    A = (1/N) sum_i sum_t a_it a_it^T                (d_in [+1] square: a constant 1 appended to
                                                      every a_it when the layer has a bias)
    S = (1/N) sum_i (1/T) sum_t s_it s_it^T          (out x out)

    F_block ~ S (x) A   for the row-major flattening of [W | b] (PyTorch's ``weight.reshape(out, -1)``
                        with the bias as a last column); in the column-major vec of the papers this
                        is the A (x) S of Martens & Grosse.

For T = 1 this is exact for one sample (G G^T = s s^T (x) a a^T), an approximation otherwise
(independent a and s). Sequence models (a Linear on (B, L, d) inputs: transformers through
:class:`brainsurgeon.adapters.hf.TokenView`) follow the same convention with the L tokens of a
sequence as the T positions: the sample is the sequence, l_i its own loss (the mean over its
tokens, as the model computes it), A sums a_it a_it^T over its tokens and S averages s_it s_it^T
over them; the signals come from :mod:`.sequence` (per-sequence loops, no vmap; the exact
expectation ``fisher="exact"`` is refused above :data:`.sequence.MAX_EXACT_OUTPUTS` output entries
per sequence, since it takes one backward pass per entry: use ``"true"`` or ``"empirical"``). For convolutions the sum over positions in A and the mean in S are KFC's
conventions (spatial homogeneity and spatially uncorrelated derivatives), under which
E[sum_t sum_t' (s_t s_t'^T) (x) (a_t a_t'^T)] ~ sum_t E[s s^T] (x) E[a_t a_t^T] = S (x) A.

s comes from labels sampled from the model's predictive distribution (``fisher="true"``: the true
Fisher, one Monte-Carlo draw per sample), from the data labels (``fisher="empirical"``), or from the
exact expectation over the model's labels (``fisher="exact"``: S = E[sum_k s_k s_k^T] with s_k
back-propagated from the columns of the output-Hessian square root; C backward passes per batch).
Statistics are accumulated in float64.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..distributed import all_reduce_count, all_reduce_sum
from ..errors import BrainsurgeonError
from ..targets import Target
from .diagonal import LayerTaps, Tracker, _no_track, backprop_signals, check_fisher_loss, layer_inputs, layer_output_grads

FISHER_KINDS = ("true", "empirical", "exact")
_SIGNAL = {"true": "fisher", "empirical": "empirical", "exact": "ggn"}
#: relative damping gamma of the Kronecker product when the run gives none (see :func:`damped`)
DEFAULT_DAMPING = 1e-2


def check_fisher_kind(fisher: str) -> str:
    if fisher not in FISHER_KINDS:
        raise BrainsurgeonError(f"fisher must be one of {FISHER_KINDS}, got {fisher!r}")
    return fisher


def check_kfac_layer(t: Target) -> None:
    """K-FAC factors here assume one weight matrix per layer: no grouped convolutions."""
    if getattr(t.module, "groups", 1) != 1:
        raise BrainsurgeonError(
            f"layer {t.name!r} is a grouped convolution (groups={t.module.groups}); K-FAC needs one factor pair "
            f"per group, which is not supported: exclude it with layers={{'exclude': [{t.name!r}]}}"
        )


@dataclass(frozen=True)
class KFACFactors:
    """One layer's Kronecker factors: the Fisher block of [W | b] (row-major) is ``kron(S, A)``.

    ``A`` (d x d, d = in*kh*kw [+1 for the bias]) and ``S`` (out x out) are float64;
    ``has_bias``: the last row/column of ``A`` belongs to the bias (the constant input 1).
    """

    name: str
    A: torch.Tensor
    S: torch.Tensor
    has_bias: bool

    @property
    def num_weight_inputs(self) -> int:
        """Columns of A that belong to the weight (all but the bias column)."""
        return self.A.shape[0] - int(self.has_bias)


@dataclass(frozen=True)
class DampedFactor:
    """A damped factor X + lam I with its inverse (from an eigendecomposition, so zero rows of dead
    inputs only meet the damping, never a division by zero)."""

    matrix: torch.Tensor
    inverse: torch.Tensor
    damping: float  # the absolute lam added to the diagonal


def _damp(x: torch.Tensor, rel: float) -> tuple[DampedFactor, bool]:
    """X + lam I with lam = rel * mean diag(X); a factor that is all zeros (no signal) gets lam = rel
    instead (returned flag True) so its inverse stays finite.

    The inverse comes from a Cholesky factorisation (X PSD and lam > 0: positive definite; 1.4 s
    against 4.2 s for eigh on a 1536 x 1536 factor, one thread on shared cores); where round-off defeats it, from
    eigh with negative round-off eigenvalues set to zero (dead inputs then only meet the damping)."""
    mean_diag = float(torch.diagonal(x).mean())
    fallback = not (mean_diag > 0 and torch.isfinite(torch.tensor(mean_diag)))
    lam = rel * (1.0 if fallback else mean_diag)
    matrix = x + lam * torch.eye(len(x), dtype=x.dtype, device=x.device)
    chol, info = torch.linalg.cholesky_ex(matrix)
    if int(info) == 0:
        inverse = torch.cholesky_inverse(chol)
    else:
        evals, evecs = torch.linalg.eigh(x)
        evals = evals.clamp_min(0) + lam  # a PSD factor: negative round-off eigenvalues are zero
        inverse = (evecs / evals) @ evecs.T
    return DampedFactor(matrix=matrix, inverse=0.5 * (inverse + inverse.T), damping=lam), fallback


def damped(factors: KFACFactors, gamma: float, numerics=None) -> tuple[DampedFactor, DampedFactor]:
    """pi-corrected Tikhonov damping (Martens & Grosse 2015, section 6.3), relative to the factors'
    mean diagonals: A + sqrt(gamma) mean diag(A) I and S + sqrt(gamma) mean diag(S) I.

    That is exactly Martens & Grosse's (A + pi sqrt(g) I) (x) (S + sqrt(g)/pi I) with
    pi = sqrt(mean diag A / mean diag S) and g = gamma * mean diag(S (x) A): the damping of the
    Kronecker product is ``gamma`` times its mean diagonal, split between the factors in proportion
    to their scales. Records each factor's absolute damping (and any all-zero factor) in ``numerics``.
    """
    root = gamma**0.5
    a, fa = _damp(factors.A, root)
    s, fs = _damp(factors.S, root)
    if numerics is not None:
        numerics.damp(f"{factors.name}.A", a.damping)
        numerics.damp(f"{factors.name}.S", s.damping)
        for flag, which in ((fa, "A (inputs)"), (fs, "S (output gradients)")):
            if flag:
                numerics.fallback(factors.name, f"K-FAC factor {which} is all zeros; damped with the absolute value {root:g}")
    return a, s


def kfac_factors(
    model: nn.Module,
    targets: list[Target],
    calib,
    loss_fn,
    fisher: str = "true",
    generator: torch.Generator | None = None,
    track: Tracker = _no_track,
) -> dict[str, KFACFactors]:
    """A and S for every target layer from one forward and K backward passes per calibration batch."""
    kind = _SIGNAL[check_fisher_kind(fisher)]
    check_fisher_loss(kind, loss_fn, instead="fisher='exact' or 'empirical'")
    for t in targets:
        check_kfac_layer(t)
    has_bias = {t.name: getattr(t.module, "bias", None) is not None for t in targets}

    def patches_with_bias(t: Target, x: torch.Tensor) -> torch.Tensor:
        a = layer_inputs(t.module, x).double()
        if has_bias[t.name]:  # the bias folded into A as a constant input 1
            a = torch.cat([a, torch.ones_like(a[..., :1])], dim=-1)
        return a.reshape(-1, a.shape[-1])

    sums = factor_sums(model, targets, calib, loss_fn, kind, generator, track, patches_with_bias)
    return {
        t.name: KFACFactors(name=t.name, A=sums[t.name][0], S=sums[t.name][1], has_bias=has_bias[t.name])
        for t in targets
    }


def factor_sums(model, targets, calib, loss_fn, kind: str, generator, track, input_rows) -> dict:
    """{name: (A, S)} in float64, A = E[a a^T] over the rows ``input_rows(target, layer input)``
    (per sample; summed over a conv's positions), S = E[s s^T] averaged over output positions,
    s from the back-propagated signals of ``kind`` (one backward pass per signal)."""
    sums_a: dict[str, torch.Tensor] = {}
    sums_s: dict[str, torch.Tensor] = {}
    taps = LayerTaps(targets)
    for x, y in track(calib.batches, "K-FAC factors", len(calib.batches)):
        with torch.enable_grad(), taps:
            out = model(x)
        for t in targets:
            a = input_rows(t, taps.inputs[t.name])
            sums_a[t.name] = sums_a.get(t.name, 0) + a.T @ a
        signals = backprop_signals(loss_fn, out, y, kind, generator)
        for k in range(signals.shape[0]):
            grads = taps.output_grads(out, signals[k].to(out.dtype), retain_graph=k < signals.shape[0] - 1)
            for t in targets:
                s = layer_output_grads(t.module, grads[t.name]).double()
                positions = s.shape[1]
                s = s.reshape(-1, s.shape[-1])
                sums_s[t.name] = sums_s.get(t.name, 0) + (s.T @ s) / positions
    # several ranks: the sums and sample counts over every rank's shard, then the means (distributed.py)
    n = all_reduce_count(calib.num_samples)
    return {t.name: (all_reduce_sum(sums_a[t.name]) / n, all_reduce_sum(sums_s[t.name]) / n) for t in targets}


def weight_with_bias(t: Target) -> torch.Tensor:
    """[W | b] as a float64 (out, d) matrix, the layout of the K-FAC block."""
    w = t.weight_matrix().detach().double()
    bias = getattr(t.module, "bias", None)
    if bias is None:
        return w.clone()
    return torch.cat([w, bias.detach().double().unsqueeze(1)], dim=1)
