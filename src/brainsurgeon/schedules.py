"""Pruning schedules (docs/methods.md, "Schedules"): one-shot, iterative and gradual, with fine-tuning between rounds.

* ``oneshot``: one round to the target ``s_f`` (then fine-tune once, if asked).
* ``iterative``: ``steps`` rounds of "prune to s_k, fine-tune". Targets are *geometric* by default:
  each round keeps the same fraction of the surviving weights, ``s_k = 1 - (1 - s_f)^(k/steps)``
  (Han et al. 2015 prune a fixed fraction of what is left); ``iterative-linear`` uses ``s_k = s_f k/steps``.
* ``gradual`` (Zhu & Gupta 2017, "To prune, or not to prune"): ``s_t = s_f + (s_i - s_f)(1 - t/T)^3``
  for ``t = 1..T`` (``T = steps``, ``s_i`` = 0): fast early, slow near the target, where the
  network has fewer redundant weights; the fine-tuning budget is spread evenly over the rounds.

Every round calls the method on the *current* model, so curvature statistics are recomputed each
round, and weights pruned in earlier rounds stay pruned and count towards the round's target
(saliency methods see ``-inf`` scores there; compensating methods are re-masked and any revival is
reported as a fallback).
"""
from __future__ import annotations

import copy
import math
import numbers
import time
from typing import Callable

import torch
from torch import nn

from .allocation import lowest_k_mask, num_pruned
from .errors import BrainsurgeonError
from .finetune import FineTune, train_masked

SCHEDULES = ("oneshot", "iterative", "iterative-linear", "gradual")
DEFAULT_STEPS = 5


def schedule_targets(schedule: str, sparsity: float, steps: int, initial: float = 0.0) -> list[float]:
    """The sparsity after each round; the last one is ``sparsity`` exactly."""
    if schedule == "oneshot":
        return [sparsity]
    ks = range(1, steps + 1)
    if schedule == "iterative":
        targets = [1.0 - (1.0 - sparsity) ** (k / steps) for k in ks]
    elif schedule == "iterative-linear":
        targets = [sparsity * k / steps for k in ks]
    elif schedule == "gradual":
        targets = [sparsity + (initial - sparsity) * (1.0 - k / steps) ** 3 for k in ks]
    else:
        raise BrainsurgeonError(f"unknown schedule {schedule!r}; use one of {SCHEDULES}")
    targets[-1] = sparsity  # no rounding drift in the final target
    return targets


def split_budget(total: int, rounds: int) -> list[int]:
    """Optimizer steps per round, summing to ``total`` exactly."""
    return [round(total * (k + 1) / rounds) - round(total * k / rounds) for k in range(rounds)]


def check_schedule(schedule, steps, finetune) -> int:
    """The number of rounds; bad schedules, step counts and zero budgets fail here, before any work."""
    if schedule not in SCHEDULES:
        raise BrainsurgeonError(f"unknown schedule {schedule!r}; use one of {', '.join(SCHEDULES)}")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1):
        raise BrainsurgeonError(f"steps must be a positive integer (the number of pruning rounds), got {steps!r}")
    if schedule == "oneshot":
        if steps not in (None, 1):
            raise BrainsurgeonError(f"schedule='oneshot' prunes in one round; got steps={steps}. Use schedule='gradual' or 'iterative'")
        rounds = 1
    else:
        rounds = DEFAULT_STEPS if steps is None else int(steps)
    if finetune is not None:
        if not isinstance(finetune, FineTune):
            raise BrainsurgeonError(f"finetune must be a bs.FineTune(train_data, epochs=..., lr=...), got {type(finetune).__name__}")
        if schedule != "oneshot" and finetune.total_steps < rounds:
            raise BrainsurgeonError(
                f"schedule={schedule!r} fine-tunes between {rounds} rounds but the FineTune budget is "
                f"{finetune.total_steps} optimizer steps ({finetune.epochs} epochs of {finetune.steps_per_epoch} steps); "
                f"give at least {rounds} steps (raise epochs), or use schedule='oneshot'"
            )
    return rounds


