"""``bs.prune`` and ``bs.prune_sweep``: the public entry points. They dispatch, and do nothing else:

* a Hugging Face ``PreTrainedModel`` goes to :func:`prune_hf` (token data, the model's own loss,
  GPT-2's ``Conv1D`` seen as ``nn.Linear``; ``structure="channel"`` removes heads and FFN neurons
  through :mod:`brainsurgeon.structured.transformer_engine`);
* ``structure="channel"`` on any other module goes to :mod:`brainsurgeon.structured.engine`;
* everything else goes to :mod:`brainsurgeon.schedules` (one-shot is one ``engine.prune_step``).

Layering: ``api`` -> ``schedules`` / ``structured`` -> ``engine`` (``prune_step``, ``build_options``,
``working_context``) -> methods and curvature. ``engine`` never imports upwards.
"""
from __future__ import annotations

import copy
import os
from typing import Callable, Iterator

import torch
from torch import nn

from .engine import PruneResult
from .errors import BrainsurgeonError
from .targets import LayerSpec

#: calibration batch size when none is given: images batch well; token sequences are long, and a
#: causal LM's logits are (batch, length, vocabulary)
DEFAULT_BATCH = 128
DEFAULT_TOKEN_BATCH = 8


def prune(
    model: nn.Module,
    data,
    method: str = "magnitude",
    sparsity: float | None = None,
    *,
    structure: str = "unstructured",
    allocation: str | None = None,
    max_layer_sparsity: float = 0.99,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    num_samples: int | None = None,
    damping: float | None = None,
    layers: LayerSpec = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    batch_size: int | None = None,
    progress: bool | None = None,
    schedule: str = "oneshot",
    steps: int | None = None,
    finetune=None,
    compact: bool | None = None,
    round_to: int | None = None,
    recalibrate_bn: bool | str | None = None,
    offload: str | None = None,
    out=None,
    offload_activations: bool = False,
    resume: bool = False,
    force: bool = False,
    **method_options,
) -> PruneResult:
    """Prune a copy of ``model`` with ``method`` to ``sparsity``; ``model`` itself is left untouched.

    Args:
        model: a trained ``nn.Module``, or a Hugging Face ``PreTrainedModel`` (Llama-like, GPT-2,
            OPT, BERT layouts; see :mod:`brainsurgeon.adapters.hf`), or the path of a model: an HF
            directory (``save_pretrained``, safetensors shards) or a brainsurgeon ``.safetensors``
            file, loaded as data (no code from the files).
        offload: ``"disk"`` with an HF directory: prune it block by block without ever holding more
            than one block and the cached activations in memory, writing the result to the
            directory ``out`` (``offload_activations`` puts the activations in memory-mapped files,
            ``resume`` continues an interrupted run, ``force`` replaces an existing ``out``); the
            result's ``model`` is then None. See :mod:`brainsurgeon.offload`.
        data: an iterable of ``(inputs, targets)`` batches (a DataLoader works) or one
            ``(inputs, targets)`` tuple of tensors; for an HF model: a LongTensor ``(N, L)`` of
            token ids, a tokenizer's ``BatchEncoding``, or an iterable of dicts with ``input_ids``
            (optional ``attention_mask``, ``labels``). The first ``num_samples`` samples are used
            (default None: all of them; a truncation is warned about and reported under
            ``calibration_samples``).
        method: a registered method (``bs.methods()`` lists them).
        sparsity: the fraction of prunable weights to remove, in [0, 1).
        structure: ``"unstructured"``, an N:M pattern such as ``"2:4"``, or ``"channel"``: remove
            whole units (neurons, filters; for HF models attention heads and FFN neurons).
        allocation: ``"uniform"``, ``"global"`` (one threshold over comparable saliencies, no layer
            above ``max_layer_sparsity``), ``"sensitivity"`` (measured per-layer sensitivity), or
            ``"owl"`` (layer-wise methods: outlier-weighed per-block sparsity, Yin et al. 2024).
            Default: ``"global"`` for heads/FFN neurons of an HF model (``structure="channel"``),
            ``"uniform"`` otherwise.
        loss_fn: ``loss(outputs, targets)``, a mean over the batch; cross-entropy by default (HF:
            the model's own loss, see ``TokenView.loss_fn``).
        damping: relative damping of curvature inverses (each method documents its default).
        layers: name patterns: ``["fc*"]`` or ``{"include": [...], "exclude": [...]}``; by default
            every Linear and Conv weight (HF: every linear inside the transformer blocks; the
            embeddings and ``lm_head`` only when named).
        seed: seeds every random choice; same inputs and seed give the same result.
        device: where the work runs; an HF model must already be there (it is not moved).
        batch_size: calibration batch size (default 128; 8 token sequences for HF models).
        progress: show progress bars (default: when stderr is a terminal).
        schedule, steps, finetune: ``"oneshot"``, ``"iterative"``, ``"iterative-linear"`` or
            ``"gradual"`` over ``steps`` rounds, fine-tuning with a :class:`~brainsurgeon.finetune.FineTune`
            (see :mod:`brainsurgeon.schedules`).
        compact, round_to, recalibrate_bn: ``structure="channel"`` only (see
            :mod:`brainsurgeon.structured`).
        **method_options: options of the method itself (see its docstring).

    Returns:
        :class:`~brainsurgeon.engine.PruneResult` with ``model`` (same architecture, pruned
        weights exactly zero), ``masks`` (True = kept, in each module's own weight orientation)
        and ``report``.
    """
    if allocation is None:  # heads and FFN neurons are allocated across layers by default (issue 11)
        from .adapters.hf import is_hf_model as _is_hf

        allocation = "global" if structure == "channel" and _is_hf(model) else "uniform"
    if offload is not None or isinstance(model, (str, os.PathLike)):
        return _prune_path(
            model, data, method, sparsity, offload=offload, out=out, offload_activations=offload_activations,
            resume=resume, force=force, structure=structure, allocation=allocation, layers=layers,
            num_samples=num_samples, damping=damping, seed=seed, batch_size=batch_size, progress=progress,
            max_layer_sparsity=max_layer_sparsity, loss_fn=loss_fn, device=device, schedule=schedule, steps=steps,
            finetune=finetune, compact=compact, round_to=round_to, recalibrate_bn=recalibrate_bn, **method_options,
        )
    if out is not None or offload_activations or resume or force:
        raise BrainsurgeonError("out=, offload_activations=, resume= and force= go with offload='disk'")
    common = dict(
        allocation=allocation, max_layer_sparsity=max_layer_sparsity, loss_fn=loss_fn, num_samples=num_samples,
        damping=damping, layers=layers, seed=seed, device=device, progress=progress,
    )
    from .adapters.hf import is_hf_model

    hf = is_hf_model(model)
    batch_size = (DEFAULT_TOKEN_BATCH if hf else DEFAULT_BATCH) if batch_size is None else batch_size
    if structure == "channel":
        return _prune_channels(model, data, method, sparsity, hf, batch_size=batch_size, method_options=method_options,
                               **_channel_options(schedule, steps, finetune, compact, round_to, recalibrate_bn), **common)
    for name, value in (("compact", compact), ("round_to", round_to), ("recalibrate_bn", recalibrate_bn)):
        if value is not None:
            raise BrainsurgeonError(f"{name}= applies to structure='channel' only (whole units removed)")
    run = prune_hf if hf else _run_schedule
    return run(model, data, method, sparsity, structure=structure, batch_size=batch_size, schedule=schedule,
               steps=steps, finetune=finetune, **common, **method_options)


