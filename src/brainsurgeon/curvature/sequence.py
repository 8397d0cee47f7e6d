"""Curvature signals for models whose outputs have a sequence dimension, (B, L, C): language
models and encoders seen through :class:`brainsurgeon.adapters.hf.TokenView`.

Per-sample means per *sequence*: sample i's loss is the user's (mean-reduced) loss on a batch of
that one sequence, l_i = loss_fn(f(x_i)[None], y_i[None]); for the model's own token loss that is
the mean cross-entropy over the sequence's labelled tokens, as the model computes it. Every
curvature is an average over sequences of outer products of per-sequence gradients; inside a
sequence the tokens are the T positions of K-FAC's KFC convention (see :mod:`.kfac`).

The signals back-propagated from the outputs (one backward pass each) are

* ``"empirical"``: g_i = d l_i / d f(x_i) with the data targets;
* ``"fisher"``: the same with targets drawn from the model's predictive distribution
  (:func:`sample_model_targets`): a token label from softmax(logits_t) at every position the loss
  counts (a causal LM's position t predicts token t+1, so its sample goes to target t+1), or, for
  the squared hidden-state distance 1/2 |h - h_dense|^2, the Gaussian target h + eps, eps ~ N(0, I),
  whose signal -eps has E[eps eps^T] = I = the loss Hessian: an unbiased Monte-Carlo GGN. One
  backward pass per sequence, so this is the practical choice for LMs;
* ``"ggn"``: the columns of a square root of the per-sequence output Hessian (L * C of them). That
  is one backward pass per output entry, affordable only for small outputs: refused above
  :data:`MAX_EXACT_OUTPUTS` entries per sequence (a 49152-token vocabulary has 49152 per position).

Gradients of the per-sequence losses are taken by one autograd call over a Python loop of losses
(each l_i depends on f(x_i) only), never by ``torch.func.vmap``: a loss or model that vmap cannot
trace (HF attention masks, data-dependent normalisers) works unchanged.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import BrainsurgeonError

#: the exact GGN of a sequence output needs one backward pass per output entry (L * C)
MAX_EXACT_OUTPUTS = 4096
IGNORE_INDEX = -100


def _token_view_task(loss_fn) -> str | None:
    """The task of a ``TokenView.loss_fn`` (a bound method of the view), else None."""
    owner = getattr(loss_fn, "__self__", None)
    if owner is None or getattr(loss_fn, "__name__", "") != "loss_fn":
        return None
    task = getattr(owner, "task", None)
    if task == "sequence" and getattr(getattr(owner, "hf", None), "config", None) is not None:
        return "regression" if getattr(owner.hf.config, "num_labels", 2) == 1 else "sequence"
    return task


def uses_sequence_signals(loss_fn, out: torch.Tensor) -> bool:
    """Sequence outputs (B, L, C), or any output of a TokenView loss, take this module's path."""
    if _token_view_task(loss_fn) is not None:
        return True
    # nn.CrossEntropyLoss on (B, C, H, W) keeps its class dimension 1: the classifier path handles it
    return out.dim() > 2 and not isinstance(loss_fn, nn.CrossEntropyLoss)


def check_empirical_is_informative(kind: str, loss_fn, instead: str) -> None:
    """The hidden-state distance of a plain encoder is 0, with zero gradient, at the dense model
    (its targets are the dense outputs): its empirical Fisher is exactly zero, so refuse it."""
    if kind == "empirical" and _token_view_task(loss_fn) == "hidden":
        raise BrainsurgeonError(
            "the empirical Fisher of a plain encoder's hidden-state distance is zero at the dense model (no "
            f"gradient at all); use {instead}"
        )


def can_sample_targets(loss_fn) -> bool:
    """Whether :func:`sample_model_targets` knows this loss's predictive distribution."""
    return isinstance(loss_fn, nn.CrossEntropyLoss) or _token_view_task(loss_fn) in ("causal", "masked", "token", "sequence", "hidden")