# ----------------------------------------------------------------------------- one constrained round


def run_constrained(algo, ctx, prior_masks, layer_sparsity) -> dict[str, torch.Tensor]:
    """Run ``algo`` keeping earlier rounds' pruned weights pruned, with optional per-layer targets."""
    from .pruners.base import SaliencyMethod

    prior = {}
    for t in ctx.targets:
        keep = (prior_masks or {}).get(t.name)
        if keep is not None and tuple(keep.shape) == tuple(t.weight.shape):  # compact models change shapes
            prior[t.name] = keep.to(device=t.weight.device, dtype=torch.bool)
    if isinstance(algo, SaliencyMethod):
        with ctx.timer("statistics"):
            scores = algo.scores(ctx)
        with ctx.timer("solve"):
            for name, keep in prior.items():
                # -inf: earlier-pruned weights come first in every ordering, so they stay pruned
                scores[name] = scores[name].double().masked_fill(~keep, -math.inf)
            if layer_sparsity is not None:
                ctx.extra_report["target_sparsity"] = dict(layer_sparsity)
                return {
                    t.name: lowest_k_mask(scores[t.name], num_pruned(t.weight.numel(), layer_sparsity[t.name]))
                    for t in ctx.targets
                }
            from .allocation import allocate_masks

            o = ctx.options
            return allocate_masks(scores, o.sparsity, o.allocation, o.max_layer_sparsity, o.structure)
    if layer_sparsity is not None:
        raise RuntimeError("per-layer targets for a compensating method must be run one layer at a time")
    masks = algo.run(ctx)
    for name, keep in prior.items():
        revived = int((masks[name] & ~keep).sum())
        if revived:
            ctx.numerics.fallback(
                name, f"the method kept {revived} weights pruned in an earlier round; they stay pruned "
                f"(this layer ends {revived} weights above its round target)"
            )
        masks[name] = masks[name] & keep
    return masks


def _merge_reports(reports: list[dict], sparsity: float) -> dict:
    """One report from per-layer passes: the layers of each, totals recomputed, timings summed."""
    merged = copy.deepcopy(reports[0])
    merged["layers"] = {}
    merged["numerics"] = {"damping": {}, "fallbacks": []}
    timings: dict[str, float] = {}
    for rep in reports:
        merged["layers"].update(rep["layers"])
        merged["numerics"]["damping"].update(rep["numerics"]["damping"])
        merged["numerics"]["fallbacks"] += rep["numerics"]["fallbacks"]
        for k, v in rep["timings"].items():
            timings[k] = timings.get(k, 0.0) + v
    total = sum(r["numel"] for r in merged["layers"].values())
    zeros = sum(int(r["achieved_sparsity"] * r["numel"] + 0.5) for r in merged["layers"].values())
    merged["overall"] = {"target_sparsity": sparsity, "achieved_sparsity": zeros / total, "numel": total, "zeros": zeros}
    merged["timings"] = timings
    return merged


def prune_round(model, data, method, sparsity, *, prior_masks, layer_sparsity, kwargs, method_options):
    """One round: ``prune_step`` on the current model (per layer for compensating methods with per-layer targets)."""
    from .engine import PruneResult, _method_class, prune_step
    from .pruners.base import SaliencyMethod

    if layer_sparsity is None or issubclass(_method_class(method), SaliencyMethod):
        return prune_step(
            model, data, method, sparsity, prior_masks=prior_masks, layer_sparsity=layer_sparsity,
            **kwargs, **method_options,
        )
    current, masks, reports = model, {}, []
    for name, s in layer_sparsity.items():
        step_kwargs = dict(kwargs, layers=[name], allocation="uniform")
        res = prune_step(current, data, method, s, prior_masks=prior_masks, **step_kwargs, **method_options)
        current = res.model
        masks.update(res.masks)
        reports.append(res.report)
    report = _merge_reports(reports, sparsity)
    report["options"]["layers"] = kwargs.get("layers")
    return PruneResult(model=current, report=report, masks=masks)


