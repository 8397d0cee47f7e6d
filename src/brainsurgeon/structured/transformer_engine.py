"""``bs.prune(hf_model, data, method, ..., structure="channel")``: heads and FFN neurons.

Flow: validate (budget, method, options) -> working copy and token batches -> units of every
block -> budget reachable under the caps? -> the criterion's scores -> allocation (global, Kwon
et al.'s search; or uniform) -> the criterion's selection and compensation -> compaction (or
zeroing with ``compact=False``) -> cost before/after (params, FLOPs, measured prefill and decode
latency) and the report. ``bs.prune_sweep`` runs the steps up to the scores once and the rest per
sparsity, each on a fresh copy of the dense model (``sweep_transformer``).

Criteria are :class:`TransformerMethod` subclasses: ``scores`` gives one non-negative float64
score per unit (higher = kept; a loss-increase estimate unless ``normalize``), ``select`` may
rearrange which units go within the allocated counts, ``compensate`` may change kept weights.
"""
from __future__ import annotations

import copy
import math
import numbers
import time
from dataclasses import dataclass, field
from typing import ClassVar, Iterator

import torch
from torch import nn

from ..context import Numerics, Timings
from ..data import Calibration
from ..errors import BrainsurgeonError
from ..progress import progress_enabled, track
from .groups import StructuredMethod
from .transformer import LayerUnits, UnitCosts, compact_units, layer_units, zero_units
from .transformer_alloc import candidates, global_counts, max_removable, ordered_counts, round_neurons, uniform_counts

#: prefill length of the cost model and of the latency measurement
SEQ_LEN = 512


@dataclass
class TransformerContext:
    model: nn.Module  # the HF working copy
    view: nn.Module  # TokenView over it
    layers: list[LayerUnits]
    calib: Calibration
    loss_fn: object
    damping: float | None
    seed: int
    show_progress: bool = False
    numerics: Numerics = field(default_factory=Numerics)
    timer: Timings = field(default_factory=Timings)
    notes: list[str] = field(default_factory=list)
    #: costs and total prunable params of the dense units (the report reads them after compaction)
    dense_costs: "UnitCosts | None" = None
    dense_params: float = 0.0
    #: the criterion's score per unit key (set by the statistics; a sweep's budgets share them)
    scores: dict | None = None
    #: the measured per-unit latency table of a latency budget
    latency_table: dict | None = None

    def track(self, iterable, description: str, total: int | None = None):
        return track(iterable, description, self.show_progress, total)


class TransformerMethod(StructuredMethod):
    """Base class of head/neuron criteria (see the module docstring). A structure="channel" method
    whose units are heads and FFN neurons of an HF transformer: ``scores``/``select``/``compensate``
    replace the dependency-group interface (the CNN engine refuses these methods by name)."""

    structures: ClassVar[tuple[str, ...]] = ("channel",)
    #: scores are importances of arbitrary scale: L2-normalize them per layer and unit type
    normalize: ClassVar[bool] = False
    #: global search: "cost" (Kwon et al.: least summed score for the budget) or "order" (FLAP:
    #: ascending score, whatever a unit costs)
    search: ClassVar[str] = "cost"

    def scores(self, tctx: TransformerContext) -> dict[str, torch.Tensor]:
        raise NotImplementedError  # abstract: each criterion implements it

    def select(self, tctx: TransformerContext, counts: dict[str, int]) -> dict[str, torch.Tensor]:
        """Keep-masks removing ``counts[key]`` units (slices in query-head mode) of lowest score."""
        return lowest_units(tctx.layers, tctx.scores, counts)

    def compensate(self, tctx: TransformerContext, keep: dict[str, torch.Tensor]) -> None:
        """Change kept weights of ``tctx.model`` (default: nothing)."""


def lowest_units(layers: list[LayerUnits], scores: dict[str, torch.Tensor], counts: dict[str, int]) -> dict[str, torch.Tensor]:
    keep = {}
    for u in layers:
        s = scores[u.heads_key]
        k = counts[u.heads_key]
        if u.prune_query_heads:  # k query heads of every kv group
            grouped = s.view(u.num_kv_heads, u.group_size)
            mask = torch.ones_like(grouped, dtype=torch.bool)
            idx = torch.argsort(grouped, dim=1, stable=True)[:, :k]
            mask.scatter_(1, idx, False)
            keep[u.heads_key] = mask.reshape(-1)
        else:
            keep[u.heads_key] = _lowest(s, k)
        keep[u.neurons_key] = _lowest(scores[u.neurons_key], counts[u.neurons_key])
    return keep


