"""Per-layer sensitivity (ALGORITHMS.md section 6): prune one layer at a time over a range of ratios.

Each layer is pruned alone, with the chosen method, at every ratio; the loss and accuracy of the
result on the evaluation data make that layer's curve (Han et al. 2015, Fig. 5; Li et al. 2017,
"Pruning filters for efficient ConvNets"). The curves choose per-layer ratios: :meth:`Sensitivity.allocate`
meets an overall target with the least *predicted* damage, where the damage of a layer at ratio r is
the loss increase read off its curve (linear interpolation, monotone envelope, last slope beyond the
measured range), and layers are assumed to add up independently.
"""
from __future__ import annotations

import heapq
import math
import numbers
from dataclasses import dataclass, field


from .allocation import num_pruned
from .errors import BrainsurgeonError
from .evaluate import evaluate
from .targets import find_targets

#: ratio step of the allocation search (1% of a layer's weights)
ALLOCATION_STEP = 0.01


def default_ratios(target: float, cap: float = 0.99) -> list[float]:
    """A grid dense near high sparsity that reaches past ``target`` (for ``allocation='sensitivity'``)."""
    grid = [0.25, 0.5, 0.7, 0.8, 0.9, 0.95, 0.98]
    top = min(cap, max(target + (1 - target) / 2, 0.5))
    return sorted({r for r in grid if r < top} | {round(top, 4)})


def _check_ratios(ratios) -> list[float]:
    if isinstance(ratios, (str, bytes)) or not hasattr(ratios, "__iter__"):
        raise BrainsurgeonError(f"ratios must be a list of fractions in (0, 1), e.g. [0.25, 0.5, 0.75]; got {ratios!r}")
    out = []
    for r in ratios:
        if isinstance(r, bool) or not isinstance(r, numbers.Real) or not 0 < r < 1:
            raise BrainsurgeonError(f"every ratio must be a number in (0, 1), got {r!r}")
        out.append(float(r))
    if not out:
        raise BrainsurgeonError("ratios is empty: give the fractions to prune each layer to, e.g. [0.25, 0.5, 0.75]")
    return sorted(set(out))


@dataclass
class Sensitivity:
    """Loss and accuracy of the model with one layer pruned at each ratio."""

    method: str
    ratios: list[float]
    base: dict  # {"loss", "accuracy"} of the unpruned model
    curves: dict[str, list[dict]]  # layer -> [{"ratio", "loss", "accuracy"}] in ratio order
    numel: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"method": self.method, "ratios": self.ratios, "base": self.base, "curves": self.curves, "numel": self.numel}

    def damage(self, layer: str, ratio: float) -> float:
        """Predicted loss increase of pruning ``layer`` alone to ``ratio`` (0 at ratio 0, non-decreasing)."""
        xs = [0.0] + [p["ratio"] for p in self.curves[layer]]
        ys = [0.0]
        for p in self.curves[layer]:
            ys.append(max(ys[-1], p["loss"] - self.base["loss"]))  # more pruning never predicted to help
        if ratio <= xs[-1]:
            for i in range(1, len(xs)):
                if ratio <= xs[i]:
                    t = (ratio - xs[i - 1]) / (xs[i] - xs[i - 1])
                    return ys[i - 1] + t * (ys[i] - ys[i - 1])
        slope = max((ys[-1] - ys[-2]) / (xs[-1] - xs[-2]), 0.0)
        return ys[-1] + slope * (ratio - xs[-1])

    def allocate(self, target: float, max_layer_sparsity: float = 0.99) -> dict[str, float]:
        """Per-layer sparsities whose weighted mean is ``target`` (exact in counts), least predicted damage.

        Greedy on marginal damage per weight: repeatedly raise by one step the layer whose next
        step adds the least predicted loss per weight removed, until the target count is met; the
        last step is trimmed so the total count is exact.
        """
        if isinstance(target, bool) or not isinstance(target, numbers.Real) or not 0 <= target < 1:
            raise BrainsurgeonError(f"target sparsity must be in [0, 1), got {target!r}")
        if not 0 < max_layer_sparsity < 1:
            raise BrainsurgeonError(f"max_layer_sparsity must be in (0, 1), got {max_layer_sparsity!r}")
        total = sum(self.numel.values())
        want = num_pruned(total, target)
        caps = {n: math.floor(max_layer_sparsity * k + 1e-9) for n, k in self.numel.items()}
        if sum(caps.values()) < want:
            raise BrainsurgeonError(
                f"target {target} needs {want} of {total} weights pruned but max_layer_sparsity="
                f"{max_layer_sparsity} allows only {sum(caps.values())}; raise the cap or lower the target"
            )
        counts = dict.fromkeys(self.numel, 0)

        def next_step(name):
            n = self.numel[name]
            step = min(max(1, int(round(ALLOCATION_STEP * n))), caps[name] - counts[name])
            if step <= 0:
                return None
            cost = self.damage(name, (counts[name] + step) / n) - self.damage(name, counts[name] / n)
            return (cost / step, name, step)

        heap = [e for e in map(next_step, self.numel) if e is not None]
        heapq.heapify(heap)
        pruned = 0
        while pruned < want:
            _, name, step = heapq.heappop(heap)
            step = min(step, want - pruned)
            counts[name] += step
            pruned += step
            entry = next_step(name)
            if entry is not None:
                heapq.heappush(heap, entry)
        return {n: counts[n] / self.numel[n] for n in self.numel}

    def plot(self, path) -> None:
        """Loss and accuracy against ratio, one line per layer (PNG)."""
        from .reports import plot_sensitivity

        plot_sensitivity(self.to_dict(), path)


def sensitivity(
    model,
    data,
    method: str = "magnitude",
    ratios=(0.25, 0.5, 0.75, 0.9),
    eval_data=None,
    *,
    layers=None,
    loss_fn=None,
    seed: int = 0,
    progress=None,
    **prune_options,
) -> Sensitivity:
    """Prune each layer alone at each ratio with ``method`` and record loss/accuracy on ``eval_data``
    (default: ``data``). ``prune_options`` go to ``bs.prune`` (``num_samples``, ``damping``, method options)."""
    from .engine import prune_step
    from .progress import progress_enabled, track

    ratios = _check_ratios(ratios)
    names = [t.name for t in find_targets(model, layers)]
    numel = {t.name: t.weight.numel() for t in find_targets(model, layers)}
    eval_data = data if eval_data is None else eval_data
    device = prune_options.get("device", "cpu")
    eval_loss = None if loss_fn is None else loss_fn
    base = evaluate(model, eval_data, loss_fn=eval_loss, device=device)
    curves: dict[str, list[dict]] = {}
    for name in track(names, "sensitivity", progress_enabled(progress), total=len(names)):
        curves[name] = []
        for r in ratios:
            res = prune_step(model, data, method, r, layers=[name], loss_fn=loss_fn, seed=seed, progress=False, **prune_options)
            m = evaluate(res.model, eval_data, loss_fn=eval_loss, device=device)
            curves[name].append({"ratio": r, "loss": m["loss"], "accuracy": m["accuracy"]})
    return Sensitivity(
        method=method, ratios=ratios, base={"loss": base["loss"], "accuracy": base["accuracy"]},
        curves=curves, numel=numel,
    )
