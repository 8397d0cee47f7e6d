"""First-order, weight and activation criteria for structured pruning (ALGORITHMS.md section 4).

Each criterion is an importance plug-in (:data:`~.groups.Importance`): one non-negative score per
unit of a dependency group, higher = kept. Where a group has several producers (the partners of a
residual sum) their contributions are summed: removing the unit removes all of them.
"""
from __future__ import annotations


import torch

from ..errors import BrainsurgeonError
from ..registry import register
from .groups import Group, StructuredContext, StructuredMethod


def producer_weights(group: Group) -> list[torch.Tensor]:
    """Each producer's weights per unit, ``(units, k)`` float64 (filters / neuron rows)."""
    return [group.unit_weights(m).double() for m in group.producers]


@register("l1-norm")
class L1Norm(StructuredMethod):
    """L1-norm of filters (Li, Kadav, Durdanovic, Samet & Graf 2016, "Pruning Filters for Efficient
    ConvNets", arXiv:1608.08710).

    importance_u = sum_p sum_j |W^(p)_{u,j}| over the kernel weights of unit u in every producer p
    of the group (bias excluded, as in the paper). Smallest sums are pruned.
    """

    summary = "Li et al. 2016: sum of |w| of each filter/neuron; smallest pruned."

    def importance(self, group: Group, sctx: StructuredContext) -> torch.Tensor:
        return sum(w.abs().sum(1) for w in producer_weights(group))


@register("l2-norm")
class L2Norm(StructuredMethod):
    """L2-norm of filters (the variant studied by Li et al. 2016, arXiv:1608.08710).

    importance_u = sqrt(sum_p sum_j (W^(p)_{u,j})^2) over every producer p of the group.
    """

    summary = "Li et al. 2016 (L2 variant): Euclidean norm of each filter/neuron; smallest pruned."

    def importance(self, group: Group, sctx: StructuredContext) -> torch.Tensor:
        return sum(w.pow(2).sum(1) for w in producer_weights(group)).sqrt()


@register("bn-scale")
class BNScale(StructuredMethod):
    """Network slimming (Liu, Li, Shen, Huang, Yan & Zhang 2017, "Learning Efficient Convolutional
    Networks through Network Slimming", ICCV): the BatchNorm scale as channel importance.

    importance_u = sum_b |gamma^(b)_u| over the group's BatchNorm layers b (one per residual
    partner). The paper trains with an L1 penalty on gamma first; without it the criterion still
    applies but is weaker. A group without an affine BatchNorm is an error.
    """

    summary = "Liu et al. 2017 (network slimming): |BatchNorm gamma| per channel; smallest pruned."

    def check(self, sctx: StructuredContext) -> None:
        bad = [g.name for g in sctx.groups if not any(m.module.weight is not None for m in g.norms)]
        if bad:
            raise BrainsurgeonError(
                f"bn-scale needs an affine BatchNorm after every pruned layer; none follows {', '.join(bad)}. "
                "Exclude those layers with layers={'exclude': [...]} or use another criterion (l1-norm)"
            )

    def importance(self, group: Group, sctx: StructuredContext) -> torch.Tensor:
        return sum(group.unit_weights(m).double().abs().sum(1) for m in group.norms if m.module.weight is not None)


@register("apoz")
class APoZ(StructuredMethod):
    """Average Percentage of Zeros (Hu, Peng, Tai & Tang 2016, "Network Trimming", arXiv:1607.03250).

    APoZ_u = (1 / (N S)) sum_n sum_s [a_{n,u,s} == 0] over the unit's post-ReLU activations (S
    spatial positions) on the calibration data; a unit that is mostly zero is redundant.
    importance_u = 1 - APoZ_u. The activations must be ReLU outputs (non-negative): otherwise
    the count of zeros says nothing, and it is an error.
    """

    summary = "Hu et al. 2016 (network trimming): 1 - average percentage of zero (post-ReLU) activations."
    needs = ("activations",)

    def importance(self, group: Group, sctx: StructuredContext) -> torch.Tensor:
        a = sctx.activations(group)
        if (a < 0).any():
            raise BrainsurgeonError(
                f"apoz needs post-ReLU activations, but the layers reading {group.name}'s units receive negative "
                "values (no ReLU in between); use another criterion (e.g. entropy, taylor) for this model"
            )
        return 1.0 - (a == 0).double().mean(dim=(0, 2))