def _lowest(s: torch.Tensor, k: int) -> torch.Tensor:
    keep = torch.ones(s.numel(), dtype=torch.bool)
    keep[torch.argsort(s, stable=True)[:k]] = False
    return keep


# ----------------------------------------------------------------------------- options
@dataclass
class Budget:
    kind: str  # "params", "flops" or "latency"
    keep: float  # fraction of the cost kept (params: of the prunable params)


def parse_budget(sparsity, flops_target, latency_target) -> Budget:
    given = {k: v for k, v in (("sparsity", sparsity), ("flops_target", flops_target), ("latency_target", latency_target)) if v is not None}
    if len(given) != 1:
        raise BrainsurgeonError(
            f"give exactly one budget: sparsity (fraction of head/FFN params removed), flops_target or latency_target "
            f"(fraction of the dense cost kept); got {sorted(given) or 'none'}"
        )
    (name, value), = given.items()
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise BrainsurgeonError(f"{name} must be a number, got {value!r}")
    if name == "sparsity":
        if not 0 <= value < 1:
            raise BrainsurgeonError(f"sparsity must be in [0, 1), got {value}")
        return Budget("params", 1.0 - float(value))
    if not 0 < value <= 1:
        raise BrainsurgeonError(f"{name} must be in (0, 1] (the fraction of the dense cost kept), got {value}")
    return Budget("flops" if name == "flops_target" else "latency", float(value))


def method_class(method: str):
    from ..registry import _REGISTRY, _VARIANTS, _load_builtin

    _load_builtin()
    cls = _VARIANTS.get((method, "transformer")) or _REGISTRY.get(method)
    if cls is None or not (isinstance(cls, type) and issubclass(cls, TransformerMethod)):
        known = sorted({n for (n, s) in _VARIANTS if s == "transformer"}
                       | {n for n, c in _REGISTRY.items() if issubclass(c, TransformerMethod)})
        raise BrainsurgeonError(
            f"method {method!r} has no head/FFN-neuron form for transformers; structure='channel' on an HF model "
            f"takes: {', '.join(known)}"
        )
    return cls


def transformer_methods() -> list[str]:
    from ..registry import _REGISTRY, _VARIANTS, _load_builtin

    _load_builtin()
    return sorted({n for (n, s) in _VARIANTS if s == "transformer"} | {n for n, c in _REGISTRY.items() if issubclass(c, TransformerMethod)})


# ----------------------------------------------------------------------------- the run
_OWN_OPTIONS = ("flops_target", "latency_target", "prune_query_heads", "allow_empty_attention", "uniform", "measure_latency")


def prune_transformer(model: nn.Module, data, method: str, sparsity, **kwargs):
    """Remove heads and FFN neurons of an HF transformer; see the module docstring and ``bs.prune``."""
    run = _setup(model, data, method, [sparsity], **kwargs)
    _statistics(run)
    return _finish(run, run.tctx, 0, run.t_start)


def sweep_transformer(model: nn.Module, data, method: str, sparsities: list[float], **kwargs) -> Iterator:
    """``prune_transformer`` at each of ``sparsities`` with the criterion's statistics computed once
    (``bs.prune_sweep``). Everything is validated now, every budget's reachability included; the
    statistics are computed when the iterator is first advanced, then each budget is allocated,
    selected, compensated and compacted on a fresh copy of the dense model, so that each result
    equals ``prune_transformer`` at that sparsity (the criteria keep no state a budget changes)."""
    opts = kwargs["method_options"]
    for k in ("flops_target", "latency_target"):
        if opts.get(k) is not None:
            raise BrainsurgeonError(f"prune_sweep sweeps sparsity: leave {k} out (or call bs.prune once per target)")
    sparsities = list(sparsities)
    return _sweep(_setup(model, data, method, sparsities, **kwargs), sparsities)


