"""Per-sample curvature vectors through ``torch.func``.

Every outer-product curvature used here is an average of rank-one terms over N samples,

    C = (1/N) sum_i sum_k v_ik v_ik^T,

restricted to the target weights (flattened and concatenated in target order). The vectors are

* ``"ggn"``: v_ik = J_i^T m_ik, with J_i = d f(x_i)/d w the Jacobian of the outputs and
  M_i = [m_i1 ... m_iC] a square root of the loss Hessian in the outputs, H_i = d2 l_i/d f2 = M_i M_i^T.
  Then C is the exact generalized Gauss-Newton (Schraudolph 2002; Martens 2020, "New insights and
  perspectives on the natural gradient method").
* ``"empirical"``: v_i = d l(f(x_i), y_i)/d w, the empirical Fisher (gradient outer products).
* ``"fisher"``: v_i = d l(f(x_i), y~_i)/d w with y~_i drawn from the model's predictive distribution
  p(y | x_i) = softmax(f(x_i)) (cross-entropy only): an unbiased Monte-Carlo estimate of the true
  Fisher, which equals the GGN for cross-entropy.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn
from torch.func import functional_call, grad, jacrev, vmap

from ..errors import BrainsurgeonError
from .sequence import can_sample_targets, sequence_signals, uses_sequence_signals
from ..targets import Target

CURVATURES = ("ggn", "empirical", "fisher")


@dataclass(frozen=True)
class ParamLayout:
    """Where each target's weight sits in the flattened, concatenated parameter vector."""

    names: tuple[str, ...]  # parameter names, e.g. "net.1.weight"
    shapes: tuple[torch.Size, ...]
    offsets: tuple[int, ...]

    @classmethod
    def of(cls, targets: list[Target]) -> "ParamLayout":
        names, shapes, offsets, o = [], [], [], 0
        for t in targets:
            names.append(t.param_name)  # tied parameters: functional_call ties the other holders
            shapes.append(t.weight.shape)
            offsets.append(o)
            o += t.weight.numel()
        return cls(tuple(names), tuple(shapes), tuple(offsets))

    @property
    def size(self) -> int:
        return self.offsets[-1] + self.shapes[-1].numel() if self.names else 0

    def slice(self, i: int) -> slice:
        return slice(self.offsets[i], self.offsets[i] + self.shapes[i].numel())

    def split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Cut a flat (..., n) tensor into per-target tensors shaped like the weights."""
        return [flat[..., self.slice(i)].reshape(*flat.shape[:-1], *s) for i, s in enumerate(self.shapes)]


def check_curvature(curvature: str) -> str:
    if curvature not in CURVATURES:
        raise BrainsurgeonError(f"curvature must be one of {CURVATURES}, got {curvature!r}")
    return curvature


def _is_cross_entropy(loss_fn) -> bool:
    return isinstance(loss_fn, nn.CrossEntropyLoss)


def _per_sample_loss(loss_fn):
    """l(out_i, y_i) for one sample (a batch of one through the user's mean-reduced loss); a
    class-weighted loss uses its own per-sample decomposition (``validation.calibrated_loss``)."""
    from ..validation import check_loss_weights

    check_loss_weights(loss_fn)  # a batch of one divides class weights out: never drop them silently
    per_sample = getattr(loss_fn, "per_sample", None)
    if per_sample is not None:
        return per_sample
    return lambda out, y: loss_fn(out.unsqueeze(0), y.unsqueeze(0))


def map_samples(fn, args: tuple, in_dims: tuple, note=None):
    """``vmap(fn, in_dims)(*args)``; where ``fn`` cannot run under vmap (a custom loss with
    data-dependent control flow, ``.item()``, in-place ops), the same per-sample loop in Python,
    recorded through ``note(what)``. Outputs are tensors or dicts of tensors."""
    try:
        return vmap(fn, in_dims=in_dims)(*args)
    except BrainsurgeonError:
        raise
    except Exception as e:  # vmap's refusals are RuntimeError/ValueError/NotImplementedError
        what = f"per-sample loop instead of torch.func.vmap (it failed: {type(e).__name__}: {str(e).splitlines()[0][:120]})"
        if note is not None:
            note(what)
        else:  # a caller without a report still must not fall back silently
            warnings.warn(what, stacklevel=2)
    n = next(a.shape[d] for a, d in zip(args, in_dims) if d is not None)
    rows = [fn(*(a if d is None else a.select(d, i) for a, d in zip(args, in_dims))) for i in range(n)]
    if isinstance(rows[0], dict):
        return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
    return torch.stack(rows)


def output_hessian_sqrt(loss_fn, out: torch.Tensor, y: torch.Tensor, note=None) -> torch.Tensor:
    """M with M M^T = d2 l/d out2 per sample: (B, C, C).

    Cross-entropy has the closed form H = diag(p) - p p^T = M M^T with M = diag(sqrt p) - p sqrt(p)^T.
    Any other loss: the exact output Hessian by ``torch.func.hessian``, square-rooted by eigh with
    negative eigenvalues (non-convex losses) clamped to zero, as the GGN requires.
    """
    if _is_cross_entropy(loss_fn) and out.dim() == 2 and loss_fn.label_smoothing == 0 and loss_fn.weight is None:
        p = torch.softmax(out.double(), dim=1)
        sp = p.sqrt()
        m = torch.diag_embed(sp) - p.unsqueeze(2) * sp.unsqueeze(1)
        return m.to(out.dtype)
    flat_out = out.reshape(out.shape[0], -1)
    shape = out.shape[1:]
    loss1 = _per_sample_loss(loss_fn)

    def l_flat(o, y):
        return loss1(o.reshape(shape), y)

    h = map_samples(torch.func.hessian(l_flat), (flat_out, y), (0, 0), note).double()
    evals, evecs = torch.linalg.eigh(h)
    return (evecs * evals.clamp_min(0).sqrt().unsqueeze(1)).to(out.dtype)


class PerSampleVectors:
    """Iterates chunks of per-sample curvature vectors v (rows) over the calibration data.

    ``for v in PerSampleVectors(...)``: each ``v`` is (k, n) in the model's dtype, n = layout.size; the
    curvature estimate is ``sum over all chunks of v^T v / num_samples``.
    """

    def __init__(
        self,
        model: nn.Module,
        targets: list[Target],
        calib,
        loss_fn,
        curvature: str = "ggn",
        generator: torch.Generator | None = None,
        max_chunk_bytes: int = 256 * 2**20,
        note=None,
    ):
        self.model, self.calib, self.loss_fn = model, calib, loss_fn
        self.curvature = check_curvature(curvature)
        if curvature == "fisher" and getattr(loss_fn, "weight", None) is not None:
            raise BrainsurgeonError(
                "curvature='fisher' samples labels from the model, so the class weights of the data labels do not "
                "apply; use curvature='ggn' or 'empirical' with a class-weighted loss"
            )
        if curvature == "fisher" and not (_is_cross_entropy(loss_fn) or can_sample_targets(loss_fn)):
            raise BrainsurgeonError(
                "curvature='fisher' samples labels from softmax outputs and needs nn.CrossEntropyLoss; "
                "use curvature='ggn' or 'empirical' with other losses"
            )
        self.layout = ParamLayout.of(targets)
        self.generator = generator
        self.max_chunk_bytes = max_chunk_bytes
        self.note = note  # records a per-sample loop taken where vmap fails
        self.params = {n: p.detach() for n, p in zip(self.layout.names, (t.weight for t in targets))}

    @property
    def num_samples(self) -> int:
        return self.calib.num_samples

    def _forward_one(self, params, x):
        return functional_call(self.model, params, (x.unsqueeze(0),)).squeeze(0)

    def _flat(self, tree: dict, lead: int) -> torch.Tensor:
        return torch.cat([tree[n].reshape(*tree[n].shape[:lead], -1) for n in self.layout.names], dim=-1)

    def __iter__(self) -> Iterator[torch.Tensor]:
        n = self.layout.size
        for x, y in self.calib:
            with torch.no_grad():
                out = self.model(x)
            per_vec = 4 * n * (out[0].numel() if self.curvature == "ggn" else 1)
            chunk = max(1, min(len(x), self.max_chunk_bytes // max(per_vec, 1)))
            for i in range(0, len(x), chunk):
                xs, ys, outs = x[i : i + chunk], y[i : i + chunk], out[i : i + chunk]
                # torch.func transforms ignore an outer no_grad; it stops autograd recording the
                # user's other parameters (biases) around them.
                with torch.no_grad():
                    yield self._vectors(xs, ys, outs)

    def _vectors(self, x, y, out) -> torch.Tensor:
        if uses_sequence_signals(self.loss_fn, out):  # sequence models: loops, never vmap (see .sequence)
            return self._sequence_vectors(x, y, out)
        if self.curvature == "ggn":
            jac = map_samples(jacrev(self._forward_one), (self.params, x), (None, 0), self.note)  # (B, *out, *w)
            j = self._flat({k: v.reshape(len(x), out[0].numel(), *v.shape[1 + out.dim() - 1 :]) for k, v in jac.items()}, 2)
            m = output_hessian_sqrt(self.loss_fn, out, y, self.note).reshape(len(x), out[0].numel(), -1)
            return torch.einsum("bon,bok->bkn", j.to(m.dtype), m).reshape(-1, j.shape[-1])
        if self.curvature == "fisher":
            probs = torch.softmax(out.detach().double(), dim=1)
            y = torch.multinomial(probs.cpu(), 1, generator=self.generator).squeeze(1).to(x.device)
        loss1 = _per_sample_loss(self.loss_fn)

        def sample_loss(params, xi, yi):
            return loss1(self._forward_one(params, xi), yi)

        g = map_samples(grad(sample_loss), (self.params, x, y), (None, 0, 0), self.note)
        return self._flat(g, 1)

    def _sequence_vectors(self, x, y, out) -> torch.Tensor:
        """Per-sequence vectors by a loop over the sequences (one backward pass per signal): the
        empirical / sampled-Fisher gradient, or the GGN columns J_i^T m_ik (small outputs only)."""
        if self.note is not None:
            self.note("per-sequence gradients by a Python loop, not torch.func.vmap (sequence models, see curvature.sequence)")
        params = {k: v.detach().requires_grad_(True) for k, v in self.params.items()}
        signals = sequence_signals(self.loss_fn, out, y, self.curvature, self.generator)  # (K, B, ...)
        rows = []
        for i in range(len(x)):
            with torch.enable_grad():
                oi = functional_call(self.model, params, (x[i : i + 1],))
                for k in range(signals.shape[0]):
                    gs = torch.autograd.grad(oi, list(params.values()), signals[k, i : i + 1].to(oi.dtype), retain_graph=True)
                    rows.append(torch.cat([g.reshape(-1) for g in gs]))
        return torch.stack(rows).detach()
