"""How many heads and FFN neurons each transformer layer loses, under a parameter, FLOPs or
latency budget.

Every unit u has a score s_u (the criterion's estimate of the loss increase when u goes; or an
importance, normalized per layer and unit type by its L2 norm when the criterion asks) and a cost
c_u (its parameters, its prefill FLOPs or its measured latency slope). With two unit types whose
costs are constant within a type, the search of Kwon et al. 2022 (Algorithm 1, "A Fast
Post-Training Pruning Framework for Transformers") is exact for additive scores: for every number
k of heads removed (the k cheapest in score, per-layer caps respected), remove the fewest neurons
n(k) that meet the budget, and keep the k minimising S_heads(k) + S_neurons(n(k)). Per-layer caps
(at most ``floor(cap * units)`` units and never the last FFN neuron; never the last head unless
``allow_empty_attention``) make the capped order "ascending score, skipping a layer's units beyond
its cap", which is the optimum for a per-layer-capped selection.

``uniform`` allocation removes the same fraction of heads and of neurons from every layer, the
fraction found by bisection so the removed cost meets the budget.

With ``prune_query_heads=True`` every key/value group of a layer must keep the same number of query
heads (``repeat_kv``), so the allocation works on *slices*: slice j of a layer is the j-th least
important query head of every group (score: their sum; cost: num_kv_heads query heads).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import BrainsurgeonError
from .transformer import LayerUnits


@dataclass
class Candidates:
    """Per layer and unit type: scores sorted ascending (slices for query-head mode), the cost of
    one unit and the cap (how many may go)."""

    scores: list[torch.Tensor]  # per layer, ascending
    cost: list[float]  # per layer, cost of one unit / slice
    cap: list[int]


def head_slices(u: LayerUnits, s: torch.Tensor) -> torch.Tensor:
    """Slice scores of a layer's heads: the units themselves, or in query-head mode the sum over
    the kv groups of their j-th lowest query-head score."""
    if not u.prune_query_heads:
        return s
    return torch.sort(s.view(u.num_kv_heads, u.group_size), dim=1).values.sum(0)


def candidates(layers, scores, unit_cost, cap, allow_empty_attention) -> tuple[Candidates, Candidates]:
    heads, neurons = Candidates([], [], []), Candidates([], [], [])
    for i, u in enumerate(layers):
        hs = head_slices(u, scores[u.heads_key].double())
        per = u.num_kv_heads if u.prune_query_heads else 1
        n_h = hs.numel()
        heads.scores.append(torch.sort(hs).values)
        heads.cost.append(unit_cost["head"][i] * per)
        # allow_empty_attention lifts the cap for heads: a layer may lose all of them
        heads.cap.append(n_h if allow_empty_attention else min(math.floor(cap * n_h + 1e-9), n_h - 1))
        ns = scores[u.neurons_key].double()
        neurons.scores.append(torch.sort(ns).values)
        neurons.cost.append(unit_cost["neuron"][i])
        neurons.cap.append(min(math.floor(cap * ns.numel() + 1e-9), ns.numel() - 1))
    return heads, neurons


def _capped_order(c: Candidates) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(layer index, score, cost) of the removable units in the capped ascending order."""
    layer = torch.cat([torch.full((k,), i, dtype=torch.long) for i, k in enumerate(c.cap)])
    score = torch.cat([s[:k] for s, k in zip(c.scores, c.cap)])
    cost = torch.cat([torch.full((k,), c.cost[i], dtype=torch.float64) for i, k in enumerate(c.cap)])
    order = torch.argsort(score, stable=True)
    return layer[order], score[order], cost[order]


def max_removable(heads: Candidates, neurons: Candidates) -> float:
    return sum(k * c for k, c in zip(heads.cap, heads.cost)) + sum(k * c for k, c in zip(neurons.cap, neurons.cost))