def _channel_options(schedule, steps, finetune, compact, round_to, recalibrate_bn) -> dict:
    if schedule != "oneshot" or finetune is not None or steps is not None:
        raise BrainsurgeonError("structure='channel' prunes one-shot: leave schedule, steps and finetune out")
    return dict(compact=True if compact is None else compact, round_to=round_to,
                recalibrate_bn="auto" if recalibrate_bn is None else recalibrate_bn)


def prune_sweep(model: nn.Module, data, method: str = "magnitude", sparsities=(0.1, 0.2, 0.3, 0.4), **kwargs) -> Iterator[PruneResult]:
    """``bs.prune`` at each of ``sparsities``, the statistics computed once where the method allows it.

    Heads and FFN neurons of an HF transformer (``structure="channel"``): a criterion's statistics
    (Fisher diagonal or mask Fisher, K-FAC factors, input moments, gradients) depend on the dense
    model and the data only, so they are gathered once; each sparsity then gets its own
    allocation, selection, compensation, compaction and measured cost on a fresh copy of the
    dense model, and each result is the one ``bs.prune`` gives at that sparsity. Every other path
    depends on the budget through its statistics (layer-wise methods calibrate each block on the
    pruned outputs of the blocks before it; schedules re-estimate between rounds), so it calls
    ``bs.prune`` once per sparsity. Each report's ``sweep`` says which was done.

    ``kwargs`` are ``bs.prune``'s (no ``sparsity``). The sparsities are checked now, and on the
    shared path every option, the data and each budget's reachability too; the work is done as
    the returned iterator is advanced, one result at a time (``list(...)`` keeps every model).
    """
    values = _checked_sparsities(sparsities)
    if "sparsity" in kwargs:
        raise BrainsurgeonError("prune_sweep takes sparsities=[...], not sparsity=")
    from .adapters.hf import is_hf_model

    if kwargs.get("structure") == "channel" and kwargs.get("offload") is None and is_hf_model(model):
        return _shared_sweep(model, data, method, values, kwargs)
    return _separate_sweep(model, data, method, values, kwargs)


