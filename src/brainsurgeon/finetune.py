"""Fine-tuning that holds the pruning masks (step 3 of the classic pipeline, docs/methods.md).

Masks are applied through :mod:`torch.nn.utils.parametrize` (as ``torch.ao.pruning`` does): the layer's
``weight`` becomes ``original * mask``, so the loss never sees a pruned weight and its gradient
w.r.t. ``original`` is zero there. The underlying parameter is also re-masked after every optimizer
step, so neither momentum nor (decoupled) weight decay can move it. At the end the parametrization is
removed (squashed) and the returned model is a plain model of the same architecture whose pruned
weights are exactly zero.

Validation runs before the first step and at every epoch end (given validation data, or a seeded
split of the training data); the best of those states by validation loss (or accuracy), the pruned
model before fine-tuning included, is kept and returned, and the history is attached to the result
(``history["initial"]``: the validation metrics before fine-tuning).
"""
from __future__ import annotations

import copy
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn
from torch.nn.utils import parametrize

from .data import is_tensor_pair, iter_batches
from .errors import BrainsurgeonError
from .evaluate import evaluate
from .progress import progress_enabled, track
from .targets import LayerSpec, find_targets

OPTIMIZERS = ("sgd", "adam", "adamw")
SELECT = ("loss", "accuracy", "last")
LR_SCHEDULES = ("cosine", "constant")


def _positive(value, name: str, integer: bool = False, allow_zero: bool = False) -> None:
    kind = numbers.Integral if integer else numbers.Real
    ok = isinstance(value, kind) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value >= 0 if allow_zero else value > 0)
    if not ok:
        what = "a non-negative" if allow_zero else "a positive"
        raise BrainsurgeonError(f"FineTune {name} must be {what} {'integer' if integer else 'number'}, got {value!r}")


