"""Checks of everything a pruning run is given, made before any long work.

``check_calibration`` reads every calibration batch (not only the first): non-finite inputs,
class labels outside ``[0, num_classes)`` for the classification losses, and batches whose sample
shape or dtype differ from the first batch's are one-line :class:`BrainsurgeonError` that name
the batch and the sample. Cheap next to any pruning method (one pass of elementwise checks, no
forward pass). ``run_notes`` gathers what the report must say about the run's inputs: how much of
the data was used, the weights no method prunes, tied parameters, and layers held at the cap.
``calibrated_loss`` gives a class-weighted CrossEntropyLoss/NLLLoss its per-sample decomposition
over the calibration set, so that every curvature honours the class weights.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from .allocation import capped_sparsity, num_pruned, uniform_count
from .data import Calibration
from .errors import BrainsurgeonError, user_stacklevel
from .targets import Target, unpruned_weights



class DataWarning(UserWarning):
    """What the run did with the user's data and model that they may not expect: calibration data
    truncated, weights no method prunes, layers held at ``max_layer_sparsity``. (The CLI can filter
    this category under ``--quiet``; the report always holds the same facts.)"""


# losses whose integer targets are class indices into dimension 1 of the outputs
_CLASS_INDEX_LOSSES = (nn.CrossEntropyLoss, nn.NLLLoss)


def _where(calib: Calibration, b: int, i: int) -> str:
    start = sum(len(x) for x, _ in calib.batches[:b])
    return f"batch {b}, sample {i} (sample {start + i} of the calibration data)"


def _first_bad(mask: torch.Tensor) -> int:
    """Index of the first sample with any True in ``mask`` (B, ...), or -1."""
    per_sample = mask.reshape(mask.shape[0], -1).any(1) if mask.dim() > 1 else mask
    hit = torch.nonzero(per_sample)
    return int(hit[0, 0]) if len(hit) else -1


def _same_kind(t: torch.Tensor, ref: torch.Tensor, free_last: bool) -> bool:
    """Same dtype and sample shape; with ``free_last`` the last dimension (a sequence length) may differ."""
    if t.dtype != ref.dtype or t.dim() != ref.dim():
        return False
    a, r = t.shape[1:], ref.shape[1:]
    return (a[:-1] == r[:-1]) if free_last and len(a) else a == r


def _check_consistent(calib: Calibration) -> None:
    x0, y0 = calib.batches[0]
    tokens = not (x0.is_floating_point() or x0.is_complex())  # token ids: batches padded to their own length
    for b, (x, y) in enumerate(calib.batches[1:], start=1):
        for what, t, ref in (("inputs", x, x0), ("targets", y, y0)):
            if not _same_kind(t, ref, tokens):
                raise BrainsurgeonError(
                    f"batch {b} has {what} of sample shape {tuple(t.shape[1:])} and dtype {t.dtype}, but batch 0 "
                    f"has {tuple(ref.shape[1:])} and {ref.dtype}; every calibration batch must have the same sample shape "
                    "(token ids: all but the length) and dtype"
                )


def uses_class_indices(loss_fn) -> bool:
    """Whether the loss reads its targets as class indices (then they are checked against the classes)."""
    return isinstance(loss_fn, _CLASS_INDEX_LOSSES)


def _class_range(loss_fn, num_outputs: int | None) -> tuple[int, int | None] | None:
    """(num_classes, ignore_index) when ``loss_fn`` reads integer targets as class indices."""
    if not isinstance(loss_fn, _CLASS_INDEX_LOSSES) or num_outputs is None:
        return None
    return num_outputs, getattr(loss_fn, "ignore_index", None)


def check_calibration(calib: Calibration, loss_fn, num_outputs: int | None) -> None:
    """Every batch: same sample shapes/dtypes, finite inputs and float targets, class labels in range.

    ``num_outputs``: the size of the model output's class dimension (dimension 1), for the
    label-range check of cross-entropy / NLL losses."""
    _check_consistent(calib)
    classes = _class_range(loss_fn, num_outputs)
    for b, (x, y) in enumerate(calib.batches):
        for what, t in (("input", x), ("target", y)):
            if t.is_floating_point() or t.is_complex():
                i = _first_bad(~torch.isfinite(t))
                if i >= 0:
                    raise BrainsurgeonError(
                        f"calibration {what} at {_where(calib, b, i)} is NaN or infinite; remove or fix that sample"
                    )
        if classes is not None and not y.is_floating_point():
            n, ignore = classes
            bad = (y < 0) | (y >= n)
            if ignore is not None:
                bad &= y != ignore
            i = _first_bad(bad)
            if i >= 0:
                label = y[i].reshape(-1)[bad[i].reshape(-1)][0].item()
                raise BrainsurgeonError(
                    f"calibration target at {_where(calib, b, i)} is class {label}, outside [0, {n}) for the "
                    f"model's {n} outputs; fix the labels or the loss"
                )


def _is_weighted(loss_fn) -> bool:
    return isinstance(loss_fn, (nn.CrossEntropyLoss, nn.NLLLoss)) and loss_fn.weight is not None


def check_loss_weights(loss_fn) -> None:
    """A class-weighted loss must come through :func:`calibrated_loss`: a per-sample loss (a batch
    of one) divides the class weight out (torch normalises a weighted mean by the sum of the
    weights), so the weights would silently vanish from the curvature."""
    if _is_weighted(loss_fn) and not isinstance(loss_fn, _ClassWeighted):
        raise BrainsurgeonError(
            f"{type(loss_fn).__name__}(weight=...) needs its per-sample normalisation over the calibration set; "
            "run it through bs.prune (or brainsurgeon.validation.calibrated_loss) or pass an unweighted loss"
        )


class _ClassWeighted:
    """Per-sample decomposition of a class-weighted mean loss over the calibration set.

    torch's weighted mean over the N calibration samples is L = sum_i w_i l_i / W, with w_i the
    class weight of sample i's target(s) (0 for ignore_index) and W = sum_i w_i. Every curvature
    here averages per-sample terms, C = (1/N) sum_i c_i, so the per-sample loss is
    l'_i = (N / W) w_i l_i (``per_sample``): then (1/N) sum_i l'_i = L exactly, and the GGN and the
    empirical Fisher are those of L. A batch call is torch's own loss, unchanged."""

    sample_scale: float

    def per_sample(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """l'_i of one sample (no batch dimension): torch's unreduced weighted loss times N / W."""
        raw = self._unreduced(out.unsqueeze(0), y.unsqueeze(0))
        return self.sample_scale * raw.sum()


class _WeightedCE(_ClassWeighted, nn.CrossEntropyLoss):
    def _unreduced(self, out, y):
        return F.cross_entropy(
            out, y, weight=self.weight, ignore_index=self.ignore_index, label_smoothing=self.label_smoothing,
            reduction="none",
        )


class _WeightedNLL(_ClassWeighted, nn.NLLLoss):
    def _unreduced(self, out, y):
        return F.nll_loss(out, y, weight=self.weight, ignore_index=self.ignore_index, reduction="none")


def calibrated_loss(loss_fn, calib: Calibration):
    """``loss_fn`` itself, or for a class-weighted CrossEntropyLoss/NLLLoss (mean reduction) the
    same loss carrying its per-sample normalisation N / W over ``calib`` (see :class:`_ClassWeighted`)."""
    if not _is_weighted(loss_fn) or isinstance(loss_fn, _ClassWeighted):
        return loss_fn
    if loss_fn.reduction != "mean":
        raise BrainsurgeonError(f"loss_fn must be a mean over the batch; got reduction={loss_fn.reduction!r}")
    ce = isinstance(loss_fn, nn.CrossEntropyLoss)
    wrapped = (_WeightedCE if ce else _WeightedNLL)(weight=loss_fn.weight, ignore_index=loss_fn.ignore_index)
    if ce:
        wrapped.label_smoothing = loss_fn.label_smoothing
    w = loss_fn.weight.to(torch.float64)
    total = 0.0
    for _, y in calib.batches:
        if y.is_floating_point():  # class probabilities: torch's mean divides by the number of targets
            total += y.numel() / y.shape[1] if y.dim() > 1 else 0.0
        else:
            keep = y != loss_fn.ignore_index
            total += float(w.to(y.device)[y[keep]].sum())
    if total <= 0:
        raise BrainsurgeonError("the class weights of the calibration targets sum to zero: the weighted loss is undefined")
    wrapped.sample_scale = calib.num_samples / total
    return wrapped


def num_outputs(model: nn.Module, calib: Calibration) -> int | None:
    """Size of dimension 1 of the model's output on one sample (the classes), if it has one."""
    try:
        with torch.no_grad():
            out = model(calib.batches[0][0][:1])
    except Exception:  # data that does not fit the model: the engine's own check words that error
        return None
    return int(out.shape[1]) if isinstance(out, torch.Tensor) and out.dim() >= 2 else None


def run_notes(model: nn.Module, targets: list[Target], calib: Calibration, opts, layers) -> dict:
    """What the report says about the inputs (and warns about): calibration used / given, weights
    not pruned, tied parameters, uniform targets held at ``max_layer_sparsity``."""
    notes: dict = {"calibration_samples": calib.summary()}
    if calib.truncated:
        given = calib.given if calib.given is not None else "more"
        warnings.warn(
            f"calibration data truncated: the first {calib.num_samples} of {given} samples are used "
            f"(num_samples={opts.num_samples}); pass num_samples=None to use all of them",
            DataWarning,
            stacklevel=user_stacklevel(),
        )
    skipped = unpruned_weights(model, targets, layers)
    notes["not_pruned"] = skipped
    if skipped:
        warnings.warn(
            "weights no method prunes are left dense: "
            + ", ".join(f"{k} ({v})" for k, v in skipped.items()),
            DataWarning,
            stacklevel=user_stacklevel(),
        )
    tied = {t.name: list(t.tied) for t in targets if t.tied}
    if tied:
        notes["tied"] = tied
    if opts.allocation == "uniform" and opts.structure.kind == "unstructured":
        capped = {}
        for t in targets:
            n = t.weight.numel()
            if uniform_count(n, opts.sparsity, opts.max_layer_sparsity) < num_pruned(n, opts.sparsity):
                capped[t.name] = capped_sparsity(n, opts.sparsity, opts.max_layer_sparsity)
        if capped:
            notes["capped_layers"] = capped
            notes["target_sparsity"] = {
                t.name: capped.get(t.name, opts.sparsity) for t in targets
            }
            warnings.warn(
                f"uniform sparsity {opts.sparsity} would (nearly) empty layers; held at max_layer_sparsity="
                f"{opts.max_layer_sparsity}: " + ", ".join(f"{k} -> {v:.4g}" for k, v in capped.items()),
                DataWarning,
                stacklevel=user_stacklevel(),
            )
    return notes