def _checked_sparsities(sparsities) -> list[float]:
    import numbers

    if isinstance(sparsities, (str, bytes)) or not hasattr(sparsities, "__iter__"):
        raise BrainsurgeonError(f"sparsities must be a list of numbers in [0, 1), got {sparsities!r}")
    values = list(sparsities)
    bad = [v for v in values if isinstance(v, bool) or not isinstance(v, numbers.Real) or not 0 <= v < 1]
    if not values or bad:
        raise BrainsurgeonError(f"sparsities must be a non-empty list of numbers in [0, 1); {bad or 'none'} given")
    return [float(v) for v in values]


def _shared_sweep(model, data, method, sparsities, kwargs: dict):
    """``bs.prune``'s arguments (its own defaults, bound to its signature, not restated here) for
    :func:`~brainsurgeon.structured.transformer_engine.sweep_transformer`."""
    import inspect

    from .structured.transformer_engine import sweep_transformer

    bound = inspect.signature(prune).bind(model, data, method, None, **kwargs)
    bound.apply_defaults()
    a = bound.arguments
    if a["out"] is not None or a["offload_activations"] or a["resume"] or a["force"]:
        raise BrainsurgeonError("out=, offload_activations=, resume= and force= go with offload='disk'")
    return sweep_transformer(
        model, data, method, sparsities, allocation=a["allocation"] or "global", method_options=dict(a["method_options"]),
        batch_size=DEFAULT_TOKEN_BATCH if a["batch_size"] is None else a["batch_size"],
        **{k: a[k] for k in ("max_layer_sparsity", "loss_fn", "num_samples", "damping", "layers", "seed", "device", "progress")},
        **_channel_options(a["schedule"], a["steps"], a["finetune"], a["compact"], a["round_to"], a["recalibrate_bn"]),
    )


def _separate_sweep(model, data, method, sparsities, kwargs) -> Iterator[PruneResult]:
    for i, s in enumerate(sparsities):
        res = prune(model, data, method, s, **kwargs)
        res.report["sweep"] = {"sparsities": sparsities, "index": i, "shared": [],
                               "why": "the statistics depend on the budget on this path: one bs.prune per sparsity"}
        yield res


def _prune_path(model, data, method, sparsity, *, offload, out, offload_activations, resume, force, **kwargs) -> PruneResult:
    """A model given by its path: out of core with ``offload="disk"``, else loaded (as data) and pruned."""
    from pathlib import Path

    if offload not in (None, "disk"):
        raise BrainsurgeonError(f"offload must be None or 'disk', got {offload!r}")
    if not isinstance(model, (str, os.PathLike)):
        raise BrainsurgeonError("offload='disk' takes the model as the path of its HF directory, not a loaded model")
    path = Path(model)
    if offload == "disk":
        if out is None:
            raise BrainsurgeonError("offload='disk' writes the pruned model to a directory: give out='DIR'")
        from .offload import prune_offloaded

        keep = ("structure", "allocation", "layers", "num_samples", "damping", "seed", "progress", "batch_size")
        method_options = {k: v for k, v in kwargs.items() if k not in keep and k not in _PATH_DEFAULTS}
        for k, default in _PATH_DEFAULTS.items():
            if kwargs.get(k, default) != default:
                raise BrainsurgeonError(f"{k}= does not apply with offload='disk' (one-shot layer-wise pruning on the CPU)")
        given = {k: kwargs[k] for k in keep}
        given["batch_size"] = given["batch_size"] or DEFAULT_TOKEN_BATCH
        return prune_offloaded(path, data, method, sparsity, out=out, offload_activations=offload_activations,
                               resume=resume, force=force, **given, **method_options)
    if out is not None or offload_activations or resume or force:
        raise BrainsurgeonError("out=, offload_activations=, resume= and force= go with offload='disk'")
    return prune(_load_path(path), data, method, sparsity, **kwargs)