def as_tensors(data, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One ``(inputs, targets)`` pair of tensors from either accepted data form (batches are concatenated)."""
    if is_tensor_pair(data):
        x, y = (torch.as_tensor(t) for t in data)
    else:
        batches = list(iter_batches(data))
        if not batches:
            raise BrainsurgeonError(f"{what} is empty: give at least one (inputs, targets) sample")
        x = torch.cat([b[0] for b in batches])
        y = torch.cat([b[1] for b in batches])
    if len(x) != len(y):
        raise BrainsurgeonError(f"{what}: inputs and targets differ in length ({len(x)} vs {len(y)})")
    if len(x) == 0:
        raise BrainsurgeonError(f"{what} is empty: give at least one (inputs, targets) sample")
    return x, y


@dataclass
class FineTune:
    """How to fine-tune a pruned model while its masks hold.

    Args:
        train_data: ``(inputs, targets)`` tensors or an iterable of batches (materialised once).
        epochs: passes over the training data (a float is allowed: 0.5 = half an epoch). With a
            schedule, this is the *total* budget, spread over the rounds.
        lr: learning rate (cosine-decayed over each fine-tuning phase unless ``lr_schedule="constant"``).
        optimizer: ``"sgd"`` (with ``momentum``, Nesterov off), ``"adam"`` or ``"adamw"``.
        weight_decay: L2 (sgd/adam) or decoupled (adamw) decay.
        val_data: validation data; when None, ``val_fraction`` of the training data is held out
            (a seeded split); ``val_fraction=0`` disables validation and the last state is returned.
        select: keep the best state by validation ``"loss"`` or ``"accuracy"``, or the ``"last"``.
    """

    train_data: Any
    epochs: float = 10
    lr: float = 1e-3
    optimizer: str = "adam"
    momentum: float = 0.9
    weight_decay: float = 0.0
    batch_size: int = 128
    val_data: Any = None
    val_fraction: float = 0.1
    select: str = "loss"
    lr_schedule: str = "cosine"
    seed: int = 0
    device: str | torch.device = "cpu"
    loss_fn: Callable | None = None
    progress: bool | None = False
    _data: tuple | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _positive(self.epochs, "epochs", allow_zero=True)
        _positive(self.lr, "lr")
        _positive(self.batch_size, "batch_size", integer=True)
        _positive(self.weight_decay, "weight_decay", allow_zero=True)
        if self.optimizer not in OPTIMIZERS:
            raise BrainsurgeonError(f"FineTune optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if isinstance(self.momentum, bool) or not isinstance(self.momentum, numbers.Real) or not 0 <= self.momentum < 1:
            raise BrainsurgeonError(f"FineTune momentum must be in [0, 1), got {self.momentum!r}")
        if isinstance(self.val_fraction, bool) or not isinstance(self.val_fraction, numbers.Real) or not 0 <= self.val_fraction < 1:
            raise BrainsurgeonError(f"FineTune val_fraction must be in [0, 1), got {self.val_fraction!r}")
        if self.select not in SELECT:
            raise BrainsurgeonError(f"FineTune select must be one of {SELECT}, got {self.select!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise BrainsurgeonError(f"FineTune lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral):
            raise BrainsurgeonError(f"FineTune seed must be an integer, got {self.seed!r}")
        if self.loss_fn is not None and not callable(self.loss_fn):
            raise BrainsurgeonError("FineTune loss_fn must be callable as loss_fn(outputs, targets)")
        try:
            self.device = torch.device(self.device)
        except (RuntimeError, TypeError) as e:
            raise BrainsurgeonError(f"FineTune device {self.device!r} is not a torch device: {e}") from e
        self.splits()  # bad data fails here, before any pruning work

    def splits(self) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor] | None]:
        """``(train, val)`` tensors; val is None when validation is off."""
        if self._data is None:
            x, y = as_tensors(self.train_data, "FineTune train_data")
            if self.val_data is not None:
                val = as_tensors(self.val_data, "FineTune val_data")
            elif self.val_fraction > 0:
                n_val = int(round(self.val_fraction * len(x)))
                if n_val == 0 or n_val == len(x):
                    raise BrainsurgeonError(
                        f"FineTune val_fraction={self.val_fraction} leaves {len(x) - n_val} training and {n_val} "
                        f"validation samples of {len(x)}; give val_data or change val_fraction"
                    )
                perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(self.seed))
                val = (x[perm[:n_val]], y[perm[:n_val]])
                x, y = x[perm[n_val:]], y[perm[n_val:]]
            else:
                val = None
            self._data = ((x, y), val)
        return self._data

    @property
    def steps_per_epoch(self) -> int:
        (x, _), _ = self.splits()
        return math.ceil(len(x) / self.batch_size)

    @property
    def total_steps(self) -> int:
        """The whole budget in optimizer steps."""
        return int(round(self.epochs * self.steps_per_epoch))

    def options(self) -> dict:
        """The settings, for reports."""
        (x, _), val = self.splits()
        return {
            "epochs": self.epochs, "lr": self.lr, "optimizer": self.optimizer, "momentum": self.momentum,
            "weight_decay": self.weight_decay, "batch_size": self.batch_size, "select": self.select,
            "lr_schedule": self.lr_schedule, "seed": self.seed, "train_samples": len(x),
            "val_samples": 0 if val is None else len(val[0]),
            "validation": "none" if val is None else ("given" if self.val_data is not None else f"{self.val_fraction:g} split"),
            "total_steps": self.total_steps,
        }


# ----------------------------------------------------------------------------- masks


class KeepMask(nn.Module):
    """The parametrization ``weight = original * mask`` (mask: 1 = kept, 0 = pruned)."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * self.mask


def infer_masks(model: nn.Module, layers: LayerSpec = None) -> dict[str, torch.Tensor]:
    """Keep-masks from the exact zeros of the prunable weights (True = kept)."""
    return {t.name: t.weight.detach() != 0 for t in find_targets(model, layers)}


def _prunable(model: nn.Module) -> dict:
    """Every prunable weight of ``model`` by its mask name (``layer`` or ``layer.in_proj_weight``)."""
    try:
        return {t.name: t for t in find_targets(model)}
    except BrainsurgeonError:
        return {}


def check_masks(model: nn.Module, masks: dict) -> dict[str, torch.Tensor]:
    """Masks that name prunable weights of ``model`` and match their shapes, as bool tensors."""
    if not isinstance(masks, dict):
        raise BrainsurgeonError(f"masks must be a dict {{layer name: keep-mask}}, got {type(masks).__name__}")
    targets = _prunable(model)
    out = {}
    for name, m in masks.items():
        t = targets.get(name)
        if t is None:
            raise BrainsurgeonError(f"masks names {name!r}, which is not a prunable weight of the model")
        m = torch.as_tensor(m)
        if tuple(m.shape) != tuple(t.weight.shape):
            raise BrainsurgeonError(f"mask {name!r} has shape {tuple(m.shape)} but the weight has {tuple(t.weight.shape)}")
        out[name] = m.bool()
    return out


def attach_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> list[tuple[nn.Module, str]]:
    """Parametrize each masked weight (``weight``, or an attention's ``in_proj_weight``); the pruned
    entries of the original are zeroed too. Returns the (module, parameter name) pairs."""
    targets = _prunable(model)
    attached = []
    for name, mask in masks.items():
        if bool(mask.all()):
            continue  # nothing pruned: no parametrization needed
        t = targets[name]
        keep = mask.to(device=t.weight.device, dtype=t.weight.dtype)
        with torch.no_grad():
            t.weight.mul_(keep)
        parametrize.register_parametrization(t.module, t.attr, KeepMask(keep))
        attached.append((t.module, t.attr))
    return attached


def remask_originals(attached: list[tuple[nn.Module, str]]) -> None:
    """Zero the pruned entries of the underlying parameters (after each optimizer step)."""
    with torch.no_grad():
        for module, attr in attached:
            p = getattr(module.parametrizations, attr)
            p.original.mul_(p[0].mask)


def squash(attached: list[tuple[nn.Module, str]]) -> None:
    """Remove the parametrizations, leaving plain weights equal to ``original * mask``."""
    for module, attr in attached:
        parametrize.remove_parametrizations(module, attr, leave_parametrized=True)


# ----------------------------------------------------------------------------- training


def _optimizer(ft: FineTune, params) -> torch.optim.Optimizer:
    if ft.optimizer == "sgd":
        return torch.optim.SGD(params, lr=ft.lr, momentum=ft.momentum, weight_decay=ft.weight_decay)
    if ft.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=ft.lr, weight_decay=ft.weight_decay)
    return torch.optim.Adam(params, lr=ft.lr, weight_decay=ft.weight_decay)


