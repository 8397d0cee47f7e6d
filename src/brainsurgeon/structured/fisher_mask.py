"""Fisher-based mask search, rearrangement and tuning (Kwon, Kim, Mahoney, Hassoun, Keutzer &
Gholami 2022, "A Fast Post-Training Pruning Framework for Transformers", NeurIPS, arXiv:2204.09656).

Every head and FFN neuron gets a mask variable m (1 = kept). With g_n = d l_n / d m the
per-sequence gradient (:func:`~.transformer_stats.mask_gradients`), the empirical Fisher of the
masks is I = (1/N) sum_n g_n g_n^T and removing the set Z changes the loss by about
1/2 z^T I z (z = indicator of Z: m - m' = z). The steps of the paper:

1. **search** (diagonal Fisher): score_u = 1/2 I_uu; the heads/neurons to remove per layer under the
   FLOPs / latency / parameter budget (:func:`~.transformer_alloc.global_counts`, their Algorithm 1);
2. **rearrangement**: within each layer the counts stay, and the removed set is re-chosen greedily
   on the layer's block of I (heads and neurons separately), each time adding the unit u that
   increases 1/2 z^T I z least: I_uu / 2 + sum_{v in Z} I_uv;
3. **mask tuning**: layer by layer (the pruned model's inputs, the dense model's outputs), the kept
   mask values are refit by least squares so the sublayer reproduces its dense output:
   min_m sum_t || sum_{u kept} m_u c_u(t) - y(t) ||^2 with c_u(t) the contribution of unit u through
   o (down) and y the dense sublayer output minus the bias; normal equations G m = b, G_uv =
   sum_t <c_u, c_v>, ridge ``damping`` (default 1e-4) times G's mean diagonal. The tuned values are
   folded into o's (down's) columns. Attention is tuned before the FFN of the same layer.
"""
from __future__ import annotations

import torch

from ..errors import BrainsurgeonError
from ..registry import register
from .reconstruction import greedy_removal
from .transformer import LayerUnits, MaskHooks
from .transformer_engine import TransformerContext, TransformerMethod, lowest_units
from .transformer_stats import BlockRunner, capture_inputs, flat

DEFAULT_RIDGE = 1e-4


def mask_fisher(grads: torch.Tensor) -> torch.Tensor:
    """Empirical Fisher (1/N) sum_n g_n g_n^T of per-sample gradients ``(N, units)``."""
    return grads.T @ grads / grads.shape[0]


@register("fisher-mask")
class FisherMask(TransformerMethod):
    """Kwon et al. 2022 (arXiv:2204.09656): Fisher of the head/neuron mask variables, search under
    the budget, mask rearrangement and layer-wise least-squares mask tuning.

    score_u = 1/2 I_uu with I = (1/N) sum_n g_n g_n^T, g_n = d l_n / d m (per-sequence gradients of
    the mask variables); removed set per layer re-chosen greedily on the layer's block of I;
    kept mask values refit by least squares per sublayer (formulas in the module docstring).
    Options: ``rearrange`` (default True), ``tune`` (default True), ``tune_samples`` (sequences
    used by the tuning; default all).
    """

    summary = "Kwon et al. 2022: mask Fisher 1/2 I_uu, budget search, rearrangement, LS mask tuning."

    def __init__(self, rearrange: bool = True, tune: bool = True, tune_samples: int | None = None):
        for name, v in (("rearrange", rearrange), ("tune", tune)):
            if not isinstance(v, bool):
                raise BrainsurgeonError(f"fisher-mask: {name} must be True or False, got {v!r}")
        if tune_samples is not None and (isinstance(tune_samples, bool) or not isinstance(tune_samples, int) or tune_samples < 1):
            raise BrainsurgeonError(f"fisher-mask: tune_samples must be a positive integer, got {tune_samples!r}")
        self.rearrange, self.tune, self.tune_samples = rearrange, tune, tune_samples
        self._fisher: dict[str, torch.Tensor] = {}

    def scores(self, tctx: TransformerContext) -> dict[str, torch.Tensor]:
        from .transformer_stats import mask_gradients

        grads = mask_gradients(tctx)
        self._fisher = {k: mask_fisher(g) for k, g in grads.items()}
        return {k: 0.5 * torch.diagonal(f).clamp_min(0) for k, f in self._fisher.items()}

    def select(self, tctx: TransformerContext, counts: dict[str, int]) -> dict[str, torch.Tensor]:
        keep = lowest_units(tctx.layers, tctx.scores, counts)
        if not self.rearrange:
            return keep
        for u in tctx.layers:
            keys = [u.neurons_key] + ([] if u.prune_query_heads else [u.heads_key])
            for k in keys:  # query-head mode keeps the per-group selection (repeat_kv)
                keep[k] = greedy_removal(self._fisher[k], counts[k])
        return keep

    def compensate(self, tctx: TransformerContext, keep: dict[str, torch.Tensor]) -> None:
        if self.tune:
            tune_masks(tctx, keep, tctx.damping or DEFAULT_RIDGE, self.tune_samples)


def _solve(gram: torch.Tensor, rhs: torch.Tensor, ridge: float, tctx, where: str) -> torch.Tensor:
    lam = ridge * float(torch.diagonal(gram).mean().clamp_min(1e-30))
    tctx.numerics.damp(where, lam)
    return torch.linalg.solve(gram + lam * torch.eye(len(gram), dtype=gram.dtype), rhs)


