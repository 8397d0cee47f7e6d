"""The structured path of ``bs.prune(..., structure="channel")``.

Same validation, working copy and report frame as the unstructured engine; in between: build the
dependency groups, let the method allocate and select units, let it compensate, then either
slice the model (``compact=True``, the default) or zero the removed units (``compact=False``),
re-estimate the BatchNorm statistics, and time the pruned model against the dense one.
"""
from __future__ import annotations

import copy
import dataclasses
import time

import torch
from torch import nn

from ..allocation import Structure
from ..batchnorm import batchnorm_notes, choose_batchnorm_statistics
from ..errors import BrainsurgeonError
from ..memory import LIBC
from ..targets import find_targets
from .compact import compact as compact_model
from ..registry import get_variant
from .groups import GroupSet, StructuredContext, StructuredMethod, WholeModelMethod, build_groups, example_input
from .latency import compare
from .allocation import round_counts
from .masking import apply_masks

CHANNEL = Structure("channel")


def structured_methods() -> list[str]:
    from ..engine import _all_methods
    from ..registry import supports

    return sorted(n for n in _all_methods() if supports(n, "channel"))


@LIBC.restored_after()
def prune_channels(
    model: nn.Module, data, method: str, sparsity, *, allocation: str, max_layer_sparsity, loss_fn,
    num_samples, damping, layers, seed, device, batch_size, progress, compact: bool, method_options: dict,
    round_to: int | None = None, recalibrate_bn: bool | str = "auto",
):
    """Remove the fraction ``sparsity`` of the output units of the prunable layers; see ``bs.prune``.

    ``round_to``: each group keeps a multiple of this many units (``allocation.round_counts``).
    ``recalibrate_bn``: re-estimate the BatchNorm statistics of the pruned model on the
    calibration data: True, False, or "auto" (keep them if they lower the calibration loss; see
    ``batchnorm.choose_batchnorm_statistics``)."""
    from ..engine import PruneResult, _method_class, build_options, resolve_loss, working_context
    from .transformer_engine import transformer_only

    if transformer_only(method):
        raise BrainsurgeonError(
            f"method {method!r} prunes attention heads and FFN neurons of Hugging Face transformers; "
            f"{type(model).__name__} is not one"
        )
    t_start = time.perf_counter()
    opts = build_options(
        method, sparsity, "unstructured", allocation, max_layer_sparsity, num_samples, damping, seed, device, batch_size
    )
    if allocation not in ("uniform", "global"):
        raise BrainsurgeonError(f"structure='channel' supports allocation 'uniform' or 'global', got {allocation!r}")
    opts = dataclasses.replace(opts, structure=CHANNEL)
    method_cls = get_variant(method, "channel") or _method_class(method)
    if "channel" not in method_cls.structures or not issubclass(method_cls, StructuredMethod):
        raise BrainsurgeonError(
            f"method {method!r} prunes single weights, not whole units; structure='channel' needs a structured "
            f"method: {', '.join(structured_methods())}"
        )
    if not isinstance(compact, bool):
        raise BrainsurgeonError(f"compact must be True (a smaller model) or False (zeroed units), got {compact!r}")
    if round_to is not None and (isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1):
        raise BrainsurgeonError(f"round_to must be a positive integer (channels kept per layer a multiple of it), got {round_to!r}")
    if not (isinstance(recalibrate_bn, bool) or recalibrate_bn == "auto"):
        raise BrainsurgeonError(f"recalibrate_bn must be True, False or 'auto', got {recalibrate_bn!r}")
    if not isinstance(model, nn.Module):
        raise BrainsurgeonError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    algo = method_cls.create(**method_options)
    if isinstance(algo, WholeModelMethod):
        # methods that replace layers rather than remove units (EigenDamage) run their own flow
        if not compact:
            raise BrainsurgeonError(f"method {method!r} replaces layers by smaller ones; it has no compact=False form")
        if round_to is not None:
            raise BrainsurgeonError(f"method {method!r} removes eigen-directions, not channels: leave round_to out")
        return _carry_spec(model, algo.prune_model(
            model, data, opts.sparsity, allocation=allocation, max_layer_sparsity=max_layer_sparsity,
            loss_fn=loss_fn, num_samples=num_samples, damping=damping, layers=layers, seed=seed, device=device,
            batch_size=batch_size, progress=progress, recalibrate_bn=recalibrate_bn,
        ))
    loss_fn = resolve_loss(loss_fn)
    find_targets(model, layers)  # fail fast on bad layer patterns, before copying

    ctx = working_context(model, data, opts, layers, loss_fn, progress)
    work, targets, calib = ctx.model, ctx.targets, ctx.calib
    algo.validate(ctx)
    with ctx.timer("groups"):
        groups = build_groups(work, example_input(calib), {t.name for t in targets}, explicit=layers is not None)
    if not len(groups):
        raise BrainsurgeonError(
            "no layer can lose units: " + "; ".join(f"{k}: {v}" for k, v in groups.fixed.items())
            + ". Structured pruning needs hidden Linear/Conv2d layers"
        )
    sctx = StructuredContext(ctx, groups)
    algo.check(sctx)
    sample_shape, dtype = tuple(calib.batches[0][0].shape[1:]), calib.batches[0][0].dtype
    if not dtype.is_floating_point:
        raise BrainsurgeonError(f"structure='channel' needs floating-point inputs, got {dtype}")
    dense = copy.deepcopy(work)  # timed against the pruned model at the end, interleaved
    units_before = {g.name: g.num_units for g in groups}
    shapes_before = {n: list(m.weight.shape) for n, m in work.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}

    with torch.random.fork_rng(devices=[] if opts.device.type == "cpu" else [opts.device]):
        torch.manual_seed(opts.seed)
        counts, capped = algo.allocate(sctx)
        counts, rounded = round_counts(groups, counts, round_to)
        with ctx.timer("solve"):
            keep = algo.select(sctx, counts)
        _check_keep(groups, keep, counts, method)
        algo.compensate(sctx, keep)
    if compact:
        compact_model(groups, keep)
    else:
        apply_masks(groups, keep)
    for p in work.parameters():
        if not torch.isfinite(p).all():
            raise RuntimeError(f"method {method!r} produced non-finite weights")

    bn_report = choose_batchnorm_statistics(work, calib, loss_fn, recalibrate_bn)
    with ctx.timer("measure"):
        before, after, speedup = compare(dense, work, sample_shape, opts.device, dtype)
    del dense
    report = _report(ctx, algo, groups, keep, units_before, capped, before, after, shapes_before, compact, layers, t_start)
    report["cost"]["speedup"] = speedup
    report["options"].update(round_to=round_to, recalibrate_bn=recalibrate_bn)
    report["batchnorm"] = bn_report
    if rounded:
        report["notes"].append(f"round_to={round_to}: the kept units of {', '.join(rounded)} rounded to a multiple of {round_to}")
    report["notes"].extend(batchnorm_notes(bn_report, calib.num_samples))
    work.train(model.training)
    return _carry_spec(model, PruneResult(model=work, report=report, masks={k: v.detach().cpu() for k, v in keep.items()}))