def round_layer_sparsity(final: dict[str, float], numel: dict[str, int], target: float, final_target: float) -> dict[str, float]:
    """Per-layer targets of one round: the final allocation scaled to the round's overall target,
    as exact counts summing to ``round(target * total)`` (largest remainders)."""
    total = sum(numel.values())
    want = num_pruned(total, target)
    scale = target / final_target if final_target > 0 else 0.0
    raw = {n: final[n] * scale * numel[n] for n in final}
    counts = {n: int(math.floor(v)) for n, v in raw.items()}
    by_remainder = sorted(final, key=lambda n: raw[n] - counts[n], reverse=True)
    i = 0
    while sum(counts.values()) < want and i < 10 * len(final):
        n = by_remainder[i % len(final)]
        if counts[n] < numel[n] - 1:
            counts[n] += 1
        i += 1
    return {n: counts[n] / numel[n] for n in final}


# ----------------------------------------------------------------------------- the driver


def run_schedule(
    model: nn.Module,
    data,
    method: str,
    sparsity,
    *,
    schedule: str = "oneshot",
    steps: int | None = None,
    finetune: FineTune | None = None,
    structure: str = "unstructured",
    allocation: str = "uniform",
    max_layer_sparsity: float = 0.99,
    loss_fn=None,
    num_samples: int = 1024,
    damping=None,
    layers=None,
    seed: int = 0,
    device="cpu",
    batch_size: int = 128,
    progress=None,
    checkpoint=None,
    resume: bool = False,
    round_hook: Callable[[int, nn.Module], None] | None = None,
    sensitivity_ratios=None,
    **method_options,
):
    """``bs.prune`` with a schedule, fine-tuning, sensitivity allocation and checkpoints (see module doc).

    ``checkpoint`` (a :class:`~brainsurgeon.checkpoint.Checkpoint`) saves the state after every
    round; ``resume=True`` continues from its last completed round. ``round_hook(k, model)`` is called
    at the start of round ``k`` with the model so far (tests use it to simulate a kill).
    """
    from .engine import _method_class, build_options, prune_step
    from .targets import find_targets

    t_start = time.perf_counter()
    rounds = check_schedule(schedule, steps, finetune)
    opts = build_options(method, sparsity, structure, allocation, max_layer_sparsity, num_samples, damping, seed, device, batch_size)
    _method_class(method).create(**method_options)  # unknown options fail before any work
    if opts.structure.is_nm and (schedule != "oneshot" or allocation == "sensitivity"):
        raise BrainsurgeonError(
            f"an N:M pattern ({opts.structure}) fixes every layer's sparsity: use schedule='oneshot' and "
            "allocation='uniform' (fine-tuning is fine)"
        )
    if allocation == "sensitivity" and max_layer_sparsity < opts.sparsity:
        raise BrainsurgeonError(f"max_layer_sparsity={max_layer_sparsity} is below the target {opts.sparsity}; raise the cap")
    kwargs = dict(
        structure=structure, allocation="uniform" if allocation == "sensitivity" else allocation,
        max_layer_sparsity=max_layer_sparsity, loss_fn=loss_fn, num_samples=num_samples, damping=damping,
        layers=layers, seed=seed, device=device, batch_size=batch_size, progress=progress,
    )
    simple = schedule == "oneshot" and finetune is None and allocation != "sensitivity" and checkpoint is None
    if simple:
        return prune_step(model, data, method, opts.sparsity, **kwargs, **method_options)
    if not isinstance(model, nn.Module):
        raise BrainsurgeonError(f"model must be a torch.nn.Module, got {type(model).__name__}")

    targets_s = schedule_targets(schedule, opts.sparsity, rounds)
    budget = split_budget(finetune.total_steps, rounds) if finetune is not None else [0] * rounds

    current, masks, history, start = model, None, [], 0
    if resume:
        if checkpoint is None:
            raise BrainsurgeonError("resume=True needs a checkpoint directory")
        current, masks, history, start = checkpoint.load(model, rounds)

    sens_report, final_alloc = None, None
    if allocation == "sensitivity":
        from .sensitivity import default_ratios, sensitivity

        t_sens = time.perf_counter()
        ratios = sensitivity_ratios or default_ratios(opts.sparsity, max_layer_sparsity)
        sens = sensitivity(
            model, data, method, ratios, layers=layers, loss_fn=loss_fn, num_samples=num_samples,
            damping=damping, seed=seed, device=device, batch_size=batch_size, progress=progress, **method_options,
        )
        final_alloc = sens.allocate(opts.sparsity, max_layer_sparsity)
        sens_report = {**sens.to_dict(), "allocation": final_alloc, "seconds": time.perf_counter() - t_sens}
    numel = {t.name: t.weight.numel() for t in find_targets(model, layers)}

    from .progress import progress_enabled, stage

    if resume:
        stage(f"resuming after round {start}/{rounds} (from the checkpoint)", progress_enabled(progress))
    res = None
    for k in range(start, rounds):
        if round_hook is not None:
            round_hook(k + 1, current)
        stage(f"round {k + 1}/{rounds}: {method} to sparsity {targets_s[k]:.4f}"
              + (f", then {budget[k]} fine-tuning steps" if budget[k] else ""), progress_enabled(progress))
        t0 = time.perf_counter()
        layer_s = None
        if final_alloc is not None:
            layer_s = round_layer_sparsity(final_alloc, numel, targets_s[k], opts.sparsity)
        res = prune_round(
            current, data, method, targets_s[k], prior_masks=masks, layer_sparsity=layer_s,
            kwargs=dict(kwargs, seed=seed + k), method_options=method_options,
        )
        current, masks = res.model, res.masks
        entry = {
            "round": k + 1, "target_sparsity": targets_s[k],
            "achieved_sparsity": res.report["overall"]["achieved_sparsity"],
            "prune_seconds": time.perf_counter() - t0, "fallbacks": res.report["numerics"]["fallbacks"],
        }
        if budget[k] > 0:
            t1 = time.perf_counter()
            entry["finetune"] = train_masked(current, masks, finetune, budget[k], finetune.seed + k, f"fine-tuning round {k + 1}/{rounds}")
            entry["finetune_seconds"] = time.perf_counter() - t1
        history.append(entry)
        if checkpoint is not None:
            checkpoint.save(k + 1, rounds, current, masks, history)

    if res is None:  # resumed after the last round: rebuild the final report from the checkpoint
        from .engine import PruneResult

        report = checkpoint.final_report()
        return PruneResult(model=current, report=report, masks=masks)
    report = dict(res.report)
    report["options"] = dict(report["options"], sparsity=opts.sparsity, allocation=allocation)
    report["overall"] = dict(report["overall"], target_sparsity=opts.sparsity)
    report["schedule"] = {
        "name": schedule, "rounds": rounds,
        "targets": targets_s,
        "spacing": {"iterative": "geometric", "iterative-linear": "linear", "gradual": "cubic (Zhu & Gupta 2017)"}.get(schedule, "one round"),
        "resumed_from_round": start if resume else None,
    }
    report["rounds"] = history
    if finetune is not None:
        report["finetune"] = {**finetune.options(), "steps_per_round": budget}
    if sens_report is not None:
        report["sensitivity"] = sens_report
    timings = dict(report["timings"])
    timings["prune_s"] = sum(h["prune_seconds"] for h in history)
    timings["finetune_s"] = sum(h.get("finetune_seconds", 0.0) for h in history)
    if sens_report is not None:
        timings["sensitivity_s"] = sens_report["seconds"]
    timings["total_s"] = time.perf_counter() - t_start
    report["timings"] = timings
    if checkpoint is not None:
        checkpoint.save_report(report)
    return type(res)(model=current, report=report, masks=masks)
