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
from torch.func import grad, vmap

from ..errors import BrainsurgeonError
from ..targets import Target
from .per_sample import _is_cross_entropy, _per_sample_loss, check_curvature, output_hessian_sqrt

Tracker = Callable[[Iterable, str, int], Iterable]


def _no_track(iterable, description, total=None):
    return iterable


# ----------------------------------------------------------------------------- hooks
class LayerTaps:
    """Forward hooks that keep each target layer's input and output during one forward pass.

    The output z is made a graph node that requires grad (if the model's own parameters do not
    require grad, the hook cuts the graph there), so ``torch.autograd.grad(out, taps.outputs())``
    returns dr/dz for any scalar r of the network output without computing weight gradients.
    """

    def __init__(self, targets: list[Target]):
        self.targets = targets
        self.inputs: dict[str, torch.Tensor] = {}
        self.outputs: dict[str, torch.Tensor] = {}
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
    C_in * kh * kw (Conv2d patches, channel-major like ``weight.reshape(out, -1)``)."""
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


def layer_output_grads(module: nn.Module, g: torch.Tensor) -> torch.Tensor:
    """dr/dz as (B, T, out), positions in the same order as :func:`layer_inputs`."""
    if isinstance(module, nn.Conv2d):
        return g.reshape(g.shape[0], g.shape[1], -1).transpose(1, 2)
    return g.reshape(g.shape[0], -1, g.shape[-1])


# ----------------------------------------------------------------------------- backprop signals
def sample_labels(out: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """y~_i ~ softmax(f(x_i)), drawn exactly as :class:`.per_sample.PerSampleVectors` draws them."""
    probs = torch.softmax(out.detach().double(), dim=1)
    dev = generator.device if generator is not None else torch.device("cpu")
    return torch.multinomial(probs.to(dev), 1, generator=generator).squeeze(1).to(out.device)


def backprop_signals(
    loss_fn, out: torch.Tensor, y: torch.Tensor, kind: str, generator: torch.Generator | None
) -> torch.Tensor:
    """(K, *out.shape): the vectors back-propagated from the outputs, one backward pass each.

    ``"ggn"``: the K columns of M_i (M_i M_i^T = d2 l_i/d f2), so sum_k J^T m_k m_k^T J = J^T H J.
    ``"empirical"`` / ``"fisher"``: K = 1, d l(f(x_i), y_i)/d f with the data labels or labels
    sampled from the model (the per-sample loss, not the batch mean: no 1/B).
    """
    out = out.detach()
    if kind == "ggn":
        m = output_hessian_sqrt(loss_fn, out, y)  # (B, C, K)
        return m.permute(2, 0, 1).reshape(m.shape[2], *out.shape)
    if kind == "fisher":
        y = sample_labels(out, generator)
    g = vmap(grad(_per_sample_loss(loss_fn)))(out, y)
    return g.unsqueeze(0)


def check_fisher_loss(kind: str, loss_fn, instead: str = "curvature='ggn' or 'empirical'") -> None:
    """The sampled (true) Fisher draws labels from softmax outputs: cross-entropy only."""
    if kind == "fisher" and not _is_cross_entropy(loss_fn):
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


def diagonal_curvature(
    model: nn.Module,
    targets: list[Target],
    calib,
    loss_fn,
    curvature: str = "ggn",
    generator: torch.Generator | None = None,
    track: Tracker = _no_track,
) -> DiagonalCurvature:
    """The diagonal of the GGN (``"ggn"``), empirical Fisher (``"empirical"``) or MC true Fisher
    (``"fisher"``) over the target weights, from one forward and K backward passes per batch."""
    kind = check_curvature(curvature)
    check_fisher_loss(kind, loss_fn)
    acc = {
        t.name: torch.zeros(t.weight.shape[0], t.weight[0].numel(), dtype=torch.float64, device=t.weight.device)
        for t in targets
    }
    taps = LayerTaps(targets)
    batches = calib.batches
    for x, y in track(batches, f"diagonal {kind}", len(batches)):
        with torch.enable_grad(), taps:
            out = model(x)
        inputs = {t.name: layer_inputs(t.module, taps.inputs[t.name]) for t in targets}
        signals = backprop_signals(loss_fn, out, y, kind, generator)
        for k in range(signals.shape[0]):
            grads = taps.output_grads(out, signals[k].to(out.dtype), retain_graph=k < signals.shape[0] - 1)
            for t in targets:
                s = layer_output_grads(t.module, grads[t.name])
                _accumulate_squared_grads(t.module, inputs[t.name], s, acc[t.name])
    n = calib.num_samples
    diag = {t.name: (acc[t.name] / n).reshape(t.weight.shape) for t in targets}
    return _DIAGONALS[kind](diag=diag, num_samples=n)
