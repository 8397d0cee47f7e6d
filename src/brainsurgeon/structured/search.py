"""Structured criteria that do more than rank units: random search (Anwar et al.) and
energy-aware pruning with least-squares reconstruction (Yang et al.)."""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import BrainsurgeonError
from ..registry import register
from .allocation import uniform_counts
from .groups import Group, StructuredContext, StructuredMethod
from .latency import count_flops
from .masking import apply_masks, restore_state, unit_state


def calibration_loss(sctx: StructuredContext) -> float:
    """Mean loss of the working model over the calibration batches (sample-weighted)."""
    total, n = 0.0, 0
    with torch.no_grad():
        for x, y in sctx.calib.batches:
            total += float(sctx.ctx.loss_fn(sctx.model(x), y)) * len(x)
            n += len(x)
    return total / n


def random_keep(n: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """A keep-mask over ``n`` units with ``k`` removed uniformly at random."""
    keep = torch.ones(n, dtype=torch.bool)
    keep[torch.randperm(n, generator=generator)[:k]] = False
    return keep


@register("random-search")
class RandomSearch(StructuredMethod):
    """Random search over unit masks (Anwar & Sung 2016, "Compact Deep Convolutional Neural
    Networks With Coarse Pruning", openreview HkvS3Mqxe).

    Draw ``num_trials`` random masks, each removing ``round(r * n)`` units of every group; apply
    each to the network and measure the loss L(mask) on the calibration data (used here as the
    validation set, so pass held-out data as ``data``); keep argmin_mask L(mask). No importance
    per unit: the ranking is of whole masks, so only ``allocation="uniform"`` applies.
    """

    summary = "Anwar et al. 2016: best of N random unit masks by calibration/validation loss."

    def __init__(self, num_trials: int = 16) -> None:
        if isinstance(num_trials, bool) or not isinstance(num_trials, int) or num_trials < 1:
            raise BrainsurgeonError(f"random-search: num_trials must be a positive integer, got {num_trials!r}")
        self.num_trials = num_trials

    def validate(self, ctx) -> None:
        if ctx.options.allocation != "uniform":
            raise BrainsurgeonError(
                "random-search draws masks at the target ratio in every layer (Anwar et al.): use allocation='uniform'"
            )

    def allocate(self, sctx: StructuredContext) -> tuple[dict[str, int], list[str]]:
        return uniform_counts(sctx.groups, sctx.ctx.options.sparsity)

    def select(self, sctx: StructuredContext, counts: dict[str, int]) -> dict[str, torch.Tensor]:
        groups, gen = sctx.groups, sctx.ctx.generator
        saved = unit_state(groups)
        best, best_loss, losses = None, math.inf, []
        for _ in sctx.ctx.track(range(self.num_trials), "random masks", total=self.num_trials):
            keep = {g.name: random_keep(g.num_units, counts[g.name], gen) for g in groups}
            apply_masks(groups, keep)
            loss = calibration_loss(sctx)
            restore_state(groups, saved)
            losses.append(loss)
            if loss < best_loss:  # strict: the first of equal losses wins, deterministically
                best, best_loss = keep, loss
        if best is None:  # every trial gave a non-finite loss
            raise BrainsurgeonError("random-search: every random mask gave a non-finite loss on the data")
        sctx.ctx.extra_report["random_search"] = {"trials": self.num_trials, "losses": losses, "best_loss": best_loss}
        return best


# ----------------------------------------------------------------------------- energy-aware
def layer_energy(model: nn.Module, example: torch.Tensor, e_mac: float, e_mem: float) -> dict[str, float]:
    """Energy per sample of every Linear/Conv2d: e_mac * MACs + e_mem * (weights + inputs + outputs)."""
    names = {m: n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    energy: dict[str, float] = {}

    def hook(module, args, out):
        x = args[0]
        macs = count_flops(_Single(module), x) / 2  # FlopCounterMode counts 2 FLOPs per multiply-add
        moved = module.weight.numel() + x[0].numel() + out[0].numel()
        energy[names[module]] = e_mac * macs + e_mem * moved

    handles = [m.register_forward_hook(hook) for m in names]
    try:
        with torch.no_grad():
            model(example[:1])
    finally:
        for h in handles:
            h.remove()
    return energy


class _Single(nn.Module):
    """Wraps a module so counting its FLOPs does not re-enter its hooks."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x):
        m = self.module
        if isinstance(m, nn.Conv2d):
            return m._conv_forward(x, m.weight, m.bias)
        return F.linear(x, m.weight, m.bias)


@register("energy-aware")
class EnergyAware(StructuredMethod):
    """Energy-aware pruning (Yang, Chen & Sze 2017, "Designing Energy-Efficient Convolutional
    Neural Networks using Energy-Aware Pruning", arXiv:1611.05128), structured form.

    Energy model per layer l (per sample): E_l = e_mac * MACs_l + e_mem * (|W_l| + |in_l| +
    |out_l|), every weight and activation moved once at the cost of a DRAM access (default
    e_mem / e_mac = 200, the Eyeriss ratio the paper uses); the paper's per-level dataflow
    mapping is not modelled. A group's energy is the sum over the layers it shrinks (producers,
    depthwise convs, consumers).

    1. Order: groups by decreasing energy. Global allocation removes units from the most
       energy-hungry groups first (each up to the cap) until ``round(r * total)`` units are gone;
       uniform allocation removes ``round(r * n)`` per group.
    2. Selection within a group: smallest filter magnitude ||W_u||_2 summed over producers (the
       paper prunes by magnitude; its step of restoring individual weights has no unit analogue
       and is omitted).
    3. Reconstruction: every consumer layer's kept input weights are refit by least squares so
       its output on the calibration data matches the unpruned network's,
       W'_K = argmin ||Z - b - X_K W_K^T||^2 = (X_K^T X_K + lambda I)^-1 X_K^T (Z - b), with X the
       consumer's inputs in the pruned network (conv: unfolded patches), in network order so each
       fit sees the already-fixed earlier layers; lambda = damping * mean diag(X_K^T X_K).
    """

    summary = "Yang et al. 2017: prune energy-hungry layers first, refit consumers by least squares."

    def __init__(self, e_mac: float = 1.0, e_mem: float = 200.0) -> None:
        for name, v in (("e_mac", e_mac), ("e_mem", e_mem)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v >= 0 and math.isfinite(v)):
                raise BrainsurgeonError(f"energy-aware: {name} must be a non-negative number, got {v!r}")
        self.e_mac, self.e_mem = float(e_mac), float(e_mem)

    def group_energy(self, sctx: StructuredContext) -> dict[str, float]:
        x = sctx.calib.batches[0][0]
        per_layer = layer_energy(sctx.model, x, self.e_mac, self.e_mem)
        return {g.name: sum(per_layer.get(n, 0.0) for n in {m.name for m in g.members if m.role != "norm"}) for g in sctx.groups}

    def allocate(self, sctx: StructuredContext) -> tuple[dict[str, int], list[str]]:
        o = sctx.ctx.options
        energy = self.group_energy(sctx)
        sctx.ctx.extra_report["energy"] = energy
        if o.allocation != "global":
            return uniform_counts(sctx.groups, o.sparsity)
        return energy_first_counts(sctx.groups, energy, o.sparsity, o.max_layer_sparsity)

    def importance(self, group: Group, sctx: StructuredContext) -> torch.Tensor:
        return sum(group.unit_weights(m).double().pow(2).sum(1) for m in group.producers).sqrt()

    def compensate(self, sctx: StructuredContext, keep: dict[str, torch.Tensor]) -> None:
        damping = sctx.ctx.options.damping if sctx.ctx.options.damping is not None else 1e-4
        reference = copy.deepcopy(sctx.model)  # the unpruned network gives the targets
        with torch.no_grad():
            apply_masks(sctx.groups, keep)
        refs = dict(reference.named_modules())
        for name, module, kept_cols in consumers_in_order(sctx, keep):
            with sctx.ctx.timer("solve"):
                refit_consumer(sctx, name, module, reference, refs[name], kept_cols, damping)


def energy_first_counts(groups, energy: dict[str, float], ratio: float, cap: float) -> tuple[dict[str, int], list[str]]:
    """Remove units from the most energy-hungry groups first, each up to its cap, ``round(r * total)`` in all."""
    total = sum(g.num_units for g in groups)
    left = int(round(ratio * total))
    counts, capped = {g.name: 0 for g in groups}, []
    for g in sorted(groups, key=lambda g: -energy[g.name]):
        limit = min(math.floor(cap * g.num_units + 1e-9), g.num_units - 1)
        take = min(limit, left)
        counts[g.name] = take
        left -= take
        if take and take == limit:
            capped.append(g.name)
    if left > 0:
        raise BrainsurgeonError(
            f"removing {ratio:g} of the {total} units exceeds what max_layer_sparsity={cap} allows; lower the sparsity"
        )
    return counts, capped


def consumers_in_order(sctx: StructuredContext, keep: dict[str, torch.Tensor]):
    """``(name, module, kept input positions)`` of every consumer that lost inputs, in module order."""
    lost: dict[str, set[int]] = {}
    modules = {}
    for g in sctx.groups:
        gone = ~keep[g.name]
        if not gone.any():
            continue
        for m in g.consumers:
            lost.setdefault(m.name, set()).update(m.positions_of(gone).tolist())
            modules[m.name] = m.module
    for name, module in sctx.model.named_modules():
        if name in lost:
            n_in = module.weight.shape[1]
            yield name, module, torch.tensor([i for i in range(n_in) if i not in lost[name]], dtype=torch.long)


def _patches(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Rows of a layer's input as its weight sees them: (rows, in_features) or unfolded conv patches."""
    if isinstance(module, nn.Conv2d):
        if module.padding_mode != "zeros" or isinstance(module.padding, str):
            raise BrainsurgeonError(f"energy-aware cannot refit {type(module).__name__} with padding={module.padding!r}")
        cols = F.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)  # (N, C*k*k, L)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    return x.reshape(-1, x.shape[-1])


def _outputs(module: nn.Module, z: torch.Tensor) -> torch.Tensor:
    if isinstance(module, nn.Conv2d):
        return z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])  # rows in unfold's (n, position) order
    return z.reshape(-1, z.shape[-1])