def _sweep(run: "_Run", sparsities: list[float]) -> Iterator:
    _statistics(run)
    shared_s = time.perf_counter() - run.t_start  # set-up and statistics, paid once
    # each budget starts from the random state a single call has after its statistics
    rng = torch.get_rng_state(), (torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None)
    for i in range(len(run.budgets)):
        t0 = time.perf_counter()
        torch.set_rng_state(rng[0])
        if rng[1] is not None:
            torch.cuda.set_rng_state_all(rng[1])
        res = _finish(run, _fresh_context(run), i, t0 - shared_s)
        res.report["sweep"] = {"sparsities": sparsities, "index": i, "shared": ["statistics"], "shared_s": shared_s}
        yield res


@dataclass
class _Run:
    """What every budget of one call shares: the options, the working copy (scored by
    ``_statistics``), the dense copy costs are measured against, and each budget's unit costs."""

    tctx: TransformerContext
    algo: TransformerMethod
    dense: nn.Module
    opts: dict
    budgets: list[Budget]
    costs: list[tuple[dict, float]]  # (per-unit costs, cost to remove) per budget
    allocation: str
    cap: float
    compact: bool
    round_to: int | None
    training: bool
    t_start: float

    @property
    def allow_empty(self) -> bool:
        return bool(self.opts.get("allow_empty_attention", False))


def _setup(
    model: nn.Module, data, method: str, sparsities: list, *, allocation: str, max_layer_sparsity, loss_fn, num_samples,
    damping, layers, seed, device, batch_size, progress, compact: bool, method_options: dict, round_to=None,
    recalibrate_bn="auto",
) -> _Run:
    """Validate, copy the model, find its units, validate the calibration tokens and check that every
    budget is reachable under the caps: all before any long work."""
    t_start = time.perf_counter()
    opts = {k: method_options.pop(k) for k in _OWN_OPTIONS if k in method_options}
    budgets = [parse_budget(s, opts.get("flops_target"), opts.get("latency_target")) for s in sparsities]
    _check_options(allocation, max_layer_sparsity, layers, loss_fn, compact, round_to, recalibrate_bn, opts)
    algo = method_class(method).create(**method_options)
    from ..adapters.hf import TokenView, token_batches

    work = copy.deepcopy(model).to(device).eval()
    view = TokenView(work)
    units = layer_units(work, bool(opts.get("prune_query_heads", False)))
    _check_query_mode(units)
    calib = Calibration(token_batches(data, work, batch_size=int(batch_size), num_samples=num_samples)).to(device)
    tctx = TransformerContext(work, view, units, calib, view.loss_fn, damping, int(seed), progress_enabled(progress))
    allow_empty = bool(opts.get("allow_empty_attention", False))
    costs = [_reachable(tctx, b, allow_empty, max_layer_sparsity) for b in budgets]
    tctx.dense_costs = UnitCosts.of(units, cost_seq_len(work))
    tctx.dense_params = tctx.dense_costs.total(units, "params")
    return _Run(tctx, algo, copy.deepcopy(work), opts, budgets, costs, allocation, max_layer_sparsity, compact,
                round_to, model.training, t_start)


def _reachable(tctx, budget: Budget, allow_empty: bool, cap) -> tuple[dict, float]:
    units = tctx.layers
    unit_cost, remove, dense_cost = _budget_costs(tctx, budget, allow_empty)
    heads, neurons = candidates(units, {k: torch.zeros(_n(units, k)) for k in _keys(units)}, unit_cost, cap, allow_empty)
    reachable = max_removable(heads, neurons)
    if remove > reachable * (1 + 1e-9):
        raise BrainsurgeonError(
            f"the {budget.kind} budget (keep {budget.keep:g}) needs {remove:.4g} removed but the per-layer caps allow "
            f"{reachable:.4g} ({1 - reachable / dense_cost:.3f} of the cost at least stays); raise max_layer_sparsity, "
            "pass allow_empty_attention=True, or relax the target"
        )
    return unit_cost, remove


