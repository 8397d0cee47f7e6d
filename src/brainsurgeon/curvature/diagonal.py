"""Diagonal curvature over the target weights: exact GGN, empirical Fisher, Monte-Carlo true Fisher.

All three are averages of squared per-sample vectors (see :mod:`.per_sample`),

    diag(C)_q = (1/N) sum_i sum_k (v_ik)_q^2,

and for a layer z = W a (+ b) every such vector is a per-sample weight gradient of a scalar
pseudo-loss r_ik(f(x_i)): v_ik = sum_t s_ikt a_it^T, with s_ikt the back-propagated signal at the
layer's output position t (one position for Linear layers, one per spatial location for Conv2d,
whose a_it are the unfolded input patches). So one forward pass and K backward passes per batch
(K = number of output columns of M for the GGN, 1 for the Fisher estimates) give every diagonal:

* one position (Linear):    diag = (1/N) sum_ik (s_ik^2)(a_i^2)^T   (no per-sample gradient is formed)
* several positions (Conv): diag = (1/N) sum_ik (sum_t s_ikt a_it^T)^2  (per-sample gradient by bmm)

Squares and sums are taken in float64. The hooks here (:class:`LayerTaps`) are shared with K-FAC.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import grad

from ..distributed import all_reduce_count, all_reduce_sum
from ..errors import BrainsurgeonError
from ..targets import Target
from .per_sample import (
    PerSampleVectors, _is_cross_entropy, _per_sample_loss, check_curvature, map_samples, output_hessian_sqrt,
)
from .sequence import can_sample_targets, sequence_signals, uses_sequence_signals

Tracker = Callable[[Iterable, str, int], Iterable]


def _no_track(iterable, description, total=None):
    return iterable


# ----------------------------------------------------------------------------- hooks
class _Captured(dict):
    """Per-layer captures; a layer the forward pass never called is a clear error, not a KeyError."""

    def __missing__(self, name: str):
        raise BrainsurgeonError(
            f"layer {name!r} is not called as a module in the forward pass (its weight is used directly, as "
            "nn.MultiheadAttention does with out_proj), so its inputs cannot be captured; exclude it with "
            f"layers={{'exclude': [{name!r}]}} or use a method that takes per-sample gradients (obd, obs, woodfisher)"
        )


class LayerTaps:
    """Forward hooks that keep each target layer's input and output during one forward pass.

    The output z is made a graph node that requires grad (if the model's own parameters do not
    require grad, the hook cuts the graph there), so ``torch.autograd.grad(out, taps.outputs())``
    returns dr/dz for any scalar r of the network output without computing weight gradients.
    """

    def __init__(self, targets: list[Target]):
        for t in targets:
            if t.attr != "weight":  # e.g. MultiheadAttention.in_proj_weight: no layer output to tap
                raise BrainsurgeonError(
                    f"{t.name} is not a layer with its own input and output, which this method needs; exclude it "
                    f"with layers={{'exclude': [{t.name!r}]}} or use obd, obs, woodfisher, sparsegpt, obc or wanda"
                )
            if t.tied_layers:  # one tap sees one use of the tensor; its other uses would be silently left out
                raise BrainsurgeonError(
                    f"the weight of {t.name!r} is tied to {', '.join(t.tied)}; this method's per-layer statistics "
                    f"assume one use per weight: exclude it with layers={{'exclude': [{t.name!r}]}} or use obd, obs, "
                    "woodfisher, sparsegpt, obc or wanda"
                )
        self.targets = targets
        self.inputs: dict[str, torch.Tensor] = _Captured()
        self.outputs: dict[str, torch.Tensor] = _Captured()
        self._handles: list = []

    def _hook(self, name: str):
        def hook(module, args, output):
            if name in self.inputs:
                raise BrainsurgeonError(
                    f"layer {name!r} is called more than once per forward pass (shared weights); its curvature "
                    f"is not a single layer's: exclude it with layers={{'exclude': [{name!r}]}}"
                )
            self.inputs[name] = args[0].detach()
            if not output.requires_grad:
                output = output.detach().requires_grad_(True)
            self.outputs[name] = output
            return output

        return hook

    def __enter__(self) -> "LayerTaps":
        self.inputs.clear()
        self.outputs.clear()
        self._handles = [t.module.register_forward_hook(self._hook(t.name)) for t in self.targets]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def output_grads(self, out: torch.Tensor, signal: torch.Tensor, retain_graph: bool) -> dict[str, torch.Tensor]:
        """d(sum_i signal_i . out_i)/dz for every target output z (zeros where z does not reach ``out``)."""
        names = [t.name for t in self.targets]
        zs = [self.outputs[n] for n in names]
        grads = torch.autograd.grad(out, zs, grad_outputs=signal, retain_graph=retain_graph, allow_unused=True)
        return {n: (torch.zeros_like(z) if g is None else g) for n, z, g in zip(names, zs, grads)}


def layer_inputs(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's inputs as (B, T, d_in): T positions (1 for a plain Linear), d_in = in (Linear) or
    C_in * kh * kw (Conv2d patches, channel-major like ``weight.reshape(out, -1)``; Conv1d: C_in * k)."""
    if isinstance(module, nn.Conv1d):
        if x.dim() != 3:
            raise BrainsurgeonError(f"Conv1d inputs must be batched (B, C, L), got shape {tuple(x.shape)}")
        return conv1d_patches(module, x)
    if isinstance(module, nn.Conv2d):
        if x.dim() != 4:
            raise BrainsurgeonError(f"Conv2d inputs must be batched (B, C, H, W), got shape {tuple(x.shape)}")
        pad = module._reversed_padding_repeated_twice  # the padding the conv itself applies, any mode
        if any(pad):
            mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
            x = F.pad(x, pad, mode=mode)
        patches = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=0, stride=module.stride)
        return patches.transpose(1, 2)
    return x.reshape(x.shape[0], -1, x.shape[-1])


