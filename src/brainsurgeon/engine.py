"""One pruning pass (``prune_step``): validate everything up front, prune a copy, zero the pruned weights,
report. The public entry point ``bs.prune`` is :func:`brainsurgeon.api.prune`, which calls down into here."""
from __future__ import annotations

import copy
import math
import numbers
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from .allocation import Structure
from .context import PruneContext, PruneOptions
from .data import Calibration
from . import validation
from .distributed import check_setup
from .errors import BrainsurgeonError
from .memory import LIBC
from .progress import progress_enabled
from .registry import get_method
from .targets import LayerSpec, find_targets

ALLOCATIONS = ("uniform", "global", "sensitivity", "owl")


@dataclass
class PruneResult:
    """The pruned copy, its keep-masks (``True`` = kept) and the report."""

    model: nn.Module
    report: dict
    masks: dict[str, torch.Tensor] = field(default_factory=dict)


def _check_fraction(value, name: str, low_closed=True, high_open=True) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise BrainsurgeonError(f"{name} must be a number in [0, 1), got {value!r}")
    if not (0.0 <= value < 1.0):
        raise BrainsurgeonError(f"{name} must be in [0, 1) (the fraction of weights removed), got {value}")
    return float(value)


def build_options(
    method: str,
    sparsity,
    structure: str,
    allocation: str,
    max_layer_sparsity,
    num_samples,
    damping,
    seed,
    device,
    batch_size,
) -> PruneOptions:
    struct = Structure.parse(structure)
    if struct.is_nm:
        if sparsity is not None and abs(_check_fraction(sparsity, "sparsity") - struct.sparsity) > 1e-9:
            raise BrainsurgeonError(
                f"structure {struct} fixes the sparsity at {struct.sparsity:g}; got sparsity={sparsity}. "
                "Leave sparsity out (or set it to 1 - N/M)"
            )
        sparsity = struct.sparsity
    elif sparsity is None:
        raise BrainsurgeonError("give the target sparsity, a number in [0, 1), e.g. sparsity=0.9")
    sparsity = _check_fraction(sparsity, "sparsity")
    if allocation not in ALLOCATIONS:
        raise BrainsurgeonError(f"allocation must be one of {ALLOCATIONS}, got {allocation!r}")
    if isinstance(max_layer_sparsity, bool) or not isinstance(max_layer_sparsity, numbers.Real) or not (0 < max_layer_sparsity < 1):
        raise BrainsurgeonError(
            f"max_layer_sparsity must be in (0, 1): no layer may be emptied; got {max_layer_sparsity!r}"
        )
    if allocation == "global" and not struct.is_nm and max_layer_sparsity < sparsity:
        raise BrainsurgeonError(
            f"max_layer_sparsity={max_layer_sparsity} is below the global sparsity {sparsity}: "
            "no allocation can reach it; raise the cap"
        )
    if num_samples is not None and (isinstance(num_samples, bool) or not isinstance(num_samples, numbers.Integral) or num_samples < 1):
        raise BrainsurgeonError(f"num_samples must be a positive integer or None (all the data), got {num_samples!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise BrainsurgeonError(f"batch_size must be a positive integer, got {batch_size!r}")
    if damping is not None and (
        isinstance(damping, bool) or not isinstance(damping, numbers.Real) or not (damping > 0 and math.isfinite(damping))
    ):
        raise BrainsurgeonError(f"damping must be a positive number (relative to the curvature's mean diagonal), got {damping!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise BrainsurgeonError(f"seed must be an integer, got {seed!r}")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise BrainsurgeonError(f"device {device!r} is not a torch device: {e}") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BrainsurgeonError("device='cuda' was asked for but CUDA is not available; use device='cpu'")
    return PruneOptions(
        method=method, sparsity=sparsity, structure=struct, allocation=allocation,
        max_layer_sparsity=float(max_layer_sparsity), num_samples=None if num_samples is None else int(num_samples),
        damping=None if damping is None else float(damping), seed=int(seed), device=dev,
        batch_size=int(batch_size),
    )


def _check_nm_fits(targets, structure: Structure) -> None:
    """Every target row must split into groups of M inputs, or no N:M pattern exists."""
    bad = [f"{t.name} ({t.weight_matrix().shape[1]} inputs)" for t in targets if t.weight_matrix().shape[1] % structure.m]
    if bad:
        raise BrainsurgeonError(
            f"{structure} needs each layer's inputs per row to be a multiple of {structure.m}; not so for "
            f"{', '.join(bad)}. Exclude them with layers={{'exclude': [...]}} (CLI: --exclude NAME)"
        )


def _check_data_fits(model: nn.Module, calib: Calibration, loss_fn) -> None:
    # two samples say whether the data fit (a language model's logits over a whole batch cost
    # gigabytes: 8 x 512 x 49152 floats for SmolLM2); every batch is validated separately
    shape = tuple(calib.batches[0][0].shape)
    x, y = (v[:2] if isinstance(v, torch.Tensor) and v.dim() > 0 else v for v in calib.batches[0])
    probe = getattr(model, "probe", None)  # a model view that knows a cheaper probe (HF: 32 positions)
    if callable(probe):
        x, y = probe(x, y)
    try:
        with torch.no_grad():
            out = model(x)
    except Exception as e:  # the model's own error says which shape it wanted
        raise BrainsurgeonError(
            f"the data does not fit the model: inputs of shape {shape} raised {type(e).__name__}: {e}"
        ) from e
    try:
        with torch.no_grad():
            loss = loss_fn(out, y)
    except Exception as e:
        raise BrainsurgeonError(
            f"the loss cannot be computed on the model's outputs {tuple(out.shape)} and targets "
            f"{tuple(y.shape)} ({type(e).__name__}: {e}); check the targets or pass loss_fn"
        ) from e
    if loss.numel() != 1:
        raise BrainsurgeonError(f"loss_fn must return a scalar (mean over the batch), got shape {tuple(loss.shape)}")
    if not torch.isfinite(loss):
        raise BrainsurgeonError(
            f"the loss on the first batch is {loss.item()}: the model or data contains NaN/inf; fix it before pruning"
        )


def resolve_loss(loss_fn):
    """The user's loss, or cross-entropy; refused unless callable as loss_fn(outputs, targets)."""
    loss_fn = loss_fn or nn.CrossEntropyLoss()
    if not callable(loss_fn):
        raise BrainsurgeonError("loss_fn must be callable as loss_fn(outputs, targets)")
    return loss_fn


def untouched_embeddings(model: nn.Module, targets) -> list[nn.Parameter]:
    """The parameters of ``model``'s embedding tables (and whatever is tied to them, e.g. a tied
    ``lm_head``) that are not pruning targets: a method that writes only its targets' weights and
    runs no backward pass never changes them, so its working copy may read the user's tensors
    until the end of the run (:func:`unshare`). On SmolLM2-135M that is 113 MB of the 513 MB copy,
    not held while the calibration activations are."""
    owned = {id(t.weight) for t in targets}
    out, seen = [], set()
    for m in model.modules():
        if isinstance(m, nn.Embedding) and id(m.weight) not in owned and id(m.weight) not in seen:
            seen.add(id(m.weight))
            out.append(m.weight)
    return out


def unshare(work: nn.Module, shared: list[nn.Parameter]) -> None:
    """Give ``work`` its own copies of the ``shared`` parameters (ties kept: one copy per tensor)."""
    if not shared:
        return
    copies = {id(p): nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad) for p in shared}
    for m in work.modules():
        for name, p in list(m._parameters.items()):
            if p is not None and id(p) in copies:
                m._parameters[name] = copies[id(p)]


def working_context(model: nn.Module, data, opts: PruneOptions, layers, loss_fn, progress,
                    share: list[nn.Parameter] = ()) -> PruneContext:
    """A working copy of ``model`` (the user's is never touched) with its targets, the calibration
    batches on the device, checked to fit the model and give a finite loss, and a seeded generator.
    ``share``: parameters the copy reads from ``model`` until :func:`unshare` (never written)."""
    # per-layer scores, masks and their float64 temporaries are megabytes each: mapped, they go back
    # to the system when freed (magnitude on SmolLM2-135M: the call's RSS increase 1526 -> 650 MB)
    LIBC.map_large_buffers()
    # (on another device .to() copies the shared tensors anyway)
    work = copy.deepcopy(model, {id(p): p for p in share}).to(opts.device).eval()
    targets = find_targets(work, layers)
    calib = Calibration.from_data(data, opts.num_samples, opts.batch_size).to(opts.device)
    _check_data_fits(work, calib, loss_fn)
    classes = validation.num_outputs(work, calib) if validation.uses_class_indices(loss_fn) else None
    validation.check_calibration(calib, loss_fn, classes)  # every batch, not the first
    loss_fn = validation.calibrated_loss(loss_fn, calib)  # class weights: per-sample terms normalised as torch does
    gen_device = opts.device if opts.device.type == "cuda" else torch.device("cpu")
    return PruneContext(
        model=work, targets=targets, calib=calib, loss_fn=loss_fn, options=opts,
        generator=torch.Generator(gen_device).manual_seed(opts.seed),
        show_progress=progress_enabled(progress),
        extra_report=validation.run_notes(work, targets, calib, opts, layers),  # used/given data, not pruned, tied, capped
    )


def _layer_report(ctx: PruneContext, masks, targets_sparsity) -> dict:
    layers = {}
    for t in ctx.targets:
        w = t.weight.detach()
        zeros = int((w == 0).sum())
        layers[t.name] = {
            "shape": list(w.shape),
            "numel": w.numel(),
            "target_sparsity": targets_sparsity.get(t.name),
            "achieved_sparsity": zeros / w.numel(),
            "pruned": int((~masks[t.name]).sum()),
        }
    return layers


def _prune_work(algo, ctx: PruneContext, method: str, prior_masks, layer_sparsity) -> dict:
    """Step 3 of :func:`prune_step`: the method's masks, applied to the working copy's targets."""
    work, targets, calib, opts = ctx.model, ctx.targets, ctx.calib, ctx.options
    algo.validate(ctx)
    # several ranks: the same options and weights everywhere, before any work (distributed.py)
    settings = {k: str(v) for k, v in vars(opts).items() if k != "device"}  # ranks may use different GPUs
    settings["calibration samples"] = str(calib.num_samples)  # equal shards: the "same num_samples"
    check_setup(work, {**settings, **{f"method.{k}": repr(v) for k, v in algo.options().items()}})

    # Global RNG state is forked so the user's generator is not advanced.
    with torch.random.fork_rng(devices=[] if opts.device.type == "cpu" else [opts.device]):
        torch.manual_seed(opts.seed)
        if prior_masks is None and layer_sparsity is None:
            masks = algo.run(ctx)
        else:
            from .schedules import run_constrained

            masks = run_constrained(algo, ctx, prior_masks, layer_sparsity)
    missing = {t.name for t in targets} - set(masks)
    if missing:
        raise RuntimeError(f"method {method!r} returned no mask for {sorted(missing)}")  # a bug, not bad input
    with torch.no_grad():
        for t in targets:
            t.weight.mul_(masks[t.name].to(t.weight.dtype))
            if not torch.isfinite(t.weight).all():
                raise RuntimeError(f"method {method!r} produced non-finite weights in {t.name}")
    return masks


@LIBC.restored_after()
def prune_step(
    model: nn.Module,
    data,
    method: str = "magnitude",
    sparsity: float | None = None,
    *,
    structure: str = "unstructured",
    allocation: str = "uniform",
    max_layer_sparsity: float = 0.99,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    num_samples: int | None = None,
    damping: float | None = None,
    layers: LayerSpec = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    batch_size: int = 128,
    progress: bool | None = None,
    prior_masks: dict[str, torch.Tensor] | None = None,
    layer_sparsity: dict[str, float] | None = None,
    **method_options,
) -> PruneResult:
    """One pruning pass (what ``prune`` does for ``schedule="oneshot"`` without fine-tuning).

    ``prior_masks``: weights pruned by an earlier round stay pruned and count towards this round's
    target. ``layer_sparsity``: per-layer targets (the sensitivity allocation), for saliency methods.
    """
    t_start = time.perf_counter()
    # 1. Everything that can be wrong with the arguments, before any work.
    opts = build_options(
        method, sparsity, structure, allocation, max_layer_sparsity, num_samples, damping, seed, device, batch_size
    )
    method_cls = _method_class(method)
    if "unstructured" not in method_cls.structures:
        raise BrainsurgeonError(f"method {method!r} removes whole units: use structure='channel'")
    if opts.allocation == "owl" and "owl" not in getattr(method_cls, "allocations", ()):
        owl = sorted(n for n, c in _all_methods().items() if "owl" in getattr(c, "allocations", ()))
        raise BrainsurgeonError(f"allocation='owl' needs a layer-wise method ({', '.join(owl)}); {method!r} is not one")
    if opts.structure.is_nm and not method_cls.supports_nm:
        nm_methods = sorted(n for n, c in _all_methods().items() if c.supports_nm)
        raise BrainsurgeonError(
            f"method {method!r} cannot produce N:M patterns ({opts.structure}); methods that can: {', '.join(nm_methods)}"
        )
    if not isinstance(model, nn.Module):
        raise BrainsurgeonError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    algo = method_cls.create(**method_options)
    loss_fn = resolve_loss(loss_fn)
    user_targets = find_targets(model, layers)  # fail fast on the user's model, before copying it
    if opts.structure.is_nm:
        _check_nm_fits(user_targets, opts.structure)

    # 2. A working copy; the user's model is never touched.
    shared = untouched_embeddings(model, user_targets) if method_cls.writes_only_targets else []
    ctx = working_context(model, data, opts, layers, loss_fn, progress, share=shared)
    work, targets, calib = ctx.model, ctx.targets, ctx.calib
    try:  # 3. Prune (the copy may read the user's untouched embeddings until then)
        masks = _prune_work(algo, ctx, method, prior_masks, layer_sparsity)
    finally:
        unshare(work, shared)
    # 4. Report.
    targets_sparsity = ctx.extra_report.pop("target_sparsity", None) or {
        t.name: (opts.sparsity if opts.allocation == "uniform" or opts.structure.is_nm else None) for t in targets
    }
    layer_rep = _layer_report(ctx, masks, targets_sparsity)
    if opts.allocation == "global" and not opts.structure.is_nm:
        for name, rep in layer_rep.items():
            rep["target_sparsity"] = rep["achieved_sparsity"] if rep["target_sparsity"] is None else rep["target_sparsity"]
    total = sum(r["numel"] for r in layer_rep.values())
    zeros = sum(int(r["achieved_sparsity"] * r["numel"] + 0.5) for r in layer_rep.values())
    timings = {f"{k}_s": v for k, v in ctx.timer.seconds.items()}
    timings["total_s"] = time.perf_counter() - t_start
    report = {
        "method": method,
        "method_options": algo.options(),
        "options": {
            "sparsity": opts.sparsity, "structure": str(opts.structure), "allocation": opts.allocation,
            "max_layer_sparsity": opts.max_layer_sparsity, "num_samples": calib.num_samples,
            "damping": opts.damping, "layers": layers, "seed": opts.seed, "device": str(opts.device),
        },
        "overall": {"target_sparsity": opts.sparsity, "achieved_sparsity": zeros / total, "numel": total, "zeros": zeros},
        "layers": layer_rep,
        "timings": timings,
        "numerics": {"damping": ctx.numerics.damping, "fallbacks": ctx.numerics.fallbacks},
        **ctx.extra_report,
    }
    if not model.training:
        work.eval()
    else:
        work.train()
    return PruneResult(model=work, report=report, masks={k: v.detach().cpu() for k, v in masks.items()})


def _method_class(method):
    """The registered class of ``method`` (a BrainsurgeonError lists the registered ones)."""
    return get_method(method)


def _all_methods():
    from .registry import _REGISTRY, _load_builtin

    _load_builtin()
    return dict(_REGISTRY)


def __getattr__(name: str):
    """``engine.prune`` moved to :func:`brainsurgeon.api.prune` (the entry point dispatches down into
    schedules, structured and the HF path; engine does not import them). This lazy alias keeps
    callers that still import it from engine working until they import ``brainsurgeon.api``."""
    if name == "prune":
        from .api import prune

        return prune
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