@register("entropy")
class Entropy(StructuredMethod):
    """Entropy of channel responses (Luo & Wu 2017, "An Entropy-based Pruning Method for CNN
    Compression", arXiv:1706.05791).

    Global-average-pool each unit's activation per image, x_{n,u} = mean_s a_{n,u,s}; histogram
    the N values into m bins (equal width over the unit's range) with frequencies p_i;
    H_u = -sum_i p_i log p_i. A low-entropy unit responds alike to every input: unimportant.
    A constant unit has H = 0.
    """

    summary = "Luo & Wu 2017: entropy of each channel's pooled activation histogram; lowest pruned."
    needs = ("activations",)

    def __init__(self, bins: int = 32) -> None:
        if isinstance(bins, bool) or not isinstance(bins, int) or bins < 2:
            raise BrainsurgeonError(f"entropy: bins must be an integer >= 2, got {bins!r}")
        self.bins = bins

    def importance(self, group: Group, sctx: StructuredContext) -> torch.Tensor:
        pooled = sctx.activations(group).mean(2)  # (N, U)
        return torch.stack([histogram_entropy(pooled[:, u], self.bins) for u in range(group.num_units)])


def histogram_entropy(x: torch.Tensor, bins: int) -> torch.Tensor:
    """-sum p log p of ``x`` histogrammed into ``bins`` equal-width bins over its range."""
    lo, hi = x.min(), x.max()
    if not hi > lo:
        return torch.zeros((), dtype=torch.float64)
    p = torch.histc(x.double(), bins=bins, min=float(lo), max=float(hi)) / x.numel()
    p = p[p > 0]
    return -(p * p.log()).sum()


@register("taylor")
class Taylor(StructuredMethod):
    """First-order Taylor expansion (Molchanov, Tyree, Karras, Aila & Kautz 2017, "Pruning
    Convolutional Neural Networks for Resource Efficient Inference", arXiv:1611.06440).

    Removing unit u changes the loss by about |dL/da_u * a_u|; per sample n the paper averages
    over the unit's M spatial positions before the absolute value and then over samples:
    Theta_u = (1/N) sum_n | (1/M) sum_s a_{n,u,s} dl_n/da_{n,u,s} |, with l_n the per-sample loss.
    (The layer-wise L2 normalization of the paper is what ``allocation="global"`` applies.)
    Needs gradients of the loss: the data's targets must fit ``loss_fn``.
    """

    summary = "Molchanov et al. 2017: |mean(activation * dL/dactivation)| per feature map (first-order Taylor)."
    needs = ("activations", "gradients")

    def importance(self, group: Group, sctx: StructuredContext) -> torch.Tensor:
        g = sctx.activation_grads(group)
        a = sctx.activations(group)
        return (a * g).mean(2).abs().mean(0)


@register("activation-correlation")
class ActivationCorrelation(StructuredMethod):
    """Correlation with the next layer (Sun, Wang & Tang 2016, "Sparsifying Neural Network
    Connections for Face Recognition", CVPR).

    The paper keeps the connections between neurons of consecutive layers whose activations are
    most strongly (positively or negatively) correlated. As a unit criterion: with x_{n,u} the
    unit's (spatially averaged) activation and z_{n,j} the (averaged) output j of the layer that
    reads it, importance_u = max_j |corr_n(x_u, z_j)|: a unit no output of the next layer follows
    is dropped. A constant unit has correlation 0.
    """

    summary = "Sun et al. 2016: max |correlation| of a unit's activation with the next layer's outputs."
    needs = ("activations",)

    def importance(self, group: Group, sctx: StructuredContext) -> torch.Tensor:
        x = sctx.activations(group).mean(2)  # (N, U)
        z = consumer_outputs(sctx, group)  # (N, O)
        return abs_correlation(x, z).amax(1)