def global_counts(heads: Candidates, neurons: Candidates, remove: float) -> tuple[list[int], list[int]]:
    """Kwon et al.'s search: slices of heads and neurons to remove per layer, removing at least
    ``remove`` cost at the least summed score."""
    hl, hs, hc = _capped_order(heads)
    nl, ns, nc = _capped_order(neurons)
    h_cost = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(hc, 0)])
    h_score = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(hs, 0)])
    n_cost = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(nc, 0)])
    n_score = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(ns, 0)])
    need = (remove - h_cost).clamp_min(0)
    # fewest neurons whose cost covers the rest (tolerance for float sums)
    k_n = torch.searchsorted(n_cost, need - 1e-6 * max(remove, 1.0))
    ok = k_n < len(n_cost)
    total = torch.where(ok, h_score + n_score[k_n.clamp(max=len(n_cost) - 1)], torch.full_like(h_score, math.inf))
    if not torch.isfinite(total).any():
        raise BrainsurgeonError("the budget cannot be met under the per-layer caps")  # checked before; a bug
    k_h = int(torch.argmin(total))
    kn = int(k_n[k_h])
    h_counts = torch.bincount(hl[:k_h], minlength=len(heads.cap)).tolist()
    n_counts = torch.bincount(nl[:kn], minlength=len(neurons.cap)).tolist()
    return h_counts, n_counts


def ordered_counts(heads: Candidates, neurons: Candidates, remove: float) -> tuple[list[int], list[int]]:
    """FLAP's global order: heads and neurons merged by ascending score (comparable scores, e.g.
    standardized), removed in that order regardless of their cost until ``remove`` is met."""
    hl, hs, hc = _capped_order(heads)
    nl, ns, nc = _capped_order(neurons)
    kind = torch.cat([torch.zeros_like(hl), torch.ones_like(nl)])
    layer, cost = torch.cat([hl, nl]), torch.cat([hc, nc])
    order = torch.argsort(torch.cat([hs, ns]), stable=True)
    k = int(torch.searchsorted(torch.cumsum(cost[order], 0), remove * (1 - 1e-9))) + 1
    chosen = order[:k]
    h = torch.bincount(layer[chosen][kind[chosen] == 0], minlength=len(heads.cap)).tolist()
    n = torch.bincount(layer[chosen][kind[chosen] == 1], minlength=len(neurons.cap)).tolist()
    return h, n


def uniform_counts(heads: Candidates, neurons: Candidates, remove: float) -> tuple[list[int], list[int]]:
    """The same fraction r of each layer's heads and neurons (rounded, capped), the smallest r
    (bisection) whose removed cost meets ``remove``."""
    def at(r: float):
        h = [min(round(r * len(s)), k) for s, k in zip(heads.scores, heads.cap)]
        n = [min(round(r * len(s)), k) for s, k in zip(neurons.scores, neurons.cap)]
        cost = sum(a * c for a, c in zip(h, heads.cost)) + sum(a * c for a, c in zip(n, neurons.cost))
        return h, n, cost

    lo, hi = 0.0, 1.0
    if at(hi)[2] < remove * (1 - 1e-9):
        raise BrainsurgeonError("uniform allocation cannot meet the budget under the per-layer caps; use allocation='global'")
    for _ in range(60):
        mid = (lo + hi) / 2
        if at(mid)[2] >= remove * (1 - 1e-9):
            hi = mid
        else:
            lo = mid
    h, n, _ = at(hi)
    return h, n


def round_neurons(layers: list[LayerUnits], n_counts: list[int], round_to: int | None) -> tuple[list[int], list[str]]:
    """Each layer keeps a multiple of ``round_to`` FFN neurons (the nearest, at least ``round_to``)."""
    if not round_to or round_to <= 1:
        return n_counts, []
    out, changed = [], []
    for u, k in zip(layers, n_counts):
        w = u.ffn_width
        if w < round_to:
            out.append(k)
            continue
        kept = min(w, max(round_to, int(math.floor((w - k) / round_to + 0.5)) * round_to))
        out.append(w - kept)
        if w - kept != k:
            changed.append(u.name)
    return out, changed