#: options of bs.prune that out-of-core pruning does not take, with their defaults
_PATH_DEFAULTS = {"max_layer_sparsity": 0.99, "loss_fn": None, "device": "cpu", "schedule": "oneshot", "steps": None,
                  "finetune": None, "compact": None, "round_to": None, "recalibrate_bn": None}


def _load_path(path) -> nn.Module:
    """An HF directory (its config names a transformers class; no remote code) or a brainsurgeon file."""
    if path.is_dir():
        from .offload import load_skeleton

        skeleton, _ = load_skeleton(path)  # the config and shards checked as data before any weight is read
        return type(skeleton).from_pretrained(str(path), local_files_only=True, trust_remote_code=False).eval()
    if path.is_file():
        from .sparse import load

        return load(path)
    raise BrainsurgeonError(f"{path} is neither an HF model directory nor a brainsurgeon model file")


def _run_schedule(model, data, method, sparsity, **kwargs) -> PruneResult:
    from .schedules import run_schedule

    return run_schedule(model, data, method, sparsity, **kwargs)


def _prune_channels(model, data, method, sparsity, hf: bool, **kwargs) -> PruneResult:
    if hf:
        from .structured.transformer_engine import prune_transformer

        return prune_transformer(model, data, method, sparsity, **kwargs)
    from .structured.engine import prune_channels

    return prune_channels(model, data, method, sparsity, **kwargs)


def check_model_device(model: nn.Module, device) -> torch.device:
    """The device, refused unless every parameter of ``model`` is on it (big models are not moved)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise BrainsurgeonError(f"device {device!r} is not a torch device: {e}") from e
    found = {p.device for p in model.parameters()}
    if dev.type == "cuda" and dev.index is None:
        found = {torch.device("cuda") if d.type == "cuda" else d for d in found}
    if found != {dev}:
        where = ", ".join(sorted(str(d) for d in found))
        raise BrainsurgeonError(
            f"the model is on {where} but device={str(dev)!r}; pass device={where!r} or move the model first (model.to(...))"
        )
    return dev


def prune_hf(model: nn.Module, data, method: str, sparsity, *, layers=None, loss_fn=None, batch_size: int,
             num_samples=None, device="cpu", **kwargs) -> PruneResult:
    """``bs.prune`` on a Hugging Face model: unstructured and N:M, every method of the engine.

    Token data are validated and turned into ``(x, y)`` batches (``adapters.hf.token_batches``),
    the working copy has GPT-2's ``Conv1D`` swapped for ``nn.Linear`` and is pruned through a
    ``TokenView`` with the model's own loss; the result has its ``Conv1D`` back (so
    ``save_pretrained`` and plain transformers load it) and its masks in each module's own
    orientation. The report gains ``model``: the family, the swapped layers, and the tied weights.
    """
    from .adapters.hf import HFAdapter, TokenView, conv1d_masks, conv1d_to_linear, linear_to_conv1d, token_batches

    adapter = HFAdapter(model)
    check_model_device(model, device)
    batches = token_batches(data, model, batch_size=batch_size, num_samples=num_samples)
    # the engine prunes a deep copy of the view (one copy of the model); only Conv1D models need their
    # own copy first, to swap the Conv1D layers without touching the user's model
    work = copy.deepcopy(model) if adapter.conv1d_names() else model
    swapped = conv1d_to_linear(work) if work is not model else []
    view = TokenView(work)
    chosen = adapter.default_layers() if layers is None else layers
    res = _run_schedule(view, batches, method, sparsity, layers=chosen, loss_fn=loss_fn or view.loss_fn,
                        batch_size=batch_size, num_samples=None, device=device, **kwargs)
    pruned = res.model.hf
    linear_to_conv1d(pruned, swapped)
    pruned.train(model.training)
    report = dict(res.report)
    report["options"] = {**report.get("options", {}), "layers": layers, "num_samples": num_samples}
    report["calibration_samples"] = {"used": batches.used, "given": batches.given, "truncated": batches.used < batches.given}
    report["model"] = {
        "family": adapter.family, "task": adapter.task, "blocks": len(adapter.blocks()),
        "conv1d_as_linear": swapped, "tied": adapter.tied_names(),
    }
    return PruneResult(model=pruned, report=report, masks=conv1d_masks(res.masks, swapped))