def _draw(logits: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One label per row of (..., C) logits, from softmax over the last dimension (float64), one
    leading index at a time (a batch of 49152-way token distributions would be ~1 GB at once).
    Inverse-CDF sampling, label = #{k : cumsum(p)_k <= u}: the same distribution as
    ``torch.multinomial``, 6x faster on 49152 classes (0.37 s against 2.4 s for 256 tokens)."""
    dev = generator.device if generator is not None else torch.device("cpu")
    rows = logits.detach().reshape(-1, *logits.shape[-2:]) if logits.dim() > 2 else logits.detach()[None]
    labels = []
    for r in rows:
        cdf = torch.softmax(r.double(), dim=-1).cumsum(-1).to(dev)
        u = torch.rand(cdf.shape[0], 1, generator=generator, dtype=torch.float64, device=dev) * cdf[:, -1:]
        labels.append(torch.searchsorted(cdf, u, right=True).squeeze(1).clamp_max(cdf.shape[1] - 1))
    return torch.stack(labels).reshape(logits.shape[:-1]).to(logits.device)


def sample_model_targets(loss_fn, out: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Targets drawn from the model's predictive distribution, in the layout of ``y`` (see the
    module docstring); positions the data leaves out (-100) stay out."""
    task = _token_view_task(loss_fn)
    if task == "causal":  # logits at t predict the token at t + 1
        drawn = y.clone()
        drawn[:, 1:] = torch.where(y[:, 1:] == IGNORE_INDEX, y[:, 1:], _draw(out[:, :-1], generator))
        return drawn
    if task in ("masked", "token"):
        return torch.where(y == IGNORE_INDEX, y, _draw(out, generator))
    if task == "hidden":  # Gaussian likelihood of 1/2 |h - t|^2: t = h + eps
        dev = generator.device if generator is not None else torch.device("cpu")
        eps = torch.randn(out.shape, generator=generator, dtype=torch.float64, device=dev)
        return (out.detach().double() + eps.to(out.device)).to(out.dtype)
    if task == "sequence" or isinstance(loss_fn, nn.CrossEntropyLoss):
        if out.dim() != 2 and isinstance(loss_fn, nn.CrossEntropyLoss):
            raise BrainsurgeonError(
                f"sampled (true) Fisher labels for nn.CrossEntropyLoss need (B, C) outputs, got {tuple(out.shape)}; "
                "use the empirical Fisher"
            )
        return _draw(out, generator)
    raise BrainsurgeonError(
        "the true Fisher samples targets from the model's predictive distribution, which is known for "
        "nn.CrossEntropyLoss and the models' own losses (TokenView.loss_fn); use the empirical Fisher or the GGN"
    )


def per_sample_output_grads(loss_fn, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(B, *out.shape[1:]): d l_i / d f(x_i) for every sample i, l_i = loss_fn on a batch of one."""
    o = out.detach().requires_grad_(True)
    with torch.enable_grad():
        total = sum(loss_fn(o[i : i + 1], y[i : i + 1]) for i in range(len(o)))
        (g,) = torch.autograd.grad(total, o)
    return g


def exact_output_hessian_sqrt(loss_fn, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(B, K, *out.shape[1:]) columns m_ik with sum_k m_ik m_ik^T = d2 l_i / d f2 (the per-sequence
    output Hessian, by double backward, square-rooted by eigh; negative eigenvalues clamped to 0).
    K = L * C: refused above :data:`MAX_EXACT_OUTPUTS`."""
    size = out[0].numel()
    if size > MAX_EXACT_OUTPUTS:
        raise BrainsurgeonError(
            f"the exact GGN of a {tuple(out.shape[1:])} output needs {size} backward passes per sequence "
            f"(over {MAX_EXACT_OUTPUTS}); use the Monte-Carlo Fisher (fisher='true' / curvature='fisher') "
            "or the empirical Fisher"
        )
    cols = []
    for i in range(len(out)):
        oi = out[i : i + 1].detach().double()

        def loss_i(flat):
            return loss_fn(flat.reshape(oi.shape), y[i : i + 1])

        h = torch.autograd.functional.hessian(loss_i, oi.reshape(-1))
        evals, evecs = torch.linalg.eigh(0.5 * (h + h.T))
        keep = evals > evals.abs().max() * 1e-12  # zero directions (ignored tokens, softmax shift) add nothing
        m = evecs[:, keep] * evals[keep].sqrt()
        cols.append(m.T.reshape(-1, *out.shape[1:]))
    k = max(1, max(c.shape[0] for c in cols))  # at least one (zero) signal: no labelled token at all
    padded = torch.zeros(len(out), k, *out.shape[1:], dtype=torch.float64, device=out.device)
    for i, c in enumerate(cols):
        padded[i, : c.shape[0]] = c
    return padded.to(out.dtype)


def sequence_signals(loss_fn, out: torch.Tensor, y: torch.Tensor, kind: str, generator) -> torch.Tensor:
    """(K, *out.shape): the vectors back-propagated from sequence outputs (see the module docstring)."""
    if kind == "ggn":
        return exact_output_hessian_sqrt(loss_fn, out, y).transpose(0, 1)
    if kind == "fisher":
        y = sample_model_targets(loss_fn, out, y, generator)
    return per_sample_output_grads(loss_fn, out, y).unsqueeze(0)