def _score(metrics: dict, select: str) -> float:
    """Higher is better."""
    return metrics["accuracy"] if select == "accuracy" else -metrics["loss"]


def train_masked(
    model: nn.Module, masks: dict[str, torch.Tensor], ft: FineTune, num_steps: int, seed: int, phase: str = "fine-tuning"
) -> dict:
    """Train ``model`` in place for ``num_steps`` optimizer steps with ``masks`` held; returns the history.

    Validation runs every ``steps_per_epoch`` steps and at the end; the best state (``ft.select``)
    is restored before the masks are squashed.
    """
    (x, y), val = ft.splits()
    loss_fn = ft.loss_fn or nn.CrossEntropyLoss()
    device = ft.device
    model.to(device)
    was_training = model.training
    modules = attach_masks(model, masks)
    history: dict = {"steps": num_steps, "epochs": [], "best": None}
    try:
        if num_steps == 0:
            return history
        opt = _optimizer(ft, [p for p in model.parameters() if p.requires_grad])
        sched = (
            torch.optim.lr_scheduler.CosineAnnealingLR(opt, num_steps) if ft.lr_schedule == "cosine" else None
        )
        g = torch.Generator().manual_seed(seed)
        per_epoch = ft.steps_per_epoch
        best_state, best_score = None, -math.inf
        if val is not None and ft.select != "last":
            # the pruned model before any step is a candidate too: fine-tuning must never return worse
            metrics = evaluate(model, val, loss_fn=ft.loss_fn, device=device)
            start = {"step": 0, "epoch": 0.0, "val_loss": metrics["loss"], "val_accuracy": metrics["accuracy"]}
            best_score = _score(metrics, ft.select)
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            history["initial"] = history["best"] = start
        step, perm, pos = 0, torch.randperm(len(x), generator=g), 0
        running, seen = 0.0, 0
        steps_iter = track(range(num_steps), phase, progress_enabled(ft.progress), total=num_steps)
        for step in steps_iter:
            if pos >= len(x):  # a new shuffled epoch
                perm, pos = torch.randperm(len(x), generator=g), 0
            idx = perm[pos : pos + ft.batch_size]
            pos += ft.batch_size
            model.train()
            xb, yb = x[idx].to(device), y[idx].to(device)
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(xb), yb)
            if not torch.isfinite(loss):
                raise BrainsurgeonError(
                    f"fine-tuning diverged at step {step + 1} (loss {loss.item()}): lower the learning rate (lr={ft.lr})"
                )
            loss.backward()
            opt.step()
            remask_originals(modules)  # momentum and weight decay cannot move a pruned entry
            if sched is not None:
                sched.step()
            running += loss.item() * len(idx)
            seen += len(idx)
            if (step + 1) % per_epoch == 0 or step + 1 == num_steps:
                entry = {"step": step + 1, "epoch": (step + 1) / per_epoch, "train_loss": running / seen}
                running, seen = 0.0, 0
                if val is not None:
                    metrics = evaluate(model, val, loss_fn=ft.loss_fn, device=device)
                    entry.update(val_loss=metrics["loss"], val_accuracy=metrics["accuracy"])
                    score = _score(metrics, ft.select)
                    if ft.select != "last" and score > best_score:
                        best_score = score
                        best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                        history["best"] = entry
                history["epochs"].append(entry)
        if best_state is not None:
            model.load_state_dict(best_state)
        if history["best"] is None and history["epochs"]:
            history["best"] = history["epochs"][-1]
        return history
    finally:
        squash(modules)
        model.train(was_training)