def _carry_spec(model: nn.Module, result):
    """Give the pruned model the architecture spec of its new shapes, when the input had a spec."""
    base = getattr(model, "brainsurgeon_spec", None)
    if base is not None:
        from ..architecture import spec_of

        result.model.brainsurgeon_spec = spec_of(result.model, base)
    return result


def _check_keep(groups: GroupSet, keep: dict[str, torch.Tensor], counts: dict[str, int], method: str) -> None:
    """The method's masks must remove exactly the allocated units and never empty a group (bugs)."""
    for g in groups:
        k = keep.get(g.name)
        if k is None or k.shape != (g.num_units,) or k.dtype != torch.bool:
            raise RuntimeError(f"method {method!r} returned no unit mask of shape ({g.num_units},) for {g.name}")
        if int((~k).sum()) != counts[g.name] or not k.any():
            raise RuntimeError(f"method {method!r} removed {int((~k).sum())} units of {g.name}, not {counts[g.name]}")


def _report(ctx, algo, groups, keep, units_before, capped, before, after, shapes_before, compact, layers, t_start):
    opts = ctx.options
    group_rep = {}
    for g in groups:
        kept = int(keep[g.name].sum())
        group_rep[g.name] = {
            "layers": {m.name: m.role for m in g.members},
            "units_before": units_before[g.name],
            "units_after": kept,
            "removed": units_before[g.name] - kept,
            "capped": g.name in capped,
        }
    total = sum(units_before.values())
    removed = sum(r["removed"] for r in group_rep.values())
    layer_rep = {}
    for name, m in ctx.model.named_modules():
        if name in shapes_before:
            shape = list(m.weight.shape)
            zero_rows = int((m.weight.detach().reshape(shape[0], -1) == 0).all(1).sum())
            layer_rep[name] = {"shape_before": shapes_before[name], "shape_after": shape, "zero_units": zero_rows}
    timings = {f"{k}_s": v for k, v in ctx.timer.seconds.items()}
    timings["total_s"] = time.perf_counter() - t_start
    notes = []
    if capped:
        notes.append(
            f"cap bound in {', '.join(capped)}: at least one unit (and at most max_layer_sparsity of the units) "
            "stays in every layer"
        )
    return {
        "method": algo.name,
        "method_options": algo.options(),
        "options": {
            "sparsity": opts.sparsity, "structure": "channel", "allocation": opts.allocation,
            "max_layer_sparsity": opts.max_layer_sparsity, "num_samples": ctx.calib.num_samples,
            "damping": opts.damping, "layers": layers, "seed": opts.seed, "device": str(opts.device),
            "compact": compact,
        },
        "overall": {
            "target_sparsity": opts.sparsity, "achieved_sparsity": removed / total if total else 0.0,
            "units": total, "removed_units": removed,
        },
        "groups": group_rep,
        "capped": list(capped),
        "fixed": dict(groups.fixed),
        "layers": layer_rep,
        "cost": {"before": before, "after": after},
        "notes": notes,
        "timings": timings,
        "numerics": {"damping": ctx.numerics.damping, "fallbacks": ctx.numerics.fallbacks},
        **ctx.extra_report,
    }