def _statistics(run: _Run) -> None:
    torch.manual_seed(run.tctx.seed)
    with run.tctx.timer("statistics"):
        run.tctx.scores = _checked_scores(run.algo, run.tctx)


def _fresh_context(run: _Run) -> TransformerContext:
    """A context over a fresh copy of the dense model carrying the shared scores, notes, damping
    records and timings (a budget's compensation changes only its own copy)."""
    from dataclasses import replace

    from ..adapters.hf import TokenView

    base = run.tctx
    work = copy.deepcopy(run.dense)
    timer = Timings()
    timer.seconds.update(base.timer.seconds)
    # replace() carries the rest, the shared scores included
    return replace(base, model=work, view=TokenView(work), layers=layer_units(work, bool(run.opts.get("prune_query_heads", False))),
                   numerics=copy.deepcopy(base.numerics), timer=timer, notes=list(base.notes))


def _finish(run: _Run, tctx: TransformerContext, i: int, t_start: float):
    """Budget ``i`` on ``tctx``'s model: allocation, selection, compensation, compaction, cost, report."""
    from ..engine import PruneResult

    algo, work, budget = run.algo, tctx.model, run.budgets[i]
    unit_cost, remove = run.costs[i]
    counts, rounded = _allocate(tctx, algo, unit_cost, remove, run.allocation, run.cap, run.allow_empty, run.round_to)
    with tctx.timer("solve"):
        keep = algo.select(tctx, counts)
        algo.compensate(tctx, keep)
    skipped = []
    if run.compact:
        skipped = compact_units(tctx.layers, keep, run.allow_empty)
    else:
        if not run.allow_empty and any(not keep[u.heads_key].any() for u in tctx.layers):
            raise BrainsurgeonError("a layer would lose every head; pass allow_empty_attention=True")
        zero_units(tctx.layers, keep)
    for p in work.parameters():
        if not torch.isfinite(p).all():
            raise RuntimeError(f"method {algo.name!r} produced non-finite weights")
    with tctx.timer("measure"):
        cost = measure_cost(run.dense, work, bool(run.opts.get("measure_latency", True)))
    report = _report(tctx, algo, budget, keep, skipped, rounded, cost, run.compact, run.allocation, run.cap, t_start)
    report["options"].update(round_to=run.round_to, **run.opts)
    if budget.kind == "latency":
        report["latency_table"] = tctx.latency_table
    if run.opts.get("uniform"):
        report["config"] = write_uniform_config(work, tctx.layers, keep)
    work.train(run.training)
    return PruneResult(model=work, report=report, masks={k: v.clone() for k, v in keep.items()})


def _keys(units):
    return [k for u in units for k in (u.heads_key, u.neurons_key)]


def _n(units, key):
    for u in units:
        if key == u.heads_key:
            return u.num_heads if u.prune_query_heads else u.num_kv_heads
        if key == u.neurons_key:
            return u.ffn_width
    raise KeyError(key)


def _check_options(allocation, cap, layers, loss_fn, compact, round_to, recalibrate_bn, opts) -> None:
    if allocation not in ("global", "uniform"):
        raise BrainsurgeonError(f"allocation must be 'global' or 'uniform' for heads/neurons, got {allocation!r}")
    if isinstance(cap, bool) or not isinstance(cap, numbers.Real) or not 0 < cap < 1:
        raise BrainsurgeonError(f"max_layer_sparsity must be in (0, 1), got {cap!r}")
    if layers is not None:
        raise BrainsurgeonError("layers= does not apply to head/neuron pruning: every block's heads and FFN neurons are units")
    if loss_fn is not None:
        raise BrainsurgeonError("loss_fn= does not apply to HF models: the model's own loss is used (TokenView.loss_fn)")
    if not isinstance(compact, bool):
        raise BrainsurgeonError(f"compact must be True or False, got {compact!r}")
    if round_to is not None and (isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1):
        raise BrainsurgeonError(f"round_to must be a positive integer (FFN neurons kept per layer a multiple of it), got {round_to!r}")
    if recalibrate_bn not in ("auto", False):
        raise BrainsurgeonError("recalibrate_bn does not apply to transformers (no BatchNorm)")
    for k in ("prune_query_heads", "allow_empty_attention", "uniform", "measure_latency"):
        if k in opts and not isinstance(opts[k], bool):
            raise BrainsurgeonError(f"{k} must be True or False, got {opts[k]!r}")
    if opts.get("uniform") and allocation != "uniform":
        raise BrainsurgeonError("uniform=True (one head count and FFN width for every layer) needs allocation='uniform'")