def abs_correlation(x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """|Pearson correlation| between the columns of x (N, U) and z (N, O); 0 where one is constant."""
    xc, zc = x - x.mean(0), z - z.mean(0)
    xs, zs = xc.norm(dim=0), zc.norm(dim=0)
    denom = xs[:, None] * zs[None, :]
    r = (xc.T @ zc) / torch.where(denom > 0, denom, torch.ones_like(denom))
    return torch.where(denom > 0, r.abs(), torch.zeros_like(r))


def consumer_outputs(sctx: StructuredContext, group: Group) -> torch.Tensor:
    """Outputs of the group's first consumer over the calibration data, spatially averaged (N, O)."""
    module = group.consumers[0].module
    outs = []
    handle = module.register_forward_hook(
        lambda mod, args, out: outs.append(out.detach().double().reshape(out.shape[0], out.shape[1], -1).mean(2).cpu())
    )
    try:
        with torch.no_grad():
            for x, _ in sctx.calib.batches:
                sctx.model(x)
    finally:
        handle.remove()
    return torch.cat(outs)


@register("icc")
class IntraClassCorrelation(StructuredMethod):
    """Intra-class correlation of filter fire scores (arXiv:1704.06305).

    Per unit u and image n a fire score f_{n,u} = max_s a_{n,u,s} (the unit's peak response).
    With the images grouped by class label, the one-way ANOVA intra-class correlation
        ICC_u = (MSB - MSW) / (MSB + (n0 - 1) MSW),
    MSB/MSW the between/within-class mean squares of f_u, n0 = (N - sum_c n_c^2 / N) / (C - 1)
    (unbalanced classes), measures how much of a unit's response variance the class explains.
    Units with high ICC discriminate classes and are kept; importance_u = max(ICC_u, 0) (a unit
    constant over the data scores 0). Needs integer class labels (at least two classes).
    """

    summary = "ICC (arXiv:1704.06305): keep filters whose peak responses are class-discriminative."
    needs = ("activations", "labels")

    def check(self, sctx: StructuredContext) -> None:
        y = sctx.labels(self.name)
        if torch.unique(y).numel() < 2:
            raise BrainsurgeonError("icc needs calibration data with at least two classes")

    def importance(self, group: Group, sctx: StructuredContext) -> torch.Tensor:
        fire = sctx.activations(group).amax(2)  # (N, U)
        return icc(fire, sctx.labels(self.name).cpu()).clamp_min(0.0)


def icc(f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """One-way ANOVA ICC(1) of each column of ``f`` (N, U) with groups given by labels ``y``."""
    classes, y_idx, counts = torch.unique(y, return_inverse=True, return_counts=True)
    n, c = f.shape[0], classes.numel()
    counts = counts.double()
    sums = torch.zeros(c, f.shape[1], dtype=torch.float64).index_add_(0, y_idx, f.double())
    means = sums / counts[:, None]
    grand = f.double().mean(0)
    ssb = (counts[:, None] * (means - grand).pow(2)).sum(0)
    ssw = (f.double() - means[y_idx]).pow(2).sum(0)
    msb = ssb / max(c - 1, 1)
    msw = ssw / max(n - c, 1)
    n0 = (n - counts.pow(2).sum() / n) / max(c - 1, 1)
    denom = msb + (n0 - 1) * msw
    return torch.where(denom > 0, (msb - msw) / torch.where(denom > 0, denom, torch.ones_like(denom)), torch.zeros_like(denom))


__all__ = ["histogram_entropy", "abs_correlation", "icc"]