def _accumulate(contrib_inputs, weight, targets, cols_per_unit, kept):
    """Normal equations of min_m sum_t |sum_u m_u W_u x_u(t) - y(t)|^2 over the kept units.

    ``contrib_inputs``: list of (B, L, in) inputs of the projection (already masked by keep);
    ``weight``: (out, in); ``targets``: list of (B, L, out) dense outputs minus bias."""
    w = weight.double()
    idx = torch.nonzero(kept).squeeze(1)
    k = len(idx)
    rhs = torch.zeros(k, dtype=torch.float64)
    cols = (idx[:, None] * cols_per_unit + torch.arange(cols_per_unit)).reshape(-1)
    wk = w[:, cols]  # (out, k * c)
    wtw = wk.T @ wk
    moment = torch.zeros_like(wtw)
    for x, y in zip(contrib_inputs, targets):
        xk = x.reshape(-1, x.shape[-1])[:, cols]
        # second moment in float32 per batch (the big product), accumulated in float64
        moment += (xk.float().T @ xk.float()).double()
        yw = flat(y) @ wk  # (t, k * c)
        rhs += (xk.double() * yw).reshape(-1, k, cols_per_unit).sum((0, 2))
    # <c_u, c_v> = sum_t x_u(t)^T W_u^T W_v x_v(t) = sum_{c,d} (X^T X)_{uc,vd} (W^T W)_{uc,vd}
    gram = (moment * wtw).reshape(k, cols_per_unit, k, cols_per_unit).sum((1, 3))
    return gram, rhs, idx


def tune_masks(tctx: TransformerContext, keep: dict[str, torch.Tensor], ridge: float, samples: int | None,
               refit_columns: bool = False) -> None:
    """Kwon et al.'s layer-wise least-squares mask tuning, folded into o's / down's columns; with
    ``refit_columns`` every kept column of o / down is refit instead (``reconstruction``)."""
    runner = BlockRunner(tctx)
    if samples is not None:
        n, total = 0, []
        for i, h in enumerate(runner.states):
            if n >= samples:
                break
            total.append(i)
            n += len(h)
        runner.states = [runner.states[i] for i in total]
    dense_states = list(runner.states)
    student_states = list(runner.states)
    for u in tctx.layers:
        masks = {u.heads_key: keep[u.heads_key].double(), u.neurons_key: keep[u.neurons_key].double()}
        mods = {"o": u.o.module, "down": u.mlp_out.module}
        with _outputs(mods) as outs:
            dense_next = runner.run(u.block, dense_states)
        for kind, proj, key in (("heads", u.o, u.heads_key), ("neurons", u.mlp_out, u.neurons_key)):
            if not keep[key].any():
                continue
            per = u.q_heads_per_unit * u.head_dim if kind == "heads" else 1
            bias = proj.bias.detach().double() if proj.bias is not None else 0.0
            targets = [flat(y) - bias for y in outs["o" if kind == "heads" else "down"]]
            with MaskHooks([u], masks), capture_inputs({"x": proj.module}) as got:
                runner.run(u.block, student_states)
            if refit_columns:
                refit_kept_columns(proj, got["x"], targets, per, keep[key], ridge, tctx, f"{key}.refit")
                continue
            gram, rhs, idx = _accumulate(got["x"], proj.weight_oi().detach(), targets, per, keep[key])
            m = _solve(gram, rhs, ridge, tctx, f"{key}.tune")
            masks[key] = torch.zeros_like(masks[key])
            masks[key][idx] = m
        _fold(u, masks)
        student_states = runner.run(u.block, student_states)
        dense_states = dense_next


def refit_kept_columns(proj, inputs, targets, per, kept, ridge, tctx, where) -> None:
    """min_{W'_K} sum_t |W'_K x_K(t) - y(t)|^2 (+ ridge): the kept columns of o / down refit to the
    dense outputs from the pruned model's inputs; normal equations in float64."""
    idx = torch.nonzero(kept).squeeze(1)
    cols = (idx[:, None] * per + torch.arange(per)).reshape(-1)
    moment = torch.zeros(len(cols), len(cols), dtype=torch.float64)
    rhs = torch.zeros(len(cols), targets[0].shape[-1], dtype=torch.float64)
    for x, y in zip(inputs, targets):
        xk = x.reshape(-1, x.shape[-1])[:, cols]
        moment += (xk.float().T @ xk.float()).double()
        rhs += xk.double().T @ y
    w_new = _solve(moment, rhs, ridge, tctx, where).T  # (out, |K| * per)
    with torch.no_grad():
        w = proj.weight_oi()
        w[:, cols.to(w.device)] = w_new.to(w)


def _fold(u: LayerUnits, masks: dict[str, torch.Tensor]) -> None:
    """Scale o's / down's input columns by the tuned mask values (removed units: 0)."""
    with torch.no_grad():
        for proj, key, per in ((u.o, u.heads_key, u.q_heads_per_unit * u.head_dim), (u.mlp_out, u.neurons_key, 1)):
            scale = masks[key].repeat_interleave(per).to(proj.module.weight)
            w = proj.weight_oi()
            w.mul_(scale[None, :])


class _outputs:
    """Record each module's output (context manager): ``{name: [tensor, ...]}``."""

    def __init__(self, modules):
        self.modules = modules

    def __enter__(self):
        self.got = {n: [] for n in self.modules}
        self.handles = [m.register_forward_hook(lambda mod, a, out, n=n: self.got[n].append(out.detach()))
                        for n, m in self.modules.items()]
        return self.got

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