def _check_query_mode(units) -> None:
    for u in units:
        if u.prune_query_heads and u.qkv is not None:
            raise BrainsurgeonError(f"prune_query_heads=True needs separate q/k/v projections; {u.qkv.name} is fused")


def _checked_scores(algo, tctx) -> dict[str, torch.Tensor]:
    scores = algo.scores(tctx)
    out = {}
    for u in tctx.layers:
        for key, n in ((u.heads_key, u.num_head_units), (u.neurons_key, u.ffn_width)):
            s = scores.get(key)
            if s is None or s.shape != (n,):
                raise RuntimeError(f"{algo.name}: no score of shape ({n},) for {key}")
            s = s.detach().double().cpu()
            if not torch.isfinite(s).all() or (s < 0).any():
                raise RuntimeError(f"{algo.name}: scores of {key} must be finite and non-negative")
            out[key] = s
    return out


def _normalized(units, scores, unit_cost):
    """Importances of arbitrary scale made comparable across layers and unit types: each unit's
    score relative to the mean of its layer and type, times its cost. The budget search then
    removes, per unit of cost, what is least important relative to its peers (an L2 norm alone
    would rank a layer's 3 head groups against its 1536 neurons by their count)."""
    out = {}
    for i, u in enumerate(units):
        for key, cost in ((u.heads_key, unit_cost["head"][i]), (u.neurons_key, unit_cost["neuron"][i])):
            s = scores[key]
            mean = s.mean()
            out[key] = (s / mean if mean > 0 else s) * cost
    return out


def _allocate(tctx, algo, unit_cost, remove, allocation, cap, allow_empty, round_to):
    units = tctx.layers
    scores = _normalized(units, tctx.scores, unit_cost) if algo.normalize else tctx.scores
    heads, neurons = candidates(units, scores, unit_cost, cap, allow_empty)
    solve = (ordered_counts if algo.search == "order" else global_counts) if allocation == "global" else uniform_counts
    h, n = solve(heads, neurons, remove)
    n, rounded = round_neurons(units, n, round_to)
    counts = {}
    for u, a, b in zip(units, h, n):
        counts[u.heads_key], counts[u.neurons_key] = a, b
    return counts, rounded


# ----------------------------------------------------------------------------- costs
def _budget_costs(tctx, budget: Budget, allow_empty: bool):
    """(per-unit costs {"head": [...], "neuron": [...]}, cost to remove, dense total) of the budget."""
    units = tctx.layers
    seq = cost_seq_len(tctx.model)
    costs = UnitCosts.of(units, seq)
    if budget.kind == "params":
        total = costs.total(units, "params")
        return {"head": costs.head_params, "neuron": costs.neuron_params}, (1 - budget.keep) * total, total
    if budget.kind == "flops":
        total = float(count_flops(tctx.view, seq))
        return {"head": costs.head_flops, "neuron": costs.neuron_flops}, (1 - budget.keep) * total, total
    from .transformer_latency import latency_costs

    with tctx.timer("latency_table"):
        table = latency_costs(tctx, SEQ_LEN)
    tctx.latency_table = table
    return {"head": table["head"], "neuron": table["neuron"]}, (1 - budget.keep) * table["dense_ms"], table["dense_ms"]


def cost_seq_len(model: nn.Module) -> int:
    """The prefill length of the cost model: 512 tokens, or the model's context if shorter."""
    ctx = getattr(model.config, "max_position_embeddings", None) or SEQ_LEN
    return min(SEQ_LEN, int(ctx))


