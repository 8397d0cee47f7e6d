"""Greedy pruning with validation and rollback (ALGORITHMS.md section 5)."""
from __future__ import annotations

import math
import numbers

import torch

from ..allocation import num_pruned, uniform_count
from ..context import PruneContext
from ..errors import BrainsurgeonError
from ..registry import register
from .base import PruningMethod, SaliencyMethod

UNITS = ("chunk", "layer")
SHORTFALL = ("fill", "stop")


@torch.no_grad()
def validation_loss(ctx: PruneContext) -> float:
    """Mean loss of the working model over the calibration (held-out) batches."""
    total, n = 0.0, 0
    for x, y in ctx.calib:
        total += float(ctx.loss_fn(ctx.model(x), y)) * len(x)
        n += len(x)
    return total / n


@register("greedy")
class GreedyRollback(PruningMethod):
    """Greedy search with validation and rollback (the loop of ALGORITHMS.md section 5).

    Repeatedly take the candidate that looks least important, remove it, re-evaluate the loss on
    held-out data, keep the removal if ``L_new <= L_0 (1 + tolerance)`` (``L_0``: the unpruned
    model's loss), roll it back otherwise; stop at the target or when nothing can be removed.
    This is the validation-driven loop of early pruning work (e.g. Sietsma & Dow 1988; Reed 1993,
    "Pruning algorithms - a survey"), with a modern criterion to order the candidates.

    Candidates (``unit``):

    * ``"chunk"``: the next ``chunk`` fraction of a layer's weights in the order of a base
      ``criterion`` (any registered saliency method, lowest first); the layer whose next chunk has
      the lowest mean saliency is tried first. A rejected chunk is halved and retried; a layer
      whose single weight is rejected is closed. Each layer stops at its cap: ``round(s n_l)``
      under ``allocation="uniform"``, ``floor(max_layer_sparsity n_l)`` under ``"global"``.
    * ``"layer"``: whole layers (useful when a residual path bypasses them), least important first
      by mean saliency, accepted only if the target count is not exceeded; layers are emptied.

    The calibration data is the validation data: pass held-out samples as ``data``.

    When the tolerance stops the search before the target (``shortfall``): ``"stop"`` returns the
    model as it is, below the target sparsity (the loop exactly as in section 5); ``"fill"`` (the
    default, so that ``bs.prune`` meets its exact-count contract) removes the rest one chunk at a
    time, each time the candidate chunk with the smallest measured validation loss, and records
    this as a numerical fallback. The report's ``greedy`` entry gives accepted/rejected/forced
    counts, the losses and whether the target was reached within the tolerance.
    """

    summary = "Greedy removal, kept only if validation loss stays within a tolerance (rollback otherwise)."

    def __init__(
        self, criterion: str = "magnitude", unit: str = "chunk", chunk: float = 0.05, tolerance: float = 0.1,
        shortfall: str = "fill",
    ) -> None:
        from ..registry import _REGISTRY, _load_builtin

        _load_builtin()
        cls = _REGISTRY.get(criterion) if isinstance(criterion, str) else None
        if cls is None or not issubclass(cls, SaliencyMethod):
            saliency = sorted(n for n, c in _REGISTRY.items() if issubclass(c, SaliencyMethod))
            raise BrainsurgeonError(f"greedy criterion must be a saliency method ({', '.join(saliency)}), got {criterion!r}")
        if unit not in UNITS:
            raise BrainsurgeonError(f"greedy unit must be one of {UNITS}, got {unit!r}")
        if isinstance(chunk, bool) or not isinstance(chunk, numbers.Real) or not 0 < chunk <= 1:
            raise BrainsurgeonError(f"greedy chunk must be a fraction of a layer in (0, 1], got {chunk!r}")
        if isinstance(tolerance, bool) or not isinstance(tolerance, numbers.Real) or not (tolerance >= 0 and math.isfinite(tolerance)):
            raise BrainsurgeonError(f"greedy tolerance must be a non-negative number (relative loss increase), got {tolerance!r}")
        if shortfall not in SHORTFALL:
            raise BrainsurgeonError(f"greedy shortfall must be one of {SHORTFALL}, got {shortfall!r}")
        self.shortfall = shortfall
        self.criterion = criterion
        self.unit = unit
        self.chunk = float(chunk)
        self.tolerance = float(tolerance)

    def validate(self, ctx: PruneContext) -> None:
        if ctx.options.structure.is_nm:
            raise BrainsurgeonError("greedy removes chunks or layers; it cannot produce N:M patterns")

    def _caps(self, ctx: PruneContext) -> dict[str, int]:
        o = ctx.options
        if o.allocation == "global":
            return {t.name: math.floor(o.max_layer_sparsity * t.weight.numel() + 1e-9) for t in ctx.targets}
        return {t.name: uniform_count(t.weight.numel(), o.sparsity, o.max_layer_sparsity) for t in ctx.targets}

    def run(self, ctx: PruneContext) -> dict[str, torch.Tensor]:
        from ..registry import get_method

        with ctx.timer("statistics"):
            scores = {k: v.detach().double().reshape(-1) for k, v in get_method(self.criterion)().scores(ctx).items()}
        with ctx.timer("solve"):
            base = validation_loss(ctx)
            limit = base * (1.0 + self.tolerance) if base > 0 else self.tolerance
            caps = self._caps(ctx)
            total = sum(t.weight.numel() for t in ctx.targets)
            # uniform: every layer at its own exact count; global: the overall count under the caps
            per_layer = ctx.options.allocation != "global" and self.unit == "chunk"
            want = sum(caps.values()) if per_layer else num_pruned(total, ctx.options.sparsity)
            log = {"accepted": 0, "rejected": 0, "forced": 0, "evaluations": 0}
            if self.unit == "layer":
                pruned = self._layers(ctx, scores, want, limit, log)
            else:
                pruned = self._chunks(ctx, scores, caps, want, limit, log)
            within = sum(len(v) for v in pruned.values())
            if within < want and self.shortfall == "fill":
                pruned = self._fill(ctx, scores, caps, pruned, want, log)
                ctx.numerics.fallback(
                    "greedy", f"the tolerance stopped the search at {within} of {want} weights; the remaining "
                    f"{want - within} were removed by least validation loss (shortfall='fill'; 'stop' keeps the model there)",
                )
            masks = {}
            for t in ctx.targets:
                keep = torch.ones(t.weight.numel(), dtype=torch.bool, device=t.weight.device)
                keep[pruned[t.name]] = False
                masks[t.name] = keep.view_as(t.weight)
            n_pruned = sum(len(v) for v in pruned.values())
            ctx.extra_report["greedy"] = {
                **log, "unit": self.unit, "criterion": self.criterion, "base_val_loss": base, "limit": limit,
                "final_val_loss": validation_loss(ctx), "target_count": want, "pruned_count": n_pruned,
                "reached_target": n_pruned == want, "reached_within_tolerance": within == want,
            }
            ctx.extra_report["target_sparsity"] = {t.name: len(pruned[t.name]) / t.weight.numel() for t in ctx.targets}
        return masks

    def _try(self, ctx, target, idx: torch.Tensor, limit: float, log: dict) -> bool:
        """Zero ``idx`` of ``target``'s weight; keep it if the validation loss stays within ``limit``."""
        flat = target.weight.data.view(-1)
        saved = flat[idx].clone()
        flat[idx] = 0
        loss = validation_loss(ctx)
        log["evaluations"] += 1
        if math.isfinite(loss) and loss <= limit:
            log["accepted"] += 1
            return True
        flat[idx] = saved  # roll back
        log["rejected"] += 1
        return False

    def _chunks(self, ctx, scores, caps, want: int, limit: float, log: dict) -> dict[str, torch.Tensor]:
        order = {n: torch.argsort(s, stable=True) for n, s in scores.items()}
        pos = dict.fromkeys(order, 0)
        size = {t.name: max(1, int(round(self.chunk * t.weight.numel()))) for t in ctx.targets}
        open_layers = [t for t in ctx.targets if caps[t.name] > 0]
        pruned = 0
        while pruned < want and open_layers:
            def next_idx(t):
                p = pos[t.name]
                c = min(size[t.name], caps[t.name] - p, want - pruned)
                return order[t.name][p : p + c]

            t = min(open_layers, key=lambda t: float(scores[t.name][next_idx(t)].mean()))
            idx = next_idx(t)
            if self._try(ctx, t, idx.to(t.weight.device), limit, log):
                pos[t.name] += len(idx)
                pruned += len(idx)
            elif size[t.name] > 1:
                size[t.name] = max(1, size[t.name] // 2)  # a smaller step may still fit
            else:
                open_layers.remove(t)
            open_layers = [u for u in open_layers if pos[u.name] < caps[u.name]]
        return {n: order[n][: pos[n]] for n in order}

    def _layers(self, ctx, scores, want: int, limit: float, log: dict) -> dict[str, torch.Tensor]:
        pruned = {n: torch.empty(0, dtype=torch.long) for n in scores}
        count = 0
        for t in sorted(ctx.targets, key=lambda t: float(scores[t.name].mean())):
            n = t.weight.numel()
            if count + n > want:
                continue
            idx = torch.arange(n, device=t.weight.device)
            if self._try(ctx, t, idx, limit, log):
                pruned[t.name] = idx.cpu()
                count += n
        return pruned

    def _fill(self, ctx, scores, caps, pruned, want: int, log: dict) -> dict[str, torch.Tensor]:
        """Remove the rest regardless of the tolerance: each time the layer chunk whose removal
        measures the smallest validation loss (every open layer's next chunk is tried)."""
        order = {}
        for t in ctx.targets:
            done = torch.zeros(t.weight.numel(), dtype=torch.bool)
            done[pruned[t.name]] = True
            rest = torch.argsort(scores[t.name], stable=True)
            order[t.name] = torch.cat([pruned[t.name], rest[~done[rest]]])  # pruned first, then by criterion
        pos = {n: len(p) for n, p in pruned.items()}
        size = {t.name: max(1, int(round(self.chunk * t.weight.numel()))) for t in ctx.targets}
        count = sum(pos.values())
        while count < want:
            best = None
            for t in ctx.targets:
                c = min(size[t.name], caps[t.name] - pos[t.name], want - count)
                if c <= 0:
                    continue
                idx = order[t.name][pos[t.name] : pos[t.name] + c].to(t.weight.device)
                flat = t.weight.data.view(-1)
                saved = flat[idx].clone()
                flat[idx] = 0
                loss = validation_loss(ctx)
                log["evaluations"] += 1
                flat[idx] = saved
                if best is None or loss < best[0]:
                    best = (loss, t, idx)
            if best is None:  # every layer at its cap: cannot happen for valid caps (checked by the engine)
                break
            _, t, idx = best
            t.weight.data.view(-1)[idx] = 0
            pos[t.name] += len(idx)
            count += len(idx)
            log["forced"] += 1
        return {n: order[n][: pos[n]] for n in order}