def finetune(
    model: nn.Module,
    train_data=None,
    *,
    masks: dict | None = None,
    layers: LayerSpec = None,
    config: FineTune | None = None,
    **options,
) -> nn.Module:
    """Fine-tune a copy of ``model`` with its pruned weights held at exactly zero; ``model`` is untouched.

    Masks are the exact zeros of the prunable weights (``layers`` selects which), or ``masks=``
    ({layer name: keep-mask}). Options are those of :class:`FineTune` (``epochs``, ``lr``,
    ``optimizer``, ``weight_decay``, ``val_data``, ...), or pass ``config=FineTune(...)``.
    The returned copy carries the history as ``finetune_history``.
    """
    if not isinstance(model, nn.Module):
        raise BrainsurgeonError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    from .adapters.hf import is_hf_model

    if is_hf_model(model):
        return _finetune_hf(model, train_data, masks, layers, config, options)
    ft = _config(train_data, config, options, "(inputs, targets) tensors or batches")
    masks = infer_masks(model, layers) if masks is None else check_masks(model, masks)
    work = copy.deepcopy(model)
    history = train_masked(work, masks, ft, ft.total_steps, ft.seed)
    history["options"] = ft.options()
    work.finetune_history = history
    return work.train(model.training)


def _config(train_data, config: FineTune | None, options: dict, accepted: str) -> FineTune:
    """The :class:`FineTune` of a call: ``config``, or one built from ``train_data`` and the options."""
    if config is not None:
        if options or train_data is not None:
            raise BrainsurgeonError("give either config=FineTune(...) or train_data and options, not both")
        return config
    if train_data is None:
        raise BrainsurgeonError(f"finetune needs train_data: {accepted}")
    try:
        return FineTune(train_data, **options)
    except TypeError as e:
        raise BrainsurgeonError(f"finetune: {e}; options are those of bs.FineTune") from e


def _finetune_hf(model, train_data, masks, layers, config, options) -> nn.Module:
    """:func:`finetune` of a Hugging Face model on token data (what ``bs.prune`` accepts: ``(N, L)``
    ids, a tokenizer's output, or dict batches), with the model's own loss (next-token
    cross-entropy for a causal LM, the task loss with labels, the distance to the dense hidden
    states for a plain encoder; :class:`~.adapters.hf.TokenView`). The masks default to the exact
    zeros of the linears inside the blocks (embeddings and ``lm_head`` are not held unless
    ``layers=`` names them); GPT-2's ``Conv1D`` layers are held in their own (in, out) orientation."""
    import dataclasses
    import functools

    from .adapters.hf import HFAdapter, TokenView, conv1d_masks, conv1d_to_linear, linear_to_conv1d, task_loss

    adapter = HFAdapter(model)
    loss = functools.partial(task_loss, adapter.task, num_labels=getattr(model.config, "num_labels", None))
    if config is None and train_data is not None:
        if "loss_fn" in options:
            raise BrainsurgeonError("finetune of a transformers model uses the model's own loss; loss_fn cannot be given")
        options = dict(options, loss_fn=loss)
        if options.get("val_data") is not None:
            options["val_data"] = token_pairs(options["val_data"], model, "val_data")
        train_data = token_pairs(train_data, model, "train_data")
    ft = _config(train_data, config, options, "token ids (N, L) or a tokenizer's batches")
    if ft.loss_fn is None:
        ft = dataclasses.replace(ft, loss_fn=loss)
    work = copy.deepcopy(model)
    swapped = conv1d_to_linear(work)  # the masks and the training see (out, in) weights
    layers = adapter.default_layers() if layers is None else layers
    masks = infer_masks(work, layers) if masks is None else check_masks(work, conv1d_masks(masks, swapped))
    view = TokenView(work)
    history = train_masked(view, masks, ft, ft.total_steps, ft.seed)
    linear_to_conv1d(work, swapped)
    history["options"] = ft.options()
    work.finetune_history = history
    return work.train(model.training)


def token_pairs(data, model: nn.Module, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Token data as one ``(inputs, targets)`` pair of tensors (validated like ``bs.prune``'s data)."""
    from .adapters.hf import token_batches

    batches = token_batches(data, model, batch_size=1 << 30)
    if not batches:
        raise BrainsurgeonError(f"finetune {what} is empty: give at least one sequence")
    shapes = {tuple(x.shape[1:]) for x, _ in batches}
    if len(shapes) > 1:
        raise BrainsurgeonError(
            f"finetune {what}: the batches have different sequence shapes {sorted(shapes)}; pad them to one length "
            "and give an attention_mask"
        )
    return torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])