def count_flops(view: nn.Module, seq_len: int) -> int:
    """Matmul FLOPs of one prefill of ``seq_len`` tokens at batch 1 (torch's FlopCounterMode)."""
    from torch.utils.flop_counter import FlopCounterMode

    device = next(view.parameters()).device
    x = torch.zeros(1, seq_len, dtype=torch.long, device=device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        view(x)
    return int(counter.get_total_flops())


def _prefill(model, x):
    model(input_ids=x, use_cache=False)


def _decode(model, prompt, steps: int):
    """``steps`` greedy tokens after ``prompt`` with the KV cache (what batch-1 generation does)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    out = model(input_ids=prompt, cache=cache, use_cache=True)
    for _ in range(steps):
        nxt = out.logits[:, -1:].argmax(-1)
        out = model(input_ids=nxt, cache=cache, use_cache=True)


def paired_ms(fns, rounds: int, budget_s: float) -> tuple[float, float, float]:
    """Median ms of two callables timed interleaved (order alternating) and the median ratio."""
    import statistics

    times = ([], [])
    start = time.perf_counter()
    for r in range(rounds):
        for i in ((0, 1) if r % 2 == 0 else (1, 0)):
            t0 = time.perf_counter()
            fns[i]()
            times[i].append(time.perf_counter() - t0)
        if time.perf_counter() - start > budget_s and r >= 2:
            break
    ratio = statistics.median(a / b for a, b in zip(*times))
    return 1000 * statistics.median(times[0]), 1000 * statistics.median(times[1]), ratio


def measure_cost(dense: nn.Module, pruned: nn.Module, latency: bool = True, decode_steps: int = 64,
                 rounds: tuple[int, int] = (9, 5), budget_s: tuple[float, float] = (20.0, 30.0)) -> dict:
    """Params, prefill FLOPs at 512 tokens and (if ``latency``) measured CPU latency of prefill
    (batch 1 x 512 tokens) and decode (batch 1, ``decode_steps`` tokens with the KV cache), dense
    and pruned timed interleaved; "speedup" = median per-round ratio dense / pruned. ``rounds`` and
    ``budget_s``: (prefill, decode) rounds at most, and seconds after which timing stops (>= 3 rounds)."""
    from ..adapters.hf import HFAdapter, TokenView

    out = {"before": {}, "after": {}, "speedup": {}}
    for key, m in (("before", dense), ("after", pruned)):
        out[key]["params"] = sum(p.numel() for p in m.parameters())
        out[key]["flops"] = count_flops(TokenView(m), cost_seq_len(m))
    out["flops_ratio"] = out["after"]["flops"] / out["before"]["flops"]
    if not latency or HFAdapter(dense).task != "causal":
        return out
    device = next(dense.parameters()).device
    g = torch.Generator().manual_seed(0)
    vocab = dense.get_input_embeddings().num_embeddings
    x = torch.randint(0, vocab, (1, cost_seq_len(dense)), generator=g).to(device)
    prompt = x[:, :16]
    limit = HFAdapter(dense).max_positions  # the decoded tokens must fit the model's context
    if limit is not None:
        decode_steps = max(1, min(decode_steps, limit - prompt.shape[1]))
    with torch.no_grad():
        for m in (dense, pruned):
            m.eval()
            _prefill(m, x)
        a, b, r = paired_ms((lambda: _prefill(dense, x), lambda: _prefill(pruned, x)), rounds=rounds[0], budget_s=budget_s[0])
        out["before"]["prefill_ms"], out["after"]["prefill_ms"], out["speedup"]["prefill"] = a, b, r
        a, b, r = paired_ms((lambda: _decode(dense, prompt, decode_steps), lambda: _decode(pruned, prompt, decode_steps)),
                            rounds=rounds[1], budget_s=budget_s[1])
        out["before"]["decode_ms"], out["after"]["decode_ms"], out["speedup"]["decode"] = a, b, r
    out["threads"] = torch.get_num_threads()
    return out


# ----------------------------------------------------------------------------- report
def _report(tctx, algo, budget, keep, skipped, rounded, cost, compact, allocation, cap, t_start) -> dict:
    layers = {}
    for u in tctx.layers:
        kh, kn = keep[u.heads_key], keep[u.neurons_key]
        layers[u.name] = {
            "heads_before": u.num_heads, "heads_after": int(kh.sum()) * u.q_heads_per_unit,
            "kv_heads_before": u.num_kv_heads, "kv_heads_after": u.num_kv_heads - len(u.kv_rows(kh)) // u.head_dim,
            "ffn_before": kn.numel(), "ffn_after": int(kn.sum()), "attention_skipped": u.name in skipped,
        }
    costs, total = tctx.dense_costs, tctx.dense_params
    removed = sum(
        int((~keep[u.heads_key]).sum()) * costs.head_params[i] + int((~keep[u.neurons_key]).sum()) * costs.neuron_params[i]
        for i, u in enumerate(tctx.layers)
    )
    notes = list(tctx.notes)
    if skipped:
        notes.append(f"attention skipped (every head removed) in {', '.join(skipped)}: those layers add only o's bias; "
                     "with a KV cache a skipped first layer leaves the cache length at 0, so decode needs a kept layer 0")
    if rounded:
        notes.append(f"round_to: FFN widths of {len(rounded)} layers rounded")
    timings = {f"{k}_s": v for k, v in tctx.timer.seconds.items()}
    timings["total_s"] = time.perf_counter() - t_start
    return {
        "method": algo.name, "method_options": algo.options(),
        "options": {"budget": budget.kind, "keep": budget.keep, "structure": "channel", "allocation": allocation,
                    "max_layer_sparsity": cap, "num_samples": tctx.calib.num_samples, "damping": tctx.damping,
                    "seed": tctx.seed, "compact": compact},
        "overall": {"prunable_params": total, "removed_params": removed, "achieved_sparsity": removed / total,
                    "heads_removed": sum(r["heads_before"] - r["heads_after"] for r in layers.values()),
                    "neurons_removed": sum(r["ffn_before"] - r["ffn_after"] for r in layers.values())},
        "layers": layers, "attention_skipped": skipped, "cost": cost, "notes": notes, "timings": timings,
        "numerics": {"damping": tctx.numerics.damping, "fallbacks": tctx.numerics.fallbacks},
    }


def write_uniform_config(model: nn.Module, units, keep) -> dict:
    """With the same head count and FFN width in every layer, set the config so that plain
    transformers builds the pruned shapes (``save_pretrained`` then loads anywhere)."""
    from ..adapters.hf import HFAdapter

    heads = {int(keep[u.heads_key].sum()) * u.q_heads_per_unit for u in units}
    kv = {u.num_kv_heads - len(u.kv_rows(keep[u.heads_key])) // u.head_dim for u in units}
    width = {int(keep[u.neurons_key].sum()) for u in units}
    if len(heads) != 1 or len(width) != 1 or len(kv) != 1:
        raise RuntimeError("uniform=True gave different counts per layer")  # allocation='uniform' guarantees it
    family = HFAdapter(model).family
    (h,), (k,), (w,) = heads, kv, width
    c = model.config
    u = units[0]
    if h != u.num_heads and family != "llama":
        raise BrainsurgeonError(
            f"{family}: the config derives head_dim from hidden_size / heads, so pruned heads cannot be written as a "
            "uniform config; prune FFN neurons only (sparsity on neurons) or keep the per-layer model (bs.save)"
        )
    if family == "llama" and h != u.num_heads and c.hidden_size % h:
        raise BrainsurgeonError(
            f"uniform=True: the installed transformers refuses a Llama config whose hidden size {c.hidden_size} is not a "
            f"multiple of the head count {h}; choose a budget that keeps a divisor of {c.hidden_size} heads"
        )
    if family == "llama":
        c.head_dim = u.head_dim
        c.num_attention_heads, c.num_key_value_heads, c.intermediate_size = h, k, w
    elif family == "gpt2":
        c.n_inner = w
    elif family == "opt":
        c.ffn_dim = w
    else:
        c.intermediate_size = w
    return {"num_attention_heads": h, "num_key_value_heads": k, "ffn_width": w}


def transformer_only(method) -> bool:
    """Whether ``method`` is registered only as a head/neuron criterion (e.g. fisher-mask, flap)."""
    from ..registry import _REGISTRY, _VARIANTS, _load_builtin

    _load_builtin()
    cls = _REGISTRY.get(method) if isinstance(method, str) else None
    return (method, "channel") not in _VARIANTS and isinstance(cls, type) and issubclass(cls, TransformerMethod)