def conv1d_patches(module: nn.Conv1d, x: torch.Tensor) -> torch.Tensor:
    """(B, L_out, C_in * k) patches of a Conv1d's (B, C_in, L) input, channel-major like
    ``weight.reshape(out, -1)``: the 1-D convolution unfolded as a 2-D one of height 1."""
    pad = module._reversed_padding_repeated_twice  # the padding the conv itself applies, any mode
    if any(pad):
        x = F.pad(x, pad, mode="constant" if module.padding_mode == "zeros" else module.padding_mode)
    patches = F.unfold(
        x.unsqueeze(2), (1, module.kernel_size[0]), dilation=(1, module.dilation[0]), stride=(1, module.stride[0])
    )
    return patches.transpose(1, 2)


def layer_output_grads(module: nn.Module, g: torch.Tensor) -> torch.Tensor:
    """dr/dz as (B, T, out), positions in the same order as :func:`layer_inputs`."""
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return g.reshape(g.shape[0], g.shape[1], -1).transpose(1, 2)
    return g.reshape(g.shape[0], -1, g.shape[-1])


# ----------------------------------------------------------------------------- backprop signals
def sample_labels(out: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """y~_i ~ softmax(f(x_i)), drawn exactly as :class:`.per_sample.PerSampleVectors` draws them."""
    probs = torch.softmax(out.detach().double(), dim=1)
    dev = generator.device if generator is not None else torch.device("cpu")
    return torch.multinomial(probs.to(dev), 1, generator=generator).squeeze(1).to(out.device)


def backprop_signals(
    loss_fn, out: torch.Tensor, y: torch.Tensor, kind: str, generator: torch.Generator | None, note=None
) -> torch.Tensor:
    """(K, *out.shape): the vectors back-propagated from the outputs, one backward pass each.

    ``"ggn"``: the K columns of M_i (M_i M_i^T = d2 l_i/d f2), so sum_k J^T m_k m_k^T J = J^T H J.
    ``"empirical"`` / ``"fisher"``: K = 1, d l(f(x_i), y_i)/d f with the data labels or labels
    sampled from the model (the per-sample loss, not the batch mean: no 1/B).
    """
    out = out.detach()
    if uses_sequence_signals(loss_fn, out):  # (B, L, C) outputs or a TokenView loss: loops, no vmap
        return sequence_signals(loss_fn, out, y, kind, generator)
    if kind == "ggn":
        m = output_hessian_sqrt(loss_fn, out, y, note)  # (B, C, K)
        return m.permute(2, 0, 1).reshape(m.shape[2], *out.shape)
    if kind == "fisher":
        y = sample_labels(out, generator)
    g = map_samples(grad(_per_sample_loss(loss_fn)), (out, y), (0, 0), note)
    return g.unsqueeze(0)


def check_fisher_loss(kind: str, loss_fn, instead: str = "curvature='ggn' or 'empirical'") -> None:
    """The sampled (true) Fisher draws labels from softmax outputs: cross-entropy only."""
    if kind == "fisher" and getattr(loss_fn, "weight", None) is not None:
        raise BrainsurgeonError(
            "the true Fisher samples labels from the model, so the class weights of the data labels do not "
            f"apply; use {instead} with a class-weighted loss"
        )
    if kind == "fisher" and not (_is_cross_entropy(loss_fn) or can_sample_targets(loss_fn)):
        raise BrainsurgeonError(
            "the true Fisher samples labels from softmax outputs and needs nn.CrossEntropyLoss; "
            f"use {instead} with other losses"
        )


# ----------------------------------------------------------------------------- the diagonals
@dataclass(frozen=True)
class DiagonalCurvature:
    """The diagonal of a curvature matrix over the target weights.

    ``diag[name]`` is a float64 tensor shaped like that target's weight; ``num_samples`` = N.
    """

    diag: dict[str, torch.Tensor]
    num_samples: int
    kind: ClassVar[str] = ""

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.diag[name]


@dataclass(frozen=True)
class DiagGGN(DiagonalCurvature):
    """Exact diagonal of the generalized Gauss-Newton matrix (Schraudolph 2002):

        G_qq = (1/N) sum_i [J_i^T H_i J_i]_qq = (1/N) sum_i sum_k (J_i^T m_ik)_q^2,

    J_i = d f(x_i)/d w, H_i = d2 l_i/d f2 = M_i M_i^T. For cross-entropy it equals the true Fisher.
    """

    kind: ClassVar[str] = "ggn"


@dataclass(frozen=True)
class DiagEmpiricalFisher(DiagonalCurvature):
    """Diagonal of the empirical Fisher: F_qq = (1/N) sum_i (d l(f(x_i), y_i)/d w_q)^2, data labels y_i."""

    kind: ClassVar[str] = "empirical"


@dataclass(frozen=True)
class DiagMCFisher(DiagonalCurvature):
    """Monte-Carlo diagonal of the true Fisher: F_qq = (1/N) sum_i (d l(f(x_i), y~_i)/d w_q)^2 with
    y~_i ~ softmax(f(x_i)) (one draw per sample); unbiased for E_y~[.] = the GGN diagonal."""

    kind: ClassVar[str] = "fisher"


_DIAGONALS: dict[str, type[DiagonalCurvature]] = {c.kind: c for c in (DiagGGN, DiagEmpiricalFisher, DiagMCFisher)}


def _accumulate_squared_grads(module: nn.Module, a: torch.Tensor, s: torch.Tensor, acc: torch.Tensor) -> None:
    """acc (out, d_in/groups) += sum_i (per-sample weight gradient of sample i)^2, in float64."""
    a, s = a.double(), s.double()
    groups = getattr(module, "groups", 1)
    if a.shape[1] == 1 and groups == 1:
        # one position: grad_i = s_i a_i^T, so grad_i^2 = (s_i^2)(a_i^2)^T summed by one matmul
        acc += (s[:, 0] ** 2).T @ (a[:, 0] ** 2)
        return
    # several positions: form the per-sample gradients (B, out, d_in) in chunks that fit ~64 MiB
    b, out_ch, d_in = a.shape[0], s.shape[2], a.shape[2]
    chunk = max(1, (64 * 2**20) // (8 * out_ch * d_in // max(groups, 1) + 1))
    og, ig = out_ch // groups, d_in // groups
    for lo in range(0, b, chunk):
        aa, ss = a[lo : lo + chunk], s[lo : lo + chunk]
        for g in range(groups):
            per_sample = ss[:, :, g * og : (g + 1) * og].transpose(1, 2) @ aa[:, :, g * ig : (g + 1) * ig]
            acc[g * og : (g + 1) * og] += (per_sample**2).sum(0)


def tap_split(model: nn.Module, targets: list[Target], x: torch.Tensor) -> tuple[list[Target], list[Target]]:
    """(targets the forward hooks see once per pass, the others). The others (a weight used without
    calling its module, as MultiheadAttention does with out_proj and in_proj_weight; a module called
    twice; a parameter tied to another) take the per-sample-gradient path, which differentiates
    through every use of the parameter."""
    calls = {t.name: 0 for t in targets}
    handles = []
    for t in targets:
        def hook(module, args, output, name=t.name):
            calls[name] += 1
        handles.append(t.module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(x[:1])
    finally:
        for h in handles:
            h.remove()
    tapped = [t for t in targets if t.attr == "weight" and not t.tied_layers and calls[t.name] == 1]
    return tapped, [t for t in targets if t not in tapped]


def _functional_diagonal(model, targets, calib, loss_fn, kind, generator, note) -> dict[str, torch.Tensor]:
    """sum_i sum_k (v_ik)^2 over the samples, v_ik the per-sample vectors of :mod:`.per_sample`."""
    psv = PerSampleVectors(model, targets, calib, loss_fn, kind, generator, note=note)
    acc = torch.zeros(psv.layout.size, dtype=torch.float64, device=targets[0].weight.device)
    for v in psv:
        acc += (v.double() ** 2).sum(0)
    return {t.name: a.reshape(t.weight.shape[0], -1) for t, a in zip(targets, psv.layout.split(acc))}


def diagonal_curvature(
    model: nn.Module,
    targets: list[Target],
    calib,
    loss_fn,
    curvature: str = "ggn",
    generator: torch.Generator | None = None,
    track: Tracker = _no_track,
    note=None,
) -> DiagonalCurvature:
    """The diagonal of the GGN (``"ggn"``), empirical Fisher (``"empirical"``) or MC true Fisher
    (``"fisher"``) over the target weights, from one forward and K backward passes per batch.

    Targets the hooks cannot see (see :func:`tap_split`) get theirs from per-sample gradients
    through ``torch.func``. ``note(what)`` records numerical fallbacks (a per-sample loop where
    vmap fails on a custom loss)."""
    kind = check_curvature(curvature)
    check_fisher_loss(kind, loss_fn)
    tapped, functional = tap_split(model, targets, calib.batches[0][0])
    for t in tapped:
        if t.tied and note is not None:  # e.g. an lm_head tied to the token embedding
            note(f"{t.name}: the uses of its tied weight by {', '.join(t.tied)} (not a layer) are not in its curvature")
    acc = {
        t.name: torch.zeros(t.weight.shape[0], t.weight[0].numel(), dtype=torch.float64, device=t.weight.device)
        for t in tapped
    }
    taps = LayerTaps(tapped)
    batches = calib.batches
    for x, y in track(batches, f"diagonal {kind}", len(batches)) if tapped else ():
        with torch.enable_grad(), taps:
            out = model(x)
        inputs = {t.name: layer_inputs(t.module, taps.inputs[t.name]) for t in tapped}
        signals = backprop_signals(loss_fn, out, y, kind, generator, note)
        for k in range(signals.shape[0]):
            grads = taps.output_grads(out, signals[k].to(out.dtype), retain_graph=k < signals.shape[0] - 1)
            for t in tapped:
                s = layer_output_grads(t.module, grads[t.name])
                _accumulate_squared_grads(t.module, inputs[t.name], s, acc[t.name])
    if functional:
        acc.update(_functional_diagonal(model, functional, calib, loss_fn, kind, generator, note))
    # several ranks: sums and sample counts over every rank's shard, then the mean (distributed.py)
    acc = {name: all_reduce_sum(a) for name, a in acc.items()}
    n = all_reduce_count(calib.num_samples)
    diag = {t.name: (acc[t.name] / n).reshape(t.weight.shape) for t in targets}
    return _DIAGONALS[kind](diag=diag, num_samples=n)