def refit_consumer(sctx, name, module, reference_model, reference, kept_inputs, damping) -> None:
    """Least-squares refit of ``module``'s kept input weights to the reference outputs."""
    per_col = module.weight[0, 0].numel() if isinstance(module, nn.Conv2d) else 1
    cols = (kept_inputs[:, None] * per_col + torch.arange(per_col)[None, :]).reshape(-1)
    got, want = [], []
    h1 = module.register_forward_pre_hook(lambda m, a: got.append(a[0].detach()))
    h2 = reference.register_forward_hook(lambda m, a, out: want.append(out.detach()))
    gram = rhs = None
    try:
        with torch.no_grad():
            for x, _ in sctx.calib.batches:
                got.clear(), want.clear()
                sctx.model(x)
                reference_model(x)
                X = _patches(module, got[0]).double()[:, cols.to(got[0].device)]
                Z = _outputs(module, want[0]).double()
                if module.bias is not None:
                    Z = Z - module.bias.detach().double()
                gram = X.T @ X if gram is None else gram + X.T @ X
                rhs = X.T @ Z if rhs is None else rhs + X.T @ Z
    finally:
        h1.remove(), h2.remove()
    lam = damping * float(gram.diagonal().mean()) if gram.numel() else 0.0
    if not lam > 0:
        lam = damping
    sctx.ctx.numerics.damp(f"energy-aware refit {name}", lam)
    gram.diagonal().add_(lam)
    sol = torch.linalg.solve(gram, rhs)  # (K, out)
    with torch.no_grad():
        w = module.weight.reshape(module.weight.shape[0], -1)
        w[:, cols] = sol.T.to(w.dtype)


__all__ = ["RandomSearch", "EnergyAware", "layer_energy", "energy_first_counts"]
